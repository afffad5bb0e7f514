"""The Qwen2 decoder with grouped-query attention and multimodal rotary embeddings (M-RoPE)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stjax.models.attention import attend
from stjax.models.config import QwenVLConfig, TextConfig
from stjax.models.layers import ACTIVATIONS, Linear, RMSNorm, apply_rotary, scan_layers, stack_layers


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin (B, L, head_dim) from (3, B, L) positions.

    Frequency slot i of the head_dim/2 rotary frequencies takes its position from the T, H or W
    stream in consecutive chunks of `mrope_section` (not interleaved), then the angles are doubled
    like ordinary rotary embeddings.
    """
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, cfg.head_dim, 2, dtype=jnp.float32) / cfg.head_dim))
    stream = np.repeat(np.arange(3), cfg.mrope_section)  # static: which stream feeds each frequency
    positions = jnp.asarray(position_ids, jnp.float32)[stream]  # (head_dim / 2, B, L)
    angles = jnp.moveaxis(positions, 0, -1) * inv_freq  # (B, L, half)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        t = cfg.text
        kw = dict(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
        lin = dict(std=cfg.initializer_range, rngs=rngs, **kw)
        kv = t.num_kv_heads * t.head_dim
        self.input_layernorm = RMSNorm(t.hidden_size, "embed", eps=t.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(t.hidden_size, "embed", eps=t.rms_norm_eps, **kw)
        self.q_proj = Linear(t.hidden_size, t.num_heads * t.head_dim, ("embed", "heads"), bias=True, **lin)
        self.k_proj = Linear(t.hidden_size, kv, ("embed", "kv_heads"), bias=True, **lin)
        self.v_proj = Linear(t.hidden_size, kv, ("embed", "kv_heads"), bias=True, **lin)
        self.o_proj = Linear(t.num_heads * t.head_dim, t.hidden_size, ("heads", "embed"), bias=False, **lin)
        self.gate_proj = Linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, **lin)
        self.up_proj = Linear(t.hidden_size, t.intermediate_size, ("embed", "mlp"), bias=False, **lin)
        self.down_proj = Linear(t.intermediate_size, t.hidden_size, ("mlp", "embed"), bias=False, **lin)
        self.act = ACTIVATIONS[t.hidden_act]
        self.heads, self.kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        self.backend = cfg.attention

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array) -> jax.Array:
        b, l, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).reshape(b, l, self.heads, self.head_dim)
        k = self.k_proj(h).reshape(b, l, self.kv_heads, self.head_dim)
        v = self.v_proj(h).reshape(b, l, self.kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        x = x + self.o_proj(attend(q, k, v, segments, segments, True, self.backend).reshape(b, l, -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(self.act(self.gate_proj(h)) * self.up_proj(h))


class TextModel(nnx.Module):
    """Embeddings, the stacked decoder layers (run with a scan) and the final norm."""

    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        t = cfg.text
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(init(rngs.params(), (t.vocab_size, t.hidden_size), cfg.param_dtype),
                                      axes=("vocab", "embed"))
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, r), t.num_layers, rngs)
        self.norm = RMSNorm(t.hidden_size, "embed", eps=t.rms_norm_eps, param_dtype=cfg.param_dtype,
                            compute_dtype=cfg.compute_dtype)
        self.cfg = t
        self.remat = cfg.remat
        self.compute_dtype = cfg.compute_dtype

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...][input_ids].astype(self.compute_dtype)

    def __call__(self, x: jax.Array, position_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        cos, sin = mrope_cos_sin(position_ids, self.cfg)
        step = lambda layer, x, _: layer(x, cos, sin, attention_mask)
        x = scan_layers(self.layers, x, step, remat=self.remat)
        return self.norm(x)
