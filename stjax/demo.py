"""The ST-R1 pipeline end to end at laptop size, with no download:

1. a synthetic ego-centric set (rendered walks; the embedded default asks the colour of the corridor's
   walls, a question a tiny vision tower can answer from pixels) and a tiny random Qwen-VL matching its
   tokenizer: the base model;
2. the SFT cold start on the reverse-thinking chain-of-thought solutions (`--stage sft`'s embedded default);
3. GRPO from the cold start with verifiable rewards (`--stage grpo`'s embedded default);
4. evaluation of the base, SFT and GRPO models on held-out walks (new scenes): greedy (the recipe) and
   mean@8 sampled at the GRPO temperature, each with a 95% interval, beside the baselines a score
   means nothing without: chance, always answering the majority letter, and the same model with blank
   frames (text-only). `pipeline.png` plots them with GRPO's reward curves and its collapse watch (mean
   <think> length and the share of each answer letter per step); `results.json` holds every number.

    python -m stjax.demo [--out runs/demo] [--seed 0] [--arch qwen2_vl]

The last lines say plainly whether SFT beat both baselines and whether GRPO added to SFT, each beyond
the intervals (the lower bound above the other's upper bound). Rerunning resumes or reuses every
finished stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path

from stjax.cli import add_debug_flag, run_cli
from stjax.io import write_text_atomic
from stjax.models.families import model_types
from stjax.train.config import EMBEDDED, TrainConfig, load

STAGES = ("base", "sft", "grpo")
TEMPLATE = "problem"  # the cold start's prompt, which GRPO's embedded default keeps (see stjax/train/config.py)
SAMPLES = 8  # mean@8: completions per question sampled at the GRPO temperature
# GRPO's per-step curves kept in results.json and plotted
CURVES = (
    "reward",
    "rewards/accuracy/mean",
    "rewards/format/mean",
    "format_rate",
    "completions/think_words",
    "answers/A",
    "answers/B",
    "answers/C",
    "answers/D",
)


def code_digest() -> str:
    """SHA-256 over the package's source files: what results.json was made by (a test reading a finished
    run's results checks it)."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(p for p in package.rglob("*") if p.suffix in (".py", ".cc")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def train(out: Path, cfg: TrainConfig) -> tuple[dict[str, Path], dict[str, float]]:
    """The cold start, then GRPO from it (each made once: a finished stage is reused); the models and
    the seconds each stage took."""
    from stjax.train import stages

    began = time.perf_counter()
    cfg = stages.resolve(cfg)  # the synthetic set, the tiny base model, the SFT cold start: plain paths
    seconds = {"data and SFT": time.perf_counter() - began}
    began = time.perf_counter()
    if not (out / "grpo" / "hf" / "config.json").exists():
        stages.train(cfg)  # nothing left to make: the resolved config names only files
    seconds["GRPO"] = time.perf_counter() - began
    sft = out / "grpo" / "sft"
    return {"base": sft / "base-model", "sft": sft / "hf", "grpo": out / "grpo" / "hf"}, seconds


def repeated(heldout: Path, k: int) -> Path:
    """The held-out questions k times over (ids `<id>#<i>`): one sampled evaluation answers each k times."""
    target = heldout / f"plain_x{k}.jsonl"
    if not target.exists():
        rows = [json.loads(line) for line in (heldout / "plain.jsonl").read_text().splitlines()]
        write_text_atomic(
            target, "".join(json.dumps({**r, "id": f"{r['id']}#{i}"}) + "\n" for i in range(k) for r in rows)
        )
    return target


