"""LoRA: adapters added to a loaded model, trained alone, then merged back for export.

Each targeted projection gains `lora_a` (in, r) and `lora_b` (r, out) (`LoRAParam`s) and computes
x @ kernel + (alpha / r) * x @ lora_a @ lora_b; the base weights stay frozen. Merging writes
kernel + (alpha / r) * lora_a @ lora_b, which in transformers' (out, in) layout is the usual
W + scale * B @ A.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from stjax.models.loading import model_from_params
from stjax.models.qwen_vl import QwenVLForConditionalGeneration, abstract_model


def _flat(model: nnx.Module) -> dict[tuple[str, ...], jax.Array]:
    return traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def with_lora(model: QwenVLForConditionalGeneration, rank: int, alpha: float = 8.0,
              targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
              seed: int = 0, dropout: float = 0.0) -> QwenVLForConditionalGeneration:
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


def merge_lora(model: QwenVLForConditionalGeneration) -> QwenVLForConditionalGeneration:
    """A plain model (no adapters) whose kernels include the adapters' contribution."""
    cfg = model.config
    scale = cfg.lora_alpha / cfg.lora_rank
    flat = {k: np.asarray(v) for k, v in _flat(model).items()}
    merged = {}
    for path, value in flat.items():
        if path[-1] in ("lora_a", "lora_b"):
            continue
        a, b = flat.get(path[:-1] + ("lora_a",)), flat.get(path[:-1] + ("lora_b",))
        if path[-1] == "kernel" and a is not None:
            value = (value + scale * np.einsum("...ir,...ro->...io", a.astype(np.float32), b.astype(np.float32))
                     ).astype(value.dtype)
        merged[path] = value
    return model_from_params(cfg.replace(lora_rank=0), merged)
