"""Building blocks shared by the vision tower and the decoder.

Every parameter is an `nnx.Param` carrying `axes`: one logical axis name per dimension, which
`stjax.sharding` maps onto mesh axes. Parameters live in `param_dtype`; each layer casts them to
`compute_dtype` where it uses them, so fp32 master weights with bf16 compute is one config change.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from stjax.models.cpu_attention import FORWARD_TARGET
from stjax.models.quant import QuantizedKernel


def _dots_and_fused_attention(prim, *args, **params) -> bool:
    """Save what `dots` saves plus the outputs of the fused attention kernels (cuDNN's forward,
    `cpu_flash`'s): `dots` alone re-runs each layer's attention forward in the backward pass,
    since a kernel call is no matmul to the policy."""
    if prim.name.startswith("dot_product_attention_fwd"):  # jax's cuDNN primitives
        return True
    if prim.name == "ffi_call" and params.get("target_name") == FORWARD_TARGET:
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": _dots_and_fused_attention,
}


class LoRAParam(nnx.Param):
    """Low-rank adapter weights: with LoRA on, the only parameters the optimizer updates."""


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ scale * dropout(x) @ lora_a @ lora_b); kernel is (in, out), the
    transpose of torch's Linear.weight. The adapter starts at zero (lora_b = 0), so it starts as the
    base. Dropout (as peft's lora_dropout) applies only when a `dropout_key` is passed. With `quantize`
    ("nf4", "int8") the kernel is a frozen `QuantizedKernel`, dequantized to the compute dtype at each call."""

    def __init__(
        self,
        din: int,
        dout: int,
        axes: tuple[str, str],
        *,
        bias: bool,
        std: float,
        param_dtype,
        compute_dtype,
        rngs: nnx.Rngs,
        lora_rank: int = 0,
        lora_alpha: float = 0.0,
        lora_dropout: float = 0.0,
        quantize: str = "none",
        double_quant: bool = False,
    ):
        init = jax.nn.initializers.normal(std)
        if quantize == "none":
            self.kernel = nnx.Param(init(rngs.params(), (din, dout), param_dtype), axes=axes)
        else:
            self.kernel = QuantizedKernel(din, dout, axes, quantize, double_quant)
        self.bias = nnx.Param(jnp.zeros((dout,), param_dtype), axes=axes[1:]) if bias else None
        if lora_rank:
            self.lora_a = LoRAParam(init(rngs.params(), (din, lora_rank), param_dtype), axes=(axes[0], None))
            self.lora_b = LoRAParam(jnp.zeros((lora_rank, dout), param_dtype), axes=(None, axes[1]))
            self.lora_scale = lora_alpha / lora_rank
        else:
            self.lora_a = self.lora_b = None
        self.lora_dropout = lora_dropout
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.compute_dtype)
        if isinstance(self.kernel, QuantizedKernel):
            y = self.kernel.matmul(x)
        else:
            y = jnp.dot(x, self.kernel[...].astype(self.compute_dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.compute_dtype)
        if self.lora_a is not None:
            if dropout_key is not None and self.lora_dropout > 0:
                keep = jax.random.bernoulli(dropout_key, 1.0 - self.lora_dropout, x.shape)
                x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
            low = jnp.dot(x, self.lora_a[...].astype(self.compute_dtype))
            y = y + self.lora_scale * jnp.dot(low, self.lora_b[...].astype(self.compute_dtype))
        return y


class RMSNorm(nnx.Module):
    """w * normalize(x) with the statistics in float32 (as transformers' Qwen2RMSNorm)."""

    def __init__(self, dim: int, axis: str, *, eps: float, param_dtype, compute_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.compute_dtype) * y.astype(self.compute_dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, axis: str, *, eps: float, param_dtype, compute_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis,))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=(axis,))
        self.eps = eps
        self.compute_dtype = compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.compute_dtype)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def rotate_half(x: jax.Array) -> jax.Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin, in float32; cos/sin broadcast over the heads axis (-2)."""
    x32 = x.astype(jnp.float32)
    out = x32 * cos[..., None, :] + rotate_half(x32) * sin[..., None, :]
    return out.astype(x.dtype)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` copies of a layer with every parameter stacked on a new leading axis."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0)
    def create(rngs: nnx.Rngs) -> nnx.Module:
        return make(rngs)

    return create(rngs)


def scan_layers(layers: nnx.Module, carry, step: Callable, xs=None, remat: str = "none"):
    """Run `step(layer, carry, x) -> carry` over stacked layers with `lax.scan`.

    One layer is traced and compiled whatever the depth; `remat` picks what the backward pass
    recomputes instead of storing (see REMAT_POLICIES).
    """
    graphdef, state = nnx.split(layers)

    def body(carry, inputs):
        layer_state, x = inputs
        return step(nnx.merge(graphdef, layer_state), carry, x), None

    if REMAT_POLICIES.get(remat, "missing") == "missing":
        raise ValueError(f"unknown remat policy {remat!r}; choose from {sorted(REMAT_POLICIES)}")
    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    carry, _ = jax.lax.scan(body, carry, (state, xs))
    return carry
