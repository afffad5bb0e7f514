"""python -m stjax.train --stage sft|grpo [--config FILE.yaml] [--set key.sub=value ...]

Without --config the stage runs on the embedded default: a tiny random model and the synthetic
ego-centric set, both made locally under output_dir, on whatever devices exist (GRPO starts from the
embedded SFT cold start, made first under <output_dir>/sft when missing). Rerunning the same command
resumes from the latest checkpoint in output_dir.
"""

from __future__ import annotations

import argparse
import logging

from stjax.cli import add_debug_flag, run_cli
from stjax.settings import help_lines
from stjax.train.config import STAGES, TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m stjax.train",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings (YAML keys, or --set key=value): default, meaning and allowed values\n"
        + "\n".join(help_lines(TrainConfig)),
    )
    parser.add_argument(
        "--stage",
        choices=list(STAGES),
        help="training stage (default: the config's, else sft; a config naming another is refused)",
    )
    parser.add_argument("--config", help="YAML file of settings (default: the embedded default run)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. --set optim.learning_rate=1e-5 (repeatable)",
    )
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile every program of the run for --topology and report memory, collectives and "
        "roofline per chip; train nothing (exits 1 when a program does not fit)",
    )
    parser.add_argument(
        "--topology",
        help="with --compile-only: a TPU topology (v4:2x2x1, v5e:4x4, v5p:4x4x2, "
        "v6e:2x4) or a GPU mesh (h100x8, h200x8); default: the devices present",
    )
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.topology and not args.compile_only:
        parser.error("--topology goes with --compile-only")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("stjax").setLevel(logging.INFO)

    from stjax.train import config, stages

    defaults = None if args.config else STAGES[args.stage or "sft"].embedded
    cfg = config.load(args.config, args.set, defaults, **({"stage": args.stage} if args.stage else {}))
    if args.compile_only:
        from stjax.train.compile_only import compile_run

        compile_run(cfg, args.topology)
        return
    summary = stages.train(cfg)
    print(f"done: {summary}")


if __name__ == "__main__":
    run_cli(main)
