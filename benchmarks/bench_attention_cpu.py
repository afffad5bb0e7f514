"""Attention alone on the CPU at bench_forward's shapes: stjax's `xla` and `cpu_flash` backends
against PyTorch's `scaled_dot_product_attention`, forward and forward + backward, float32.

    python benchmarks/bench_attention_cpu.py [--repeats 9]

Cases: Qwen2-VL's frame groups (4 frames x 576 patches, 4 heads x 64), Qwen2.5-VL's windows (36
windows x 64 patches) and causal decoder text (704 tokens, 8 query heads on 2 KV heads x 64). The
three sides are timed in turn (median); outputs and gradients are checked against `xla`.
"""

from __future__ import annotations

import argparse

import numpy as np

CASES = {  # batch (groups), tokens, query heads, KV heads, head size, causal
    "Qwen2-VL frames": (4, 576, 4, 4, 64, False),
    "Qwen2.5-VL windows": (36, 64, 4, 4, 64, False),
    "causal text": (1, 704, 8, 2, 64, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from bench_forward import interleaved_medians

    from stjax.models import cpu_attention
    from stjax.models.attention import attend

    assert cpu_attention.available(), "cpu_flash could not be built (see the warning above)"
    print(
        f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), float32; median of {args.repeats}, in turn"
    )
    rng = np.random.default_rng(0)
    for name, (b, n, h, kv, d, causal) in CASES.items():
        q = rng.standard_normal((b, n, h, d), np.float32)
        k, v = (rng.standard_normal((b, n, kv, d), np.float32) for _ in range(2))
        seg = np.ones((b, n), np.int32)

        def ours(backend):
            forward = jax.jit(lambda q, k, v: attend(q, k, v, seg, seg, causal, backend))
            grads = jax.jit(
                jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v, seg, seg, causal, backend) ** 2), argnums=(0, 1, 2))
            )
            return (lambda: jax.block_until_ready(forward(q, k, v)), lambda: jax.block_until_ready(grads(q, k, v)))

        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal, enable_gqa=True)

        def torch_forward():
            with torch.no_grad():
                return sdpa()

        def torch_grads():
            (sdpa() ** 2).sum().backward()
            return [t.grad for t in (tq, tk, tv)]

        (xla_f, xla_g), (flash_f, flash_g) = ours("xla"), ours("cpu_flash")
        err = max(
            float(np.abs(np.asarray(a) - np.asarray(r)).max() / np.abs(np.asarray(r)).max())
            for a, r in zip(flash_g(), xla_g())
        )
        times = interleaved_medians([xla_f, flash_f, torch_forward, xla_g, flash_g, torch_grads], args.repeats)
        (fx, ff, ft, gx, gf, gt) = (1e3 * t for t in times)
        print(
            f"{name} ({b} x {n} tokens, {h} heads / {kv} KV x {d}{', causal' if causal else ''}); "
            f"cpu_flash gradients vs xla {err:.1e}"
        )
        print(
            f"  forward           xla {fx:7.1f} ms  cpu_flash {ff:7.1f} ms  torch {ft:7.1f} ms  "
            f"torch / cpu_flash {ft / ff:.2f}x"
        )
        print(
            f"  forward+backward  xla {gx:7.1f} ms  cpu_flash {gf:7.1f} ms  torch {gt:7.1f} ms  "
            f"torch / cpu_flash {gt / gf:.2f}x"
        )


if __name__ == "__main__":
    main()
