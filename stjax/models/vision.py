"""The vision tower of Qwen2-VL (LayerNorm, QuickGELU MLP, per-frame attention) and Qwen2.5-VL
(RMSNorm, gated SiLU MLP with biases, window attention with a few per-frame blocks): the model
family (`cfg.family`) chooses the norm, the MLP and which blocks attend over whole frames.

Patches arrive from the host already in processing order (the family's, e.g. window order) together
with group tables (see `stjax.models.inputs.VisionGroups`): each attention block gathers q, k, v
into fixed-size groups (one frame or one window per group), attends inside each group, and
gathers the result back. The cost is linear in the number of groups, never N x N.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from stjax.models.attention import attend
from stjax.models.config import QwenVLConfig
from stjax.models.inputs import VisionGroups, VisionInputs
from stjax.models.layers import ACTIVATIONS, LayerNorm, Linear, RMSNorm, apply_rotary, scan_layers, stack_layers


def grouped_attention(q: jax.Array, k: jax.Array, v: jax.Array, groups: VisionGroups, backend: str) -> jax.Array:
    """Attention inside groups. q, k, v: (N, heads, head_dim) -> (N, heads * head_dim)."""
    n, heads, hd = q.shape
    count, size = groups.index.shape
    gq, gk, gv = (x[groups.index] for x in (q, k, v))  # (G, T, heads, hd)
    real = (jnp.arange(size)[None, :] < groups.lengths[:, None]).astype(jnp.int32)  # real slots first
    # groups are not the batch: a per-sample vmap's spmd_axis_name splits the samples instead
    out = attend(gq, gk, gv, real, real, causal=False, backend=backend, right_padded=True, split_batch=False)
    flat = out.reshape(count * size, heads * hd)
    # Rows that belong to no group (bucket padding) read an appended zero row.
    flat = jnp.concatenate([flat, jnp.zeros((1, heads * hd), flat.dtype)])
    return flat[groups.inverse]


def unconstrained(x: jax.Array) -> jax.Array:
    """x free to be sharded as XLA likes: under the per-sample vmap (spmd_axis_name) this keeps each
    sample's rows on its batch shard."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*[PartitionSpec.UNCONSTRAINED] * x.ndim))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        v = cfg.vision
        kw = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
        lin = dict(
            quantize=cfg.quantization(("visual", "blocks")), double_quant=cfg.double_quant, **cfg.linear_init(rngs)
        )
        Norm = RMSNorm if cfg.family.vision_norm == "rms_norm" else LayerNorm
        self.norm1 = Norm(v.hidden_size, "vision_embed", eps=1e-6, **kw)
        self.norm2 = Norm(v.hidden_size, "vision_embed", eps=1e-6, **kw)
        self.qkv = Linear(v.hidden_size, 3 * v.hidden_size, ("vision_embed", "vision_heads"), bias=True, **lin)
        self.proj = Linear(v.hidden_size, v.hidden_size, ("vision_heads", "vision_embed"), bias=True, **lin)
        self.gated = cfg.family.gated_mlp
        if self.gated:
            self.gate_proj = Linear(
                v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True, **lin
            )
            self.up_proj = Linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True, **lin)
            self.down_proj = Linear(
                v.intermediate_size, v.hidden_size, ("vision_mlp", "vision_embed"), bias=True, **lin
            )
        else:
            self.fc1 = Linear(v.hidden_size, v.intermediate_size, ("vision_embed", "vision_mlp"), bias=True, **lin)
            self.fc2 = Linear(v.intermediate_size, v.hidden_size, ("vision_mlp", "vision_embed"), bias=True, **lin)
        self.act = ACTIVATIONS[v.hidden_act]
        self.heads = v.num_heads
        self.backend = cfg.attention

    def mlp(self, x: jax.Array) -> jax.Array:
        if self.gated:
            return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
        return self.fc2(self.act(self.fc1(x)))

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, groups: VisionGroups) -> jax.Array:
        n, d = x.shape
        q, k, v = jnp.moveaxis(self.qkv(self.norm1(x)).reshape(n, 3, self.heads, d // self.heads), 1, 0)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        x = x + self.proj(grouped_attention(q, k, v, groups, self.backend))
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """Norm, then each 2x2 block of patches (4 consecutive rows) -> MLP -> one LLM token."""

    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs, postshuffle_norm: bool = False):
        """`postshuffle_norm` (Qwen3-VL's DeepStack mergers): the norm runs over the 2x2 block's
        concatenated patches rather than over each patch."""
        v = cfg.vision
        kw = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
        width = v.hidden_size * v.spatial_merge_size**2
        Norm = RMSNorm if cfg.family.vision_norm == "rms_norm" else LayerNorm
        self.ln_q = (
            Norm(width, "vision_merge", eps=1e-6, **kw)
            if postshuffle_norm
            else Norm(v.hidden_size, "vision_embed", eps=1e-6, **kw)
        )
        self.postshuffle_norm = postshuffle_norm
        lin = dict(
            bias=True,
            quantize=cfg.quantization(("visual", "merger")),
            double_quant=cfg.double_quant,
            **cfg.linear_init(rngs),
        )
        self.mlp_0 = Linear(width, width, ("vision_merge", "vision_mlp"), **lin)
        self.mlp_2 = Linear(width, v.out_hidden_size, ("vision_mlp", "embed"), **lin)
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x.reshape(-1, self.width)) if self.postshuffle_norm else self.ln_q(x).reshape(-1, self.width)
        return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        v = cfg.vision
        bias = cfg.family.patch_bias
        self.patch_embed = Linear(
            v.patch_dim, v.hidden_size, ("vision_patch", "vision_embed"), bias=bias, **cfg.linear_init(rngs)
        )
        self.blocks = stack_layers(lambda r: VisionBlock(cfg, r), v.depth, rngs)
        self.merger = PatchMerger(cfg, rngs)
        self.full_attention = cfg.family.full_attention(v)
        self.head_dim = v.head_dim
        self.remat = cfg.remat

    def rotary(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos, sin (N, head_dim) of the 2D rotary embedding: rows then columns, doubled."""
        dim = self.head_dim // 2
        inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        angles = (positions[:, :, None].astype(jnp.float32) * inv_freq).reshape(positions.shape[0], -1)
        angles = jnp.concatenate([angles, angles], axis=-1)
        return jnp.cos(angles), jnp.sin(angles)

    def __call__(self, vis: VisionInputs) -> jax.Array:
        """Merged vision features (N / 4, out_hidden), in the order of `vis.patches`."""
        x = self.patch_embed(vis.patches)
        cos, sin = self.rotary(vis.rotary_positions)

        def step(block: VisionBlock, x: jax.Array, full: jax.Array) -> jax.Array:
            x = unconstrained(x)
            if vis.windows is None:  # a family without windows: every block attends within frames
                return block(x, cos, sin, vis.frames)
            return jax.lax.cond(full, lambda: block(x, cos, sin, vis.frames), lambda: block(x, cos, sin, vis.windows))

        x = scan_layers(self.blocks, x, step, xs=jnp.asarray(self.full_attention), remat=self.remat)
        return self.merger(x)
