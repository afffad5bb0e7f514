"""Attention backends. Every backend computes the same function; `xla` is the reference.

The platform is that of the mesh the program is traced under (`platform`), so a program compiled
here for a TPU topology takes the TPU's choices.

- `auto` (the default): the platform's fused kernel: `cpu_flash` on CPUs, `dot_product` on GPUs,
  `xla` on TPUs (there `pallas_tpu` is opt-in until it has been checked on a TPU).

- `xla`: explicit einsums with a float32 softmax; runs everywhere.
- `dot_product`: `jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU in bf16/fp16, XLA
  elsewhere (see `_dot_product`).
- `pallas_tpu`: the Pallas TPU flash-attention kernel (on TPU; in interpret mode elsewhere, which
  is slow and meant for tests).
- `cpu_flash`: stjax's fused CPU kernel (`cpu_attention`), float32 inside; `xla` elsewhere, for
  decoding steps (fewer than 16 queries), and where the kernel cannot be built.

The mask is given as segment ids, which every kernel understands: a query attends to keys of the
same segment (and, when causal, not to later ones). Text uses segment 1 for real tokens and 0 for
padding; vision groups use 1 for real slots and 0 for padding. Padding queries thus attend to
padding keys, never to nothing (an empty softmax row gives NaN in some kernels).
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from stjax.models import cpu_attention
from stjax.sharding import batch_mesh_axes

BACKENDS = ("auto", "xla", "dot_product", "pallas_tpu", "cpu_flash")
_PALLAS_BLOCK = 128  # the TPU kernel's block size; sequences are padded to a multiple of it


def platform() -> str:
    """The platform the traced program is for: that of the current mesh's devices (`jax.set_mesh`;
    a program compiled here for a TPU topology is a TPU program), else the default backend's.
    CUDA and ROCm read as "gpu"."""
    mesh = jax.sharding.get_abstract_mesh()
    name = jax.default_backend() if mesh.empty else mesh.abstract_device.platform
    return "gpu" if name in ("cuda", "rocm") else name


def segment_mask(segment_q: jax.Array, segment_k: jax.Array, causal: bool, q_offset=0) -> jax.Array:
    """(B, 1, L, S) boolean mask. Causal: query i sits at key slot q_offset + i (0 for a full
    forward or a prefill, the cache position when decoding) and sees keys at or before it."""
    mask = segment_q[:, :, None] == segment_k[:, None, :]
    if causal:
        slots_q = q_offset + jnp.arange(segment_q.shape[1])
        mask &= slots_q[:, None] >= jnp.arange(segment_k.shape[1])[None, :]
    return mask[:, None]


def _xla(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q (B, L, H, D), k/v (B, S, K, D) with H a multiple of K; mask broadcastable to (B, 1, L, S).

    The query heads that share a KV head are folded into the query axis, so each KV head is one
    plain batched matmul (no repeated K/V, no 5-D contraction XLA would transpose around).
    """
    b, l, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    q = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, l, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * l, d)
    scores = jnp.einsum("bkqd,bskd->bkqs", q, k, preferred_element_type=jnp.float32).reshape(b, kv, g, l, s)
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kv, g * l, s)
    out = jnp.einsum("bkqs,bskd->bkqd", probs, v).reshape(b, kv, g, l, d)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, l, h, d)


