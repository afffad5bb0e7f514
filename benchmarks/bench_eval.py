"""Evaluator speed: samples/s of `python -m stjax.eval.mcq` in --mode generate and --mode logits.

    python benchmarks/bench_eval.py [--walks 4] [--batch-size 8] [--max-new-tokens 64 512]

Builds a synthetic set (6 questions per walk; 8 frames of 224x224 upscaled to 336x336, about 780
prompt tokens each) and a tiny random Qwen2.5-VL, then for each mode runs the evaluator once on one
batch to compile, and times a full run in a fresh output folder (video decoding, batching, the model,
detokenising, extraction and the per-batch writes all included). The tiny model never stops early,
so generate runs every one of its max_new_tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

import jax

from stjax.data.synthetic import generate
from stjax.data.tokenizer import tiny_model_dir
from stjax.eval.mcq import EvalConfig, evaluate


def timed_run(cfg: EvalConfig, out: Path) -> float:
    """Samples/s of a full run after a one-batch warm-up (compilation) in another folder."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate(EvalConfig(**{**vars(cfg), "out": str(out / "warm-up"), "limit": cfg.batch_size}))
        start = time.perf_counter()
        summary = evaluate(EvalConfig(**{**vars(cfg), "out": str(out / "timed")}))
    return summary["overall"]["n"] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = generate(root / "data", args.walks, seed=0)
        model = tiny_model_dir(data / "tokenizer", root / "model", "qwen2_5_vl", seed=0)
        base = EvalConfig(model=str(model), data=[str(data / "plain.jsonl")], batch_size=args.batch_size)
        print(f"{6 * args.walks} samples, batch {args.batch_size}, device {jax.devices()[0].device_kind}")
        print("| mode | samples/s |\n|---|---|")
        rate = timed_run(EvalConfig(**{**vars(base), "mode": "logits"}), root / "logits")
        print(f"| logits (one prefill) | {rate:.2f} |")
        for tokens in args.max_new_tokens:
            rate = timed_run(EvalConfig(**{**vars(base), "max_new_tokens": tokens}), root / f"generate-{tokens}")
            print(f"| generate, {tokens} new tokens | {rate:.2f} |")


if __name__ == "__main__":
    main()
