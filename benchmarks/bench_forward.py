"""Forward latency, steady state after compilation: stjax (JAX) vs transformers (PyTorch), same
weights, same inputs, same device, fp32.

    python benchmarks/bench_forward.py [--arch qwen2_5_vl] [--attention xla,cpu_flash] [--frames 8] ...

Default config: text hidden 512 x 4 layers, vision hidden 256 x depth 4, an 8-frame 336x336 video
plus 64 text tokens (Qwen3-VL: 384x384, the same 2304 patches of 16 pixels, three DeepStack layers,
each temporal patch its own timestamped block). Prints the latencies (each stjax attention backend named,
timed in turn with torch) and the ratios torch / stjax (> 1: stjax is faster). On a CPU it also prints a floor: the
forward's FLOPs (the decoder's causal attention at half, real tokens only) at the best
matrix-product rate this machine shows in the same run (a 2048^3 float32 product, the fastest
run of XLA's and PyTorch's), which no implementation beats, and so the largest speed-up over torch possible.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def mid_config(arch: str, scale: int = 1):
    from stjax.models.config import QwenVLConfig
    from stjax.models.families import family

    cfg = QwenVLConfig.from_file(family(arch).tiny_preset)
    qwen3 = arch == "qwen3_vl"
    # Qwen3-VL keeps its decoder's kind (q/k norms, interleaved M-RoPE, head_dim 64 given explicitly).
    text = dataclasses.replace(
        cfg.text,
        vocab_size=8192,
        hidden_size=512 * scale,
        intermediate_size=1536 * scale,
        num_layers=4 * scale,
        num_heads=8 * scale,
        num_kv_heads=2 * scale,
        mrope_section=(12, 10, 10) if qwen3 else (8, 12, 12),
        explicit_head_dim=64 if qwen3 else None,
    )
    depth = 4 * scale
    vision = cfg.vision.__class__(
        **{
            **cfg.vision.__dict__,
            "depth": depth,
            "hidden_size": 256 * scale,
            "num_heads": 4 * scale,
            "intermediate_size": 1024 * scale,
            "out_hidden_size": 512 * scale,
            "fullatt_block_indexes": tuple(range(depth // 2 - 1, depth, depth // 2)) if arch == "qwen2_5_vl" else (),
            "num_position_embeddings": 2304 if qwen3 else 0,
            "deepstack_visual_indexes": tuple(range(depth - 1)) if qwen3 else (),
        }
    )
    return cfg.replace(text=text, vision=vision, initializer_range=0.02)


def interleaved_medians(fns: list, repeats: int) -> list[float]:
    """Median wall time of each function, run in turn so that machine load hits all alike."""
    for fn in fns:  # compile / warm up
        fn()
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def forward_flops(cfg, tokens: int, video_grid) -> float:
    """FLOPs of one forward of `tokens` tokens with one video of grid (t, h, w): a third of the
    training count (`stjax.train.metrics`), with the decoder's causal attention at half (the work
    a kernel that skips the masked half does)."""
    from stjax.train.metrics import model_flops_per_token, vision_flops_per_patch

    t = cfg.text
    patches = int(np.prod(video_grid))
    text = model_flops_per_token(cfg, tokens) / 3 - 2 * t.num_layers * tokens * t.num_heads * t.head_dim
    return tokens * text + patches * vision_flops_per_patch(cfg, patches // int(video_grid[0])) / 3


def best_matmul_rate(repeats: int = 15) -> float:
    """FLOP/s of a 2048^3 float32 matrix product: the fastest of `repeats` runs each of XLA and
    PyTorch (the fastest, not the median: what the cores can do when nothing else runs)."""
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = np.random.default_rng(0).normal(size=(n, n)).astype(np.float32)
    x, ta = jnp.asarray(a), torch.from_numpy(a)
    matmul = jax.jit(jnp.matmul)
    best = np.inf
    for fn in [lambda: matmul(x, x).block_until_ready(), lambda: ta @ ta] * repeats:
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2_5_vl", choices=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument(
        "--size",
        type=int,
        default=0,
        help="frame side in pixels, a multiple of patch x merge (default 336; Qwen3-VL 384)",
    )
    parser.add_argument("--text", type=int, default=64, help="text tokens around the video")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--attention", default="cpu_flash", help="stjax attention backends, comma-separated (each timed)"
    )
    parser.add_argument("--torch-attention", default="sdpa", help="transformers attn_implementation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and compute")
    parser.add_argument("--scale", type=int, default=1, help="multiply widths and depths (GPU runs)")
    args = parser.parse_args()

    import jax
    import torch
    from reference import hf_model, make_batch

    from stjax.models.inputs import prepare_inputs
    from stjax.models.loading import load_pretrained
    from stjax.models.qwen_vl import compiled_forward

    cfg = mid_config(args.arch, args.scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = hf_model(cfg, dtype=getattr(torch, args.dtype)).to(device)
    ref.set_attn_implementation(args.torch_attention)
    args.size = args.size or (384 if cfg.model_type == "qwen3_vl" else 336)
    grid = args.size // cfg.vision.patch_size
    prompt = [[args.text // 2, ("video", args.frames // 2, grid, grid), args.text - args.text // 2]]
    if cfg.model_type == "qwen3_vl":  # the processor's layout and transformers' own position ids
        from test_qwen3_vl import hf_positions
        from test_qwen3_vl import make_batch as qwen3_batch

        batch = qwen3_batch(cfg, prompt)
        batch["position_ids"] = hf_positions(ref, cfg, batch)
    else:
        batch = make_batch(cfg, prompt)
    backends = args.attention.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        models = [load_pretrained(tmp, attention=backend)[0] for backend in backends]
    inputs = jax.device_put(prepare_inputs(cfg, **batch))
    ours = [lambda model=model: compiled_forward(model, inputs).block_until_ready() for model in models]
    torch_batch = {k: torch.from_numpy(np.asarray(v)).to(device) for k, v in batch.items() if k != "second_per_grid_ts"}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in torch_batch:
            torch_batch[k] = torch_batch[k].to(ref.dtype)

    def theirs():
        with torch.no_grad():
            logits = ref(**torch_batch).logits
        if device == "cuda":
            torch.cuda.synchronize()
        return logits

    ref_logits = theirs().float().cpu().numpy()
    errs = [
        np.abs(np.asarray(fn())[:, : batch["input_ids"].shape[1]] - ref_logits).max() / np.abs(ref_logits).max()
        for fn in ours
    ]

    *t_jax, t_torch = interleaved_medians([*ours, theirs], args.repeats)
    tokens = batch["input_ids"].shape[1]
    print(
        f"device: jax {jax.devices()[0].device_kind}, torch {device} ({torch.get_num_threads()} threads), {args.dtype}"
    )
    print(
        f"{args.arch}: {args.frames} frames {args.size}x{args.size}, {tokens} tokens "
        f"({cfg.vision.depth} vision / {cfg.text.num_layers} text layers)"
    )
    for backend, t, err in zip(backends, t_jax, errs):
        print(f"stjax  forward: {t * 1e3:8.1f} ms  (attention={backend}; relative logit error {err:.1e})")
    print(f"torch  forward: {t_torch * 1e3:8.1f} ms  (attn_implementation={args.torch_attention})")
    for backend, t in zip(backends, t_jax):
        print(f"speed-up stjax ({backend}) vs torch: {t_torch / t:.2f}x")
    if jax.default_backend() == "cpu" and args.dtype == "float32":
        flops = forward_flops(cfg, tokens, batch["video_grid_thw"][0])
        rate = best_matmul_rate()
        floor = flops / rate
        print(
            f"floor: {flops / 1e9:.1f} GFLOP at {rate / 1e9:.0f} GFLOP/s (the best 2048^3 float32 matrix product "
            f"here) take {floor * 1e3:.0f} ms: at most {t_torch / floor:.2f}x faster than torch; stjax runs at "
            f"{flops / min(t_jax) / 1e9:.0f} GFLOP/s, {100 * floor / min(t_jax):.0f}% of that rate"
        )


if __name__ == "__main__":
    main()
