"""Compile time of the Qwen2.5-VL-7B-shaped forward as a function of depth (abstract: nothing runs
and no weights are allocated). Layers are scanned, so compile time should not grow with depth.

    python benchmarks/bench_compile.py [--preset qwen2.5-vl-7b] [--layers 4 8 28] [--tokens 1024]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-vl-7b")
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 8, 28])
    parser.add_argument("--tokens", type=int, default=1024, help="text length (with the video pads)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    from stjax.models.config import QwenVLConfig
    from stjax.models.inputs import prepare_inputs
    from stjax.models.qwen_vl import _forward, abstract_model

    base = QwenVLConfig.from_file(args.preset, param_dtype=args.dtype, compute_dtype=args.dtype)
    grid = (4, 24, 24)  # 8 frames at 336 x 336
    pads = int(np.prod(grid)) // 4
    ids = np.full((1, args.tokens), 100, np.int64)
    ids[0, 10 : 10 + pads] = base.video_token_id
    pixels = np.zeros((int(np.prod(grid)), base.vision.patch_dim), np.float32)
    inputs = prepare_inputs(
        base, ids, pixel_values_videos=pixels, video_grid_thw=np.array([grid]), second_per_grid_ts=np.array([2.0])
    )
    abstract_inputs = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(args.dtype) if a.dtype.kind == "f" else a.dtype), inputs
    )

    def compile_once(layers: int) -> tuple[float, float, float]:
        cfg = base.replace(text=base.text.__class__(**{**base.text.__dict__, "num_layers": layers}))
        graphdef, state = nnx.split(abstract_model(cfg))
        start = time.perf_counter()
        lowered = _forward.lower(graphdef, state, abstract_inputs)
        lower_s = time.perf_counter() - start
        lowered.compile()
        params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state)) / 1e9
        return params, lower_s, time.perf_counter() - start

    print(f"{args.preset} shapes, {args.dtype}, {args.tokens} tokens with an 8-frame 336x336 video")
    compile_once(1)  # the first compile pays the backend's one-time set-up; not reported
    for layers in args.layers:
        params, lower_s, total = compile_once(layers)
        print(f"text layers {layers:3d} ({params:5.2f}B params): lower {lower_s:5.2f} s, lower+compile {total:6.2f} s")


if __name__ == "__main__":
    main()
