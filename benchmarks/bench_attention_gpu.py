"""Causal attention forward and forward + backward on one device, in isolation from the model: the
decoder's `attend` with each backend, against `jax.nn.dot_product_attention` told the mask is causal
(`is_causal=True`, no mask array), which on a GPU lets cuDNN skip the bias and its gradient.

    python benchmarks/bench_attention_gpu.py [--batch 1] [--seq 4096] [--heads 12] [--kv-heads 2] [--head-dim 128]
    python benchmarks/bench_attention_gpu.py --smoke      # small shapes, any device

The SFT step on an H100 spent 2.9x its forward in the backward (BENCHMARKS.md, third session);
this tells how much of that is attention. Since the fourth session `attend`'s `dot_product` tells
cuDNN "causal" itself (skipping the tiles past the diagonal) and passes the segments as a bias;
since the fifth, rows known to be right-padded (`right_padded=True`, the trainer's batches) go
without the bias, which should time as the plain `is_causal` call.
FLOPs: 4 B H L^2 D forward (QK and PV), counted in full although causal attention needs half;
forward + backward 3.5x that (the backward recomputes the scores). Outputs are checked against the
`xla` backend (bf16: max abs difference over max abs output).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--smoke", action="store_true", help="small shapes (CPU: seconds)")
    args = parser.parse_args()
    if args.smoke:
        args.seq, args.heads, args.kv_heads, args.head_dim = 256, 4, 2, 32

    import jax
    import jax.numpy as jnp
    import numpy as np
    from bench_forward import interleaved_medians

    from stjax.models.attention import attend

    b, l, h, kv, d = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, l, h, d), args.dtype)
    k = jax.random.normal(keys[1], (b, l, kv, d), args.dtype)
    v = jax.random.normal(keys[2], (b, l, kv, d), args.dtype)
    segments = jnp.ones((b, l), jnp.int32)
    variants = {
        f"attend backend={name}": (lambda q, k, v, name=name: attend(q, k, v, segments, segments, True, name))
        for name in ("xla", "dot_product")
    }
    variants["attend backend=dot_product right_padded"] = lambda q, k, v: attend(
        q, k, v, segments, segments, True, "dot_product", right_padded=True
    )
    cudnn = jax.default_backend() == "gpu" and args.dtype == "bfloat16"
    variants["dot_product_attention is_causal" + (" (cuDNN)" if cudnn else "")] = lambda q, k, v: (
        jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn" if cudnn else None)
    )

    flops = 4 * b * h * l * l * d
    print(
        f"device {jax.devices()[0].device_kind}; {b} x {l} tokens, {h} heads ({kv} KV), head dim {d}, {args.dtype}; "
        f"{flops / 1e9:.1f} GFLOP forward (full square)"
    )
    reference = np.asarray(jax.jit(variants["attend backend=xla"])(q, k, v), np.float32)
    for name, fn in variants.items():
        forward = jax.jit(fn)
        grads = jax.jit(
            jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2), argnums=(0, 1, 2))
        )
        out = np.asarray(forward(q, k, v), np.float32)
        err = np.abs(out - reference).max() / np.abs(reference).max()
        t_fwd, t_both = interleaved_medians(
            [lambda: jax.block_until_ready(forward(q, k, v)), lambda: jax.block_until_ready(grads(q, k, v))], 10
        )
        print(
            f"  {name:45s} forward {t_fwd * 1e3:8.2f} ms ({flops / t_fwd / 1e12:6.1f} TFLOP/s)  "
            f"forward + backward {t_both * 1e3:8.2f} ms ({3.5 * flops / t_both / 1e12:6.1f} TFLOP/s)  "
            f"backward / forward {(t_both - t_fwd) / t_fwd:4.1f}  vs xla {err:.1e}"
        )


if __name__ == "__main__":
    main()
