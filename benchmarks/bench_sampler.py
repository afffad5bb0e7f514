"""Decoding throughput: the stjax sampler vs transformers `generate`, same tiny model, same video
prompt, greedy, 64 new tokens, batch 1 and 8, in one run.

    python benchmarks/bench_sampler.py [--arch qwen2_vl] [--new-tokens 64] [--batches 1 8]

Prints, for each, generated tokens per second end to end (prefill of the video included) and for
the decoding alone (from the time difference between N and 1 new tokens), steady state after
compilation, and the ratios stjax / transformers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import jax
    import torch

    from reference import hf_model, make_batch, tiny_config
    from stjax.models.inputs import prepare_inputs
    from stjax.models.loading import load_pretrained
    from stjax.sampling.sampler import SamplingConfig, generate

    cfg = tiny_config(args.arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = hf_model(cfg).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model, _ = load_pretrained(tmp)
    print(f"{args.arch} tiny model ({cfg.text.num_layers} text / {cfg.vision.depth} vision layers), "
          f"greedy, {args.new_tokens} new tokens, one 8-frame 224x224 video per prompt; "
          f"jax on {jax.devices()[0].device_kind}, torch on {device}")
    for batch_size in args.batches:
        batch = make_batch(cfg, [[20, ("video", 4, 16, 16), 30]] * batch_size, fps=4.0)
        length = batch["input_ids"].shape[1]
        inputs = prepare_inputs(cfg, **batch)
        kwargs = {k: torch.from_numpy(v).to(device) for k, v in batch.items()
                  if k not in ("position_ids", "second_per_grid_ts")}
        kwargs["mm_token_type_ids"] = torch.from_numpy(np.where(batch["input_ids"] == cfg.video_token_id, 2, 0)).to(device)

        def ours(new: int):
            sampling = SamplingConfig(max_new_tokens=new)
            return lambda: generate(model, inputs, length, jax.random.key(0), sampling).tokens.block_until_ready()

        def theirs(new: int):
            def run():
                with torch.no_grad():
                    out = ref.generate(**kwargs, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                       pad_token_id=0)
                if device == "cuda":
                    torch.cuda.synchronize()
                return out
            return run

        runs = {(name, new): make(new) for name, make in (("stjax", ours), ("transformers", theirs))
                for new in (1, args.new_tokens)}
        for fn in runs.values():  # compile / warm up
            fn()
        times = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
        t = {key: float(np.median(v)) for key, v in times.items()}
        n = args.new_tokens
        total = {name: batch_size * n / t[name, n] for name in ("stjax", "transformers")}
        decode = {name: batch_size * (n - 1) / (t[name, n] - t[name, 1]) for name in ("stjax", "transformers")}
        print(f"batch {batch_size}: end to end stjax {total['stjax']:7.0f} tok/s, transformers "
              f"{total['transformers']:6.0f} tok/s ({total['stjax'] / total['transformers']:.1f}x); decoding alone "
              f"stjax {decode['stjax']:7.0f} tok/s, transformers {decode['transformers']:6.0f} tok/s "
              f"({decode['stjax'] / decode['transformers']:.1f}x)")

if __name__ == "__main__":
    main()