def _dot_product(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, is_causal: bool, lengths: jax.Array | None = None
) -> jax.Array:
    """`jax.nn.dot_product_attention`: the cuDNN fused kernel on GPUs in 16-bit dtypes (the mask
    becomes an additive bias), XLA's own attention elsewhere and wherever cuDNN declines the shapes
    (jax picks XLA unless the implementation is named). `is_causal` adds the causal mask;
    `lengths` (B,), for queries and keys that are one right-padded sequence: each row keeps its
    first keys only (cuDNN's padding mask: no bias). The query lengths are passed as well: left
    out, jax makes them a constant, which its cuDNN batching rule cannot reshape under a `vmap`
    whose lengths are batched (the vision tower's per-sample vmap)."""
    kw = dict(mask=mask, is_causal=is_causal, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    if platform() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        try:
            return jax.nn.dot_product_attention(q, k, v, **kw, implementation="cudnn")
        except (ValueError, NotImplementedError) as e:  # raised while tracing: head size, layout, ...
            logging.getLogger(__name__).warning("cuDNN attention unavailable (%s); using XLA", e)
    return jax.nn.dot_product_attention(q, k, v, **kw)


def _pallas_kernel(q, k, v, segment_q, segment_k, causal: bool, interpret: bool) -> jax.Array:
    """The Pallas TPU flash-attention kernel on whole arrays: q (B, L, H, D), k/v (B, S, K, D); queries
    and keys both start at slot 0 (S >= L: a prefill into a longer cache)."""
    from jax.experimental.pallas import tpu as pltpu
    from jax.experimental.pallas.ops.tpu import flash_attention as fa

    b, l, h, d = q.shape
    rep = h // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, -n % _PALLAS_BLOCK), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    s = k.shape[1]
    q, k, v = pad(q, l), pad(k, s), pad(v, s)
    # Sequence padding gets its own segment (-1), so it never mixes with real tokens.
    segments = fa.SegmentIds(
        q=jnp.pad(segment_q, ((0, 0), (0, -l % _PALLAS_BLOCK)), constant_values=-1),
        kv=jnp.pad(segment_k, ((0, 0), (0, -s % _PALLAS_BLOCK)), constant_values=-1),
    )
    blocks = fa.BlockSizes(**{f: _PALLAS_BLOCK for f in fa.BlockSizes.__dataclass_fields__})
    blocks = dataclasses.replace(blocks, block_b=1)

    def run():
        return fa.flash_attention(q, k, v, segment_ids=segments, causal=causal, sm_scale=d**-0.5, block_sizes=blocks)

    if interpret:
        with pltpu.force_tpu_interpret_mode():
            out = run()
    else:
        out = run()
    return out.transpose(0, 2, 1, 3)[:, :l]


def _pallas_tpu(q, k, v, segment_q, segment_k, causal: bool, split_batch: bool = True) -> jax.Array:
    """`_pallas_kernel` (interpret mode off TPUs), under `shard_map` on a mesh: a Mosaic kernel cannot
    be partitioned by XLA, so each device runs it on its rows (the batch rule's axes, unless
    `split_batch` is False: inside the vision tower's per-sample vmap, whose `spmd_axis_name` splits
    the rows) and its heads (the tensor axis, when it divides the KV heads)."""
    kernel = functools.partial(_pallas_kernel, causal=causal, interpret=platform() != "tpu")
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_q, segment_k)
    rows = (batch_mesh_axes(q.shape[0]) if split_batch else ()) or None
    tensor = mesh.shape.get("tensor", 1)
    heads = "tensor" if tensor > 1 and k.shape[2] % tensor == 0 else None
    spec, segments = PartitionSpec(rows, None, heads, None), PartitionSpec(rows, None)
    return jax.shard_map(kernel, in_specs=(spec, spec, spec, segments, segments), out_specs=spec, check_vma=False)(
        q, k, v, segment_q, segment_k
    )


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_q: jax.Array,
    segment_k: jax.Array,
    causal: bool,
    backend: str,
    q_offset=0,
    right_padded: bool = False,
    split_batch: bool = True,
) -> jax.Array:
    """Multi-head attention with grouped KV heads. q (B, L, H, D), k/v (B, S, K, D), segments (B, L|S).

    `q_offset` places the queries inside a longer key sequence (a KV cache); the Pallas kernel
    serves a static offset 0 (full sequences, prefills) and the rest falls back to `xla` there.
    `split_batch` False: the batch axis is already split by an enclosing vmap's `spmd_axis_name`.
    `right_padded` (static) promises that each row's real tokens come first, which `dot_product` exploits:
    causal attention then gives the real tokens their outputs without a padding mask, and attention without the causal
    mask (the vision groups) masks by each row's count of real keys; `cpu_flash` lets padding
    queries see no key at all, so that its kernel skips their tiles. Either way the outputs of
    padding queries are never used.
    """
    if backend == "auto":
        backend = {"cpu": "cpu_flash", "gpu": "dot_product"}.get(platform(), "xla")
    if backend == "dot_product":
        # Told that the mask is causal, cuDNN skips the key tiles past the diagonal (half the work
        # of a long causal row); the segments then ride along as the bias, unless the rows are
        # right-padded: then there is no bias at all (cuDNN neither reads one nor computes its
        # gradient). Only for a full sequence: the kernel's causal mask knows no query offset.
        fused_causal = causal and isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
        if fused_causal and right_padded:
            return _dot_product(q, k, v, None, is_causal=True)
        if not causal and right_padded:
            # A group of padding alone keeps one key, so that no softmax row is empty.
            lengths = jnp.maximum(jnp.sum(segment_k != 0, axis=1), 1).astype(jnp.int32)
            return _dot_product(q, k, v, None, is_causal=False, lengths=lengths)
        mask = segment_mask(segment_q, segment_k, causal and not fused_causal, q_offset)
        return _dot_product(q, k, v, mask, is_causal=fused_causal)
    if backend == "cpu_flash" and cpu_attention.supports(q):
        if right_padded:  # padding queries see no key (zero output) and the kernel skips their tiles
            segment_q, segment_k = jnp.where(segment_q != 0, segment_q, -1), jnp.where(segment_k != 0, segment_k, -2)
        return cpu_attention.attention(q, k, v, segment_q, segment_k, causal, q_offset)
    if backend == "pallas_tpu" and isinstance(q_offset, int) and q_offset == 0:
        return _pallas_tpu(q, k, v, segment_q, segment_k, causal, split_batch)
    if backend in BACKENDS:
        return _xla(q, k, v, segment_mask(segment_q, segment_k, causal, q_offset))
    raise ValueError(f"unknown attention backend {backend!r}; choose from {BACKENDS}")
