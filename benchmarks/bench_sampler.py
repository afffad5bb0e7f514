"""Decoding throughput: the stjax sampler vs transformers `generate`, same tiny model, same video
prompt, greedy, 64 new tokens, batch 1 and 8, in one run.

    python benchmarks/bench_sampler.py [--arch qwen2_vl] [--new-tokens 64] [--batches 1 8] [--repeats 15]

Prints, for each, generated tokens per second end to end (prefill of the video included) and for the
decoding alone, steady state after compilation, and the ratios stjax / transformers.

Decoding alone is the time of new tokens 2..N, measured so that it cannot come out negative:
- transformers: timestamps taken inside `generate`'s loop (a stopping criterion, called after each
  token), last minus first, in each run;
- stjax (prefill and decode loop are one compiled program): in each repeat, a run of N tokens and, right
  after or before it, the same program shape stopped after its first token (every id an end token),
  so both have the same prefill and cache; the decode time is the difference within each pair.
The median over repeats is reported, and only when the spread (interquartile range) of the per-repeat
times is under half of it; otherwise the line says the noise swamps the figure.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def decode_rate(tokens: int, seconds: list[float]) -> tuple[float | None, str]:
    """(tokens / median seconds, a note), or (None, why) when the median is not positive or the
    interquartile range of `seconds` is half the median or more: then the noise swamps the figure."""
    median = float(np.median(seconds))
    q1, q3 = np.percentile(seconds, [25, 75])
    spread = float(q3 - q1)
    if median <= 0 or spread >= median / 2:
        return (
            None,
            f"unresolved: {median * 1e3:.2f} ms with a spread of {spread * 1e3:.2f} ms over {len(seconds)} repeats",
        )
    return tokens / median, f"spread {100 * spread / median:.0f}%"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()

    import jax
    import torch
    from reference import hf_model, make_batch, tiny_config
    from transformers import StoppingCriteria, StoppingCriteriaList

    from stjax.models.inputs import prepare_inputs
    from stjax.models.loading import load_pretrained
    from stjax.sampling.sampler import SamplingConfig, generate

    cfg = tiny_config(args.arch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref = hf_model(cfg).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model, _ = load_pretrained(tmp)
    n = args.new_tokens
    print(
        f"{args.arch} tiny model ({cfg.text.num_layers} text / {cfg.vision.depth} vision layers), "
        f"greedy, {n} new tokens, one 8-frame 224x224 video per prompt; "
        f"jax on {jax.devices()[0].device_kind}, torch on {device}; median of {args.repeats} repeats"
    )

    class Clock(StoppingCriteria):
        """Records the time after each generated token; never stops generation."""

        def __init__(self):
            self.stamps: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    for batch_size in args.batches:
        batch = make_batch(cfg, [[20, ("video", 4, 16, 16), 30]] * batch_size, fps=4.0)
        length = batch["input_ids"].shape[1]
        inputs = prepare_inputs(cfg, **batch)
        kwargs = {
            k: torch.from_numpy(v).to(device)
            for k, v in batch.items()
            if k not in ("position_ids", "second_per_grid_ts")
        }
        kwargs["mm_token_type_ids"] = torch.from_numpy(np.where(batch["input_ids"] == cfg.video_token_id, 2, 0)).to(
            device
        )

        full = SamplingConfig(max_new_tokens=n)
        first_only = SamplingConfig(max_new_tokens=n, eos_ids=tuple(range(cfg.text.vocab_size)))

        def ours(sampling: SamplingConfig) -> float:
            start = time.perf_counter()
            generate(model, inputs, length, jax.random.key(0), sampling).tokens.block_until_ready()
            return time.perf_counter() - start

        def theirs() -> tuple[float, float]:
            """(end to end, tokens 2..N inside the loop) seconds."""
            clock = Clock()
            start = time.perf_counter()
            with torch.no_grad():
                ref.generate(
                    **kwargs,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    stopping_criteria=StoppingCriteriaList([clock]),
                )
            if device == "cuda":
                torch.cuda.synchronize()
            end = time.perf_counter()
            assert len(clock.stamps) == n, f"the clock saw {len(clock.stamps)} of {n} tokens"
            return end - start, clock.stamps[-1] - clock.stamps[0]

        ours(full), theirs()  # compile / warm up
        stopped = generate(model, inputs, length, jax.random.key(0), first_only)
        assert (np.asarray(stopped.lengths) == 1).all(), "the first-token run did not stop after one token"
        total = {"stjax": [], "transformers": []}
        decode = {"stjax": [], "transformers": []}
        for r in range(args.repeats):
            if r % 2:  # alternate the order within the pair, so that a drift does not favour either
                first, whole = ours(first_only), ours(full)
            else:
                whole, first = ours(full), ours(first_only)
            total["stjax"].append(whole)
            decode["stjax"].append(whole - first)
            end_to_end, loop = theirs()
            total["transformers"].append(end_to_end)
            decode["transformers"].append(loop)

        e2e = {name: batch_size * n / float(np.median(t)) for name, t in total.items()}
        rates = {name: decode_rate(batch_size * (n - 1), t) for name, t in decode.items()}
        words = {name: f"{rate:7.0f} tok/s ({note})" if rate else note for name, (rate, note) in rates.items()}
        ratio = (
            f"{rates['stjax'][0] / rates['transformers'][0]:.1f}x"
            if rates["stjax"][0] and rates["transformers"][0]
            else "no ratio"
        )
        print(
            f"batch {batch_size}: end to end stjax {e2e['stjax']:7.0f} tok/s, transformers "
            f"{e2e['transformers']:6.0f} tok/s ({e2e['stjax'] / e2e['transformers']:.1f}x); decoding alone "
            f"stjax {words['stjax']}, transformers {words['transformers']} ({ratio})"
        )


if __name__ == "__main__":
    main()
