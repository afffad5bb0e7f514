"""The ST-R1 pipeline end to end at laptop size, with no download:

1. a synthetic ego-centric set (rendered walks, forward and reverse questions) and a tiny random
   Qwen-VL matching its tokenizer: the base model;
2. the SFT cold start on the reverse-thinking chain-of-thought solutions (`--stage sft`'s embedded default);
3. GRPO from the cold start with verifiable rewards (`--stage grpo`'s embedded default);
4. evaluation of the base, SFT and GRPO models on held-out walks (greedy, as the recipe), accuracy
   overall, forward and reverse side by side, and `pipeline.png`: reward and accuracy over the GRPO
   steps, accuracy per stage.

    python -m stjax.demo [--out runs/demo] [--seed 0] [--arch qwen2_vl]

The held-out walks are new scenes: a model this small learns its training walks, not the skill, so
its held-out accuracy stays near chance (0.25) and the printout says what it measured. Rerunning
resumes or reuses every finished stage.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from stjax.cli import add_debug_flag, run_cli
from stjax.io import write_text_atomic
from stjax.train.config import EMBEDDED

STAGES = ("base", "sft", "grpo")
TEMPLATE = "problem"  # the cold start's prompt, which GRPO's embedded default keeps (see stjax/train/config.py)


def train(out: Path, arch: str, seed: int) -> dict[str, Path]:
    """The cold start, then GRPO from it (each made once: a finished stage is reused)."""
    from stjax.train import config, grpo

    if not (out / "grpo" / "hf" / "config.json").exists():
        grpo.run(config.load(None, [], EMBEDDED["grpo"], stage="grpo", out_dir=str(out / "grpo"), seed=seed,
                             model={"arch": arch}))
    return {"base": out / "grpo" / "sft" / "base-model", "sft": out / "grpo" / "sft" / "hf", "grpo": out / "grpo" / "hf"}


def evaluate(models: dict[str, Path], heldout: Path, out: Path, max_new_tokens: int) -> dict[str, dict]:
    """Greedy generation on the held-out walks for each stage's model (the evaluator's records and
    accuracy under out/eval/<stage>)."""
    from stjax.eval.mcq import EvalConfig
    from stjax.eval.mcq import evaluate as run_eval

    media = EMBEDDED["sft"]["data"]
    return {stage: run_eval(EvalConfig(model=str(path), data=[str(heldout / "plain.jsonl")], out=str(out / "eval" / stage),
                                       template=TEMPLATE, max_pixels=media["max_pixels"],
                                       max_new_tokens=max_new_tokens, batch_size=8))
            for stage, path in models.items()}


def table(results: dict[str, dict]) -> str:
    """Accuracy per stage: overall, forward, reverse (n correct / n)."""
    def cell(t: dict) -> str:
        return f"{t['accuracy']:.2f} ({t['correct']}/{t['n']})" if t["n"] else "-"

    lines = [f"{'model':6} {'overall':>14} {'forward':>14} {'reverse':>14}"]
    for stage, summary in results.items():
        by = summary["by_direction"]
        lines.append(f"{stage:6} {cell(summary['overall']):>14} {cell(by.get('forward', {'n': 0})):>14} "
                     f"{cell(by.get('reverse', {'n': 0})):>14}")
    return "\n".join(lines)


def plot(metrics: Path, results: dict[str, dict], target: Path) -> None:
    """Reward and accuracy over the GRPO steps (left), held-out accuracy per stage (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, label in (("reward", "reward (sum)"), ("rewards/accuracy/mean", "accuracy reward"),
                        ("format_rate", "format rate")):
        left.plot(steps, [r.get(name) for r in records], label=label)
    left.set(xlabel="GRPO step", title="GRPO on the training walks (sampled at temperature 1)")
    left.legend()
    names = list(results)
    for k, direction in enumerate(("overall", "forward", "reverse")):
        values = [(s["overall"] if direction == "overall" else s["by_direction"].get(direction, {})).get("accuracy") or 0
                  for s in results.values()]
        right.bar([i + (k - 1) * 0.27 for i in range(len(names))], values, width=0.27, label=direction)
    right.axhline(0.25, color="grey", linestyle=":", label="chance")
    right.set_xticks(range(len(names)), names)
    right.set(ylim=(0, 1), ylabel="accuracy", title="held-out walks (greedy)")
    right.legend()
    fig.tight_layout()
    partial = target.with_suffix(".tmp.png")
    fig.savefig(partial, dpi=100)
    partial.replace(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument("--arch", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"],
                        help="architecture of the tiny model (the release's is Qwen2-VL)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-walks", type=int, default=4, help="held-out walks to evaluate on (6 questions each)")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stjax").setLevel(logging.INFO)
    from stjax.data.synthetic import generate

    out = Path(args.out)
    start = time.perf_counter()
    print("[1-3/4] synthetic set, SFT cold start, GRPO (python -m stjax.train --stage grpo, embedded default)")
    models = train(out, args.arch, args.seed)
    heldout = out / "heldout"
    if not (heldout / "plain.jsonl").exists():
        generate(heldout, args.heldout_walks, args.seed + 1, sheet=0)  # other walks: seeds (seed + 1, i)
    print(f"[4/4] evaluating {', '.join(STAGES)} on {args.heldout_walks} held-out walks")
    results = evaluate(models, heldout, out, EMBEDDED["grpo"]["grpo"]["max_completion_length"])
    plot(out / "grpo" / "metrics.jsonl", results, out / "pipeline.png")
    summary = {stage: {"overall": s["overall"], "by_direction": s["by_direction"]} for stage, s in results.items()}
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
    print("\nheld-out accuracy (chance is about 0.25):\n" + table(results))
    print(f"\nplot: {out / 'pipeline.png'}; numbers: {out / 'results.json'}; done in {time.perf_counter() - start:.0f} s")
    if not any(s["overall"]["n"] for s in results.values()):
        raise SystemExit("no held-out sample was evaluated")


if __name__ == "__main__":
    run_cli(main)
