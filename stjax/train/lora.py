"""LoRA: adapters added to a loaded model, trained alone, then merged back for export.

Each targeted projection gains `lora_a` (in, r) and `lora_b` (r, out) (`LoRAParam`s) and computes
x @ kernel + (alpha / r) * x @ lora_a @ lora_b; the base weights stay frozen (and may be stored
quantized: QLoRA, `stjax.models.quant`). Merging writes kernel + (alpha / r) * lora_a @ lora_b, the
kernel dequantized first, which in transformers' (out, in) layout is the usual W + scale * B @ A.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util
from jax.experimental import multihost_utils

from stjax.models.config import QwenVLConfig
from stjax.models.loading import model_from_params, param_shapes
from stjax.models.quant import dequantize
from stjax.models.qwen_vl import QwenVLForConditionalGeneration, abstract_model
from stjax.models.weights import rules


def _flat(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
    """Every variable by path: parameters, adapters and the arrays of quantized kernels."""
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))


def with_lora(
    model: QwenVLForConditionalGeneration,
    rank: int,
    alpha: float = 8.0,
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    seed: int = 0,
    dropout: float = 0.0,
) -> QwenVLForConditionalGeneration:
    """The model with fresh adapters on `targets` (lora_b = 0: it computes what the base computes)."""
    cfg = model.config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets), lora_dropout=dropout)
    graphdef, state = nnx.split(abstract_model(cfg))
    base = _flat(model)
    std = cfg.initializer_range
    values = {}
    for k, (path, leaf) in enumerate(traverse_util.flatten_dict(nnx.to_pure_dict(state)).items()):
        if path in base:
            values[path] = base[path]
        elif path[-1] == "lora_a":
            values[path] = std * jax.random.normal(jax.random.key(seed + k), leaf.shape, leaf.dtype)
        else:  # lora_b
            values[path] = jnp.zeros(leaf.shape, leaf.dtype)
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(values))
    return nnx.merge(graphdef, state)


def _host(x: jax.Array) -> np.ndarray:
    """A global array on this host (gathered from the other processes when they hold parts)."""
    return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


@functools.partial(jax.jit, static_argnames=("fmt", "shape", "scale", "dtype"))
def _merged_layer(
    stored: dict[str, jax.Array],
    lora: tuple[jax.Array, jax.Array] | None,
    index: jax.Array | None,
    *,
    fmt: str,
    shape: tuple[int, int],
    scale: float,
    dtype: str,
) -> jax.Array:
    """One layer (`index` of stacked arrays, or the whole when None) of a merged (in, out) kernel:
    the base, dequantized, plus scale * A @ B, in float32."""
    stored, lora = jax.tree.map(lambda x: x if index is None else x[index], (stored, lora))
    base = stored["value"] if fmt == "none" else dequantize(stored, fmt, shape[::-1], jnp.float32).T
    kernel = base.astype(jnp.float32)
    if lora is not None:
        a, b = (x.astype(jnp.float32) for x in lora)
        kernel = kernel + scale * jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST)
    return kernel.astype(dtype)


@dataclass(frozen=True)
class MergedParam:
    """One parameter of the merged model, made when read: a kernel with adapters or a quantized
    base is merged on the devices one layer at a time, then brought to this host."""

    stored: dict[str, jax.Array]  # {"value": the parameter}, or a quantized kernel's arrays
    lora: tuple[jax.Array, jax.Array] | None
    fmt: str  # how the kernel is stored: none, nf4 or int8
    scale: float
    shape: tuple[int, ...]
    dtype: np.dtype
    stacked: bool

    def read(self) -> np.ndarray:
        if self.fmt == "none" and self.lora is None:
            return _host(self.stored["value"]).astype(self.dtype)
        merge = functools.partial(
            _merged_layer,
            self.stored,
            self.lora,
            fmt=self.fmt,
            shape=self.shape[-2:],
            scale=self.scale,
            dtype=self.dtype.name,
        )
        if not self.stacked:
            return _host(merge(None))
        out = np.empty(self.shape, self.dtype)
        for i in range(self.shape[0]):
            out[i] = _host(merge(jnp.int32(i)))
        return out


def merged_params(model: QwenVLForConditionalGeneration) -> tuple[QwenVLConfig, dict[tuple[str, ...], MergedParam]]:
    """The merged model's config (no adapters, no quantization) and its parameters, in checkpoint
    order, each made when read (`MergedParam`) in the model's parameter dtype."""
    cfg = model.config
    plain = cfg.replace(lora_rank=0, quantize_base="none")
    flat = _flat(model)
    shapes = param_shapes(plain)
    dtype = np.dtype(cfg.param_dtype)
    out = {}
    for rule in rules(plain):
        owner = rule.path[:-1]
        stored = (
            {"value": flat[rule.path]}
            if rule.path in flat
            else {p[-1]: v for p, v in flat.items() if p[:-1] == rule.path}
        )
        adapted = rule.path[-1] == "kernel" and owner + ("lora_a",) in flat
        lora = (flat[owner + ("lora_a",)], flat[owner + ("lora_b",)]) if adapted else None
        out[rule.path] = MergedParam(
            stored,
            lora,
            cfg.quantization(owner) if "codes" in stored else "none",
            cfg.lora_alpha / max(cfg.lora_rank, 1),
            shapes[rule.path],
            dtype,
            rule.stacked,
        )
    return plain, out


def merge_lora(model: QwenVLForConditionalGeneration) -> QwenVLForConditionalGeneration:
    """A plain model (no adapters, no quantization) whose kernels include the adapters' contribution."""
    plain, params = merged_params(model)
    return model_from_params(plain, {path: source.read() for path, source in params.items()})
