"""Attention backends. Every backend computes the same function; `xla` is the reference.

- `xla`: explicit einsums with a float32 softmax; runs everywhere.
- `dot_product`: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU, XLA elsewhere).
- `pallas_tpu`: the Pallas TPU flash-attention kernel (TPU only; runs in interpret mode on CPU).

Two masks cover every use in the model: causal-with-padding for text (a (B, 1, L, S) boolean mask)
and "first `length` keys of each group" for vision frames and windows, which are gathered into
fixed-size groups beforehand, so no attention matrix ever spans more than one group.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("xla", "dot_product", "pallas_tpu")


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q (B, L, H, D), k/v (B, S, K, D) with H a multiple of K, mask broadcastable to (B, 1, L, S)."""
    b, l, h, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, l, kv_heads, h // kv_heads, d)
    scores = jnp.einsum("blkgd,bskd->bkgls", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgls,bskd->blkgd", probs, v)
    return out.reshape(b, l, h, d)


def _pallas_tpu(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, l, h, d = q.shape
    rep = h // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    # The kernel takes (B, H, L, D) and an additive bias; a block size must divide the lengths.
    bias = jnp.where(jnp.broadcast_to(mask, (b, 1, l, k.shape[1])), 0.0, -1e30).astype(jnp.float32)
    bias = jnp.broadcast_to(bias, (b, h, l, k.shape[1]))
    block = {"block_q": min(128, l), "block_k_major": min(128, k.shape[1]), "block_k": min(128, k.shape[1]),
             "block_b": 1}
    sizes = fa.BlockSizes(**{name: block.get(name, block["block_q"] if "q" in name else block["block_k"])
                             for name in fa.BlockSizes.__dataclass_fields__})
    out = fa.flash_attention(
        *(x.transpose(0, 2, 1, 3) for x in (q, k, v)), ab=bias, sm_scale=d**-0.5, block_sizes=sizes,
        debug=False,
    )
    return out.transpose(0, 2, 1, 3)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, backend: str) -> jax.Array:
    """Masked multi-head attention with grouped KV heads; mask True means "may attend"."""
    if backend == "xla":
        return _xla(q, k, v, mask)
    if backend == "dot_product":
        return jax.nn.dot_product_attention(q, k, v, mask=mask)
    if backend == "pallas_tpu":
        return _pallas_tpu(q, k, v, mask)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")


def causal_mask(segment_q: jax.Array, segment_k: jax.Array, pos_q: jax.Array, pos_k: jax.Array) -> jax.Array:
    """(B, 1, L, S) mask: a query sees earlier-or-same keys of its own segment.

    Segments are 1 for real tokens and 0 for padding, so a padding query attends only to padding
    (never to nothing, which would give NaN in some kernels) and a real one only to real tokens.
    """
    same = segment_q[:, :, None] == segment_k[:, None, :]
    before = pos_q[:, :, None] >= pos_k[:, None, :]
    return (same & before)[:, None]


def group_mask(lengths: jax.Array, size: int) -> jax.Array:
    """(G, 1, T, T) mask for groups whose first `length` slots are real.

    Padding slots attend to each other (keeping them finite); real slots only to real ones.
    """
    real = jnp.arange(size)[None, :] < lengths[:, None]
    return (real[:, :, None] == real[:, None, :])[:, None]
