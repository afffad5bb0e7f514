"""Conversion of a full-size checkpoint: time and peak RSS of HF -> stjax and stjax -> HF, and a
bit-exact check of the round trip.

    python benchmarks/bench_convert.py [--preset qwen2.5-vl-7b] [--dtype bfloat16] [--workdir DIR]

The script writes a random checkpoint of the preset's shapes (sharded safetensors, 5 GB shards),
runs both converter commands as child processes, reads each child's peak resident memory from the
kernel (wait4), and compares every tensor of the result with the original, byte for byte.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stjax.models.config import QwenVLConfig  # noqa: E402
from stjax.models.loading import hf_shape, param_shapes  # noqa: E402
from stjax.models.safetensors_io import (  # noqa: E402
    PlannedTensor,
    SafetensorsReader,
    differing_tensors,
    write_safetensors,
)
from stjax.models.weights import num_layers, rules  # noqa: E402


def random_checkpoint(cfg: QwenVLConfig, directory: Path, dtype: np.dtype) -> int:
    """Random weights of every tensor, written one at a time (a shared random pool, shifted per tensor)."""
    pool = (np.random.default_rng(0).standard_normal(1 << 24, np.float32) * 0.02).astype(dtype)
    shapes = param_shapes(cfg)
    plan, offset = [], 0
    for rule in rules(cfg):
        shape = shapes[rule.path]
        layers = num_layers(cfg, rule) if rule.stacked else None
        one = hf_shape(rule, shape[1:] if layers else shape, cfg)
        for i in range(layers) if layers else [None]:
            size = int(np.prod(one))
            start = offset % len(pool)
            offset += 7919
            make = lambda size=size, start=start, one=one: np.resize(np.roll(pool, -start), size).reshape(one)
            plan.append(PlannedTensor(rule.hf.format(i=i), one, dtype, make))
    write_safetensors(directory, plan)
    cfg.replace(param_dtype=str(dtype)).save(directory)
    return sum(t.nbytes for t in plan)


def run_measured(args: list[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{args} failed with status {status}")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen2.5-vl-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--text-layers", type=int, default=None, help="override the depth (a quick smaller run)")
    parser.add_argument("--workdir", default=None, help="where to write the three checkpoints (default: a temp dir)")
    args = parser.parse_args()
    cfg = QwenVLConfig.from_file(args.preset)
    if args.text_layers:
        cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "num_layers": args.text_layers}))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="stjax-convert-"))
    hf, stjax, back = work / "hf", work / "stjax", work / "back"
    try:
        start = time.perf_counter()
        size = random_checkpoint(cfg, hf, np.dtype(args.dtype))
        print(
            f"{args.preset} ({args.dtype}): {size / 1e9:.2f} GB checkpoint written in "
            f"{time.perf_counter() - start:.0f} s"
        )
        t1, rss1 = run_measured([str(ROOT / "convert/to_stjax.py"), str(hf), str(stjax)])
        print(f"HF -> stjax: {t1:6.1f} s, peak RSS {rss1 / 1e9:6.2f} GB = {rss1 / size:.2f} x checkpoint")
        t2, rss2 = run_measured([str(ROOT / "convert/to_hf.py"), str(stjax), str(back)])
        print(f"stjax -> HF: {t2:6.1f} s, peak RSS {rss2 / 1e9:6.2f} GB = {rss2 / size:.2f} x checkpoint")
        differ = differing_tensors(hf, back)
        if differ:
            raise SystemExit(f"round trip changed {len(differ)} tensors, e.g. {differ[:3]}")
        count = len(SafetensorsReader(hf).tensors)
        print(f"round trip bit-exact: {count} tensors, same names, shapes, dtypes and bytes")
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
