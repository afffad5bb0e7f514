"""Input pipeline speed: samples/s of decode + preprocess for 8-frame samples, and where the time goes.

    python benchmarks/bench_data.py [--walks 8] [--workers 0 1 2]

Builds a synthetic set (224x224 walks, which the recipe upscales to 336x336: 8 frames -> 4x24x24 =
2304 patches and 576 video tokens per sample), then
  1. times each stage for every sample in one process: decode (open + seek + decode the 8 kept
     frames), resize (PIL bicubic), patchify (normalise + patch order), tokenise (chat template,
     tokenizer, pad expansion, M-RoPE positions);
  2. runs the grain loader (batch 1, SFT template) with 0, 1 and 2 worker processes and reports
     steady-state samples/s (after the first batch, so worker start-up is excluded) and start-up time.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from stjax.data.formats import read_plain_jsonl
from stjax.data.loader import LoaderConfig, make_loader
from stjax.data.processor import Processor, user_text, vision_patches
from stjax.data.synthetic import generate
from stjax.data.video import MediaConfig, VideoClip, _pick_backend, _Reader, frame_plan, resize_frames, video_size


def stage_times(samples, processor: Processor) -> dict[str, float]:
    """Mean seconds per sample of each stage, run in this process."""
    cfg = processor.media
    totals = {"decode": 0.0, "resize": 0.0, "patchify": 0.0, "tokenise": 0.0}
    for sample in samples:
        t0 = time.perf_counter()
        reader = _Reader(sample.video, _pick_backend(cfg.backend))
        indices, n = frame_plan(reader.total_frames, reader.video_fps, cfg)
        frames = reader.get(indices)
        t1 = time.perf_counter()
        frames = resize_frames(frames, *video_size(frames.shape[1], frames.shape[2], n, cfg))
        t2 = time.perf_counter()
        vision_patches(frames, cfg)
        t3 = time.perf_counter()
        fps = n / reader.total_frames * reader.video_fps
        clip = VideoClip(frames, indices, reader.total_frames, reader.video_fps, fps, 2 / fps)
        processor.encode(user_text(sample, "sft"), videos=[clip], target=sample.solution)
        t4 = time.perf_counter()
        totals["decode"] += t1 - t0
        totals["resize"] += t2 - t1
        totals["patchify"] += t3 - t2
        # encode() patchifies again; subtract that to leave the text side
        totals["tokenise"] += max(0.0, (t4 - t3) - (t3 - t2))
    return {k: v / len(samples) for k, v in totals.items()}


def loader_rate(samples, processor: Processor, workers: int) -> tuple[float, float]:
    """(steady-state samples/s, seconds to the first batch)."""
    cfg = LoaderConfig(batch_size=1, num_workers=workers, shard_index=0, shard_count=1)
    start = time.perf_counter()
    it = iter(make_loader(samples, processor, cfg))
    next(it)
    first = time.perf_counter()
    count = sum(1 for _ in it)
    end = time.perf_counter()
    it.close()
    return count / (end - first), first - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--walks", type=int, default=8, help="synthetic walks (6 samples each)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backend", default="auto", choices=["auto", "decord", "pyav"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = generate(Path(tmp), n=args.walks, seed=0, sheet=0)
        samples = read_plain_jsonl(out / "plain.jsonl").samples
        processor = Processor.from_pretrained(out / "tokenizer", media=MediaConfig(backend=args.backend))
        example = processor(samples[0], "sft")
        print(f"{len(samples)} samples, {os.cpu_count()} CPUs, backend {_pick_backend(args.backend)}")
        print(
            f"per sample: grid {example['video_grid_thw'].tolist()}, {len(example['input_ids'])} tokens, "
            f"pixel_values_videos {example['pixel_values_videos'].shape}"
        )
        stage_times(samples[:4], processor)  # warm up
        stages = stage_times(samples, processor)
        total = sum(stages.values())
        print(
            "stage ms/sample: "
            + ", ".join(f"{k} {1000 * v:.1f}" for k, v in stages.items())
            + f", sum {1000 * total:.1f}"
        )
        for workers in args.workers:
            rate, startup = loader_rate(samples, processor, workers)
            print(f"loader workers={workers}: {rate:.1f} samples/s (first batch after {startup:.1f} s)")


if __name__ == "__main__":
    main()