def mean_at_k(records: list[dict]) -> dict:
    """Accuracy averaged over the k sampled answers to each question, with a 95% interval over questions:
    Wilson's, taking each question's mean as one trial. A value in [0, 1] with mean p varies at most as a
    0/1 trial does (p(1 - p)), so the interval is conservative, and unlike p +- z * sd over the questions
    it never shrinks to a point when every question scores alike."""
    from stjax.eval.mcq import wilson

    per_question: dict[str, list[bool]] = {}
    for r in records:
        per_question.setdefault(r["id"].rsplit("#", 1)[0], []).append(bool(r["correct"]))
    means = [sum(v) / len(v) for v in per_question.values()]
    n = len(means)
    mean = sum(means) / n
    return {"n": n, "k": len(records) // n, "accuracy": mean, "interval": wilson(mean * n, n)}


def evaluate(models: dict[str, Path], heldout: Path, out: Path, cfg: TrainConfig) -> dict[str, dict]:
    """Per model: greedy generation on the held-out walks with its baselines (text-only for the trained
    models), and mean@8 at the GRPO temperature for the trained ones (records under out/eval)."""
    from stjax.eval.mcq import EvalConfig, load_records
    from stjax.eval.mcq import evaluate as run_eval

    results = {}
    for stage, path in models.items():
        common = dict(
            model=str(path),
            template=TEMPLATE,
            max_pixels=cfg.data.max_pixels,
            max_new_tokens=cfg.grpo.max_completion_length,
        )
        greedy = run_eval(
            EvalConfig(
                **common,
                data=[str(heldout / "plain.jsonl")],
                out=str(out / "eval" / stage),
                batch_size=8,
                text_only=stage != "base",
            )
        )
        results[stage] = {"greedy": greedy}
        if stage != "base":
            folder = out / "eval" / f"{stage}-sampled"
            run_eval(
                EvalConfig(
                    **common,
                    data=[str(repeated(heldout, SAMPLES))],
                    out=str(folder),
                    batch_size=32,
                    temperature=cfg.grpo.temperature,
                    text_only=False,
                )
            )
            results[stage]["mean_at_k"] = mean_at_k(load_records(folder / "predictions.jsonl"))
    return results


def beyond(a: dict, b: dict | float) -> bool:
    """a's interval lies wholly above b (b's interval, or a fixed baseline)."""
    return a["interval"][0] > (b if isinstance(b, float) else b["interval"][1])


def claims(results: dict[str, dict]) -> dict[str, bool]:
    """What the run shows, each judged beyond the 95% intervals."""
    sft, grpo = results["sft"], results["grpo"]
    overall = sft["greedy"]["overall"]
    return {
        "sft_above_majority": beyond(overall, overall["majority"]),
        "sft_above_text_only": beyond(overall, overall["text_only"]),
        "grpo_above_sft_greedy": beyond(grpo["greedy"]["overall"], overall),
        "grpo_above_sft_mean_at_k": beyond(grpo["mean_at_k"], sft["mean_at_k"]),
    }


def table(results: dict[str, dict], temperature: float) -> str:
    """Each model's held-out accuracy against the baselines, with 95% intervals."""
    from stjax.eval.mcq import percent_with_interval

    first = next(iter(results.values()))["greedy"]["overall"]
    lines = [
        f"held-out: {first['n']} questions; chance {100 * first['chance']:.1f}%, "
        f"always the majority letter {100 * first['majority']:.1f}%",
        f"{'model':6} {'greedy [95% interval]':>24} {'text-only (blank frames)':>26} "
        f"{f'mean@{SAMPLES} at T={temperature:g}':>24}",
    ]
    for stage, r in results.items():
        overall = r["greedy"]["overall"]
        blind = percent_with_interval(overall["text_only"]) if "text_only" in overall else "-"
        sampled = percent_with_interval(r["mean_at_k"]) if "mean_at_k" in r else "-"
        lines.append(f"{stage:6} {percent_with_interval(overall):>24} {blind:>26} {sampled:>24}")
    return "\n".join(lines)


def verdict(shown: dict[str, bool]) -> str:
    """The claims in words, as measured."""
    yes = {True: "yes", False: "NO"}
    return "\n".join(
        [
            f"SFT above the majority-letter baseline beyond its interval: {yes[shown['sft_above_majority']]}",
            f"SFT above its text-only baseline beyond both intervals: {yes[shown['sft_above_text_only']]}",
            f"GRPO above SFT beyond both intervals, greedy: {yes[shown['grpo_above_sft_greedy']]}; "
            f"mean@{SAMPLES}: {yes[shown['grpo_above_sft_mean_at_k']]}",
        ]
    )


def plot(curves: dict[str, list], results: dict[str, dict], target: Path, temperature: float) -> None:
    """GRPO's rewards per step; its collapse watch (think length, answer letters); held-out accuracy per
    model against the baselines, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = curves["step"]
    fig, (rewards, watch, accuracy) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, label in (
        ("reward", "reward (weighted sum)"),
        ("rewards/accuracy/mean", "accuracy reward"),
        ("rewards/format/mean", "format reward"),
    ):
        rewards.plot(steps, curves[name], label=label)
    rewards.set(xlabel="GRPO step", title=f"GRPO on the training walks (T={temperature:g})")
    rewards.legend()
    watch.plot(steps, curves["completions/think_words"], color="black", label="mean <think> words")
    watch.set(xlabel="GRPO step", ylabel="words", title="collapse watch")
    shares = watch.twinx()
    for letter in "ABCD":
        shares.plot(steps, curves[f"answers/{letter}"], linestyle="--", label=f"share answering {letter}")
    shares.set(ylim=(0, 1), ylabel="share of completions")
    watch.legend(loc="upper left")
    shares.legend(loc="upper right", fontsize="small")
    names = list(results)
    bars = [
        ("greedy", lambda r: r["greedy"]["overall"]),
        ("text-only (blank frames)", lambda r: r["greedy"]["overall"].get("text_only")),
        (f"mean@{SAMPLES}", lambda r: r.get("mean_at_k")),
    ]
    for k, (label, pick) in enumerate(bars):
        xs, ys, errors = [], [], [[], []]
        for i, r in enumerate(results.values()):
            t = pick(r)
            if t:
                xs.append(i + (k - 1) * 0.27)
                ys.append(t["accuracy"])
                errors[0].append(max(0.0, t["accuracy"] - t["interval"][0]))  # >= 0 despite rounding at 0 and 1
                errors[1].append(max(0.0, t["interval"][1] - t["accuracy"]))
        accuracy.bar(xs, ys, width=0.27, yerr=errors, capsize=3, label=label)
    first = next(iter(results.values()))["greedy"]["overall"]
    accuracy.axhline(first["chance"], color="grey", linestyle=":", label="chance")
    accuracy.axhline(first["majority"], color="red", linestyle="--", label="majority letter")
    accuracy.set_xticks(range(len(names)), names)
    accuracy.set(ylim=(0, 1), ylabel="accuracy", title=f"held-out walks ({first['n']} questions, 95% intervals)")
    accuracy.legend(fontsize="small")
    fig.tight_layout()
    partial = target.with_suffix(".tmp.png")
    fig.savefig(partial, dpi=100)
    partial.replace(target)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    parser.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    parser.add_argument(
        "--arch",
        default="qwen2_vl",
        choices=model_types(),
        help="architecture of the tiny model (the release's is Qwen2-VL)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--heldout-walks",
        type=int,
        default=48,
        help="held-out walks to evaluate on (a forward and a reverse question per task each)",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stjax").setLevel(logging.INFO)
    from stjax.data.synthetic import generate

    out = Path(args.out)
    start = time.perf_counter()
    cfg = load(
        None,
        [],
        EMBEDDED["grpo"],
        stage="grpo",
        output_dir=str(out / "grpo"),
        seed=args.seed,
        model={"arch": args.arch},
    )
    print("[1-3/4] synthetic set, SFT cold start, GRPO (python -m stjax.train --stage grpo, embedded default)")
    models, seconds = train(out, cfg)
    heldout = out / "heldout"
    began = time.perf_counter()
    if not (heldout / "plain.jsonl").exists():  # other walks: seeds (seed + 1, i)
        generate(heldout, args.heldout_walks, args.seed + 1, sheet=0, tasks=cfg.data.synthetic_tasks)
    seconds["held-out data"] = time.perf_counter() - began
    print(f"[4/4] evaluating {', '.join(STAGES)} on {args.heldout_walks} held-out walks")
    temperature = cfg.grpo.temperature
    began = time.perf_counter()
    results = evaluate(models, heldout, out, cfg)
    seconds["evaluation"] = time.perf_counter() - began
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    curves = {name: [r.get(name) for r in records] for name in ("step",) + CURVES}
    shown = claims(results)
    plot(curves, results, out / "pipeline.png", temperature)
    seconds["total"] = time.perf_counter() - start
    summary = {
        "models": results,
        "claims": shown,
        "grpo_curves": curves,
        "seconds": seconds,
        "heldout_walks": args.heldout_walks,
        "temperature": temperature,
        "seed": args.seed,
        "arch": args.arch,
        "code": code_digest(),
    }
    write_text_atomic(out / "results.json", json.dumps(summary, indent=1) + "\n")
    print("\n" + table(results, temperature) + "\n\n" + verdict(shown))
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    print(f"plot: {out / 'pipeline.png'}; numbers: {out / 'results.json'}")
    if not any(r["greedy"]["overall"]["n"] for r in results.values()):
        raise SystemExit("no held-out sample was evaluated")


if __name__ == "__main__":
    run_cli(main)
