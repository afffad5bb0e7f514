"""Export a training checkpoint to a Hugging Face directory (LoRA merged), on request:

    python -m stjax.train.export RUN_DIR [--step N] [--out DIR] [--overwrite]

RUN_DIR is a run's output_dir (its config.json says how the model was built); the default step is the
latest checkpoint and the default target RUN_DIR/hf-<step>. Runs also export at their end
(`checkpoint.export_hf`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flax import nnx

from stjax.cli import add_debug_flag, run_cli
from stjax.data.processor import Processor
from stjax.io import as_path, check_target
from stjax.models.loading import is_stjax_dir
from stjax.settings import ConfigError
from stjax.sharding import make_mesh
from stjax.train import rundir
from stjax.train.checkpoint import CheckpointDamaged, Checkpointer, abstract_like
from stjax.train.config import parse
from stjax.train.loop import export_files, export_hf, media_config, placed_state, prepare_model, tokenizer_dir
from stjax.train.step import split_trainable


def export_checkpoint(
    run_dir: str | Path, step: int | None = None, out: str | Path | None = None, overwrite: bool = False
) -> Path:
    """Write checkpoint `step` of the run as a HF directory at `out`, refusing an occupied `out` unless `overwrite`."""
    run_dir = as_path(run_dir)
    if not (run_dir / "checkpoints").is_dir() or not (run_dir / "config.json").is_file():
        model = any(run_dir.glob("*.safetensors")) or is_stjax_dir(run_dir)
        raise ConfigError(
            f"{run_dir} is not a training run's output_dir (no checkpoints/ and config.json)"
            + ("; it is a model directory, which loads as it is" if model else "")
        )
    cfg = parse(rundir.recorded_config(run_dir))
    checkpoints = Checkpointer(run_dir / "checkpoints", every=0, keep=cfg.checkpoint.save_total_limit)
    steps = list(checkpoints.manager.all_steps())
    step = step or checkpoints.latest_step
    if step is None or step not in steps:
        damaged = sorted(p.name for p in (run_dir / "checkpoints").glob("*.damaged-*"))
        raise ConfigError(
            f"no checkpoint{f' {step}' if step else ''} in {run_dir / 'checkpoints'} (there are {steps}"
            + (f"; set aside as damaged: {', '.join(damaged)}" if damaged else "")
            + ")"
        )
    out = as_path(out or run_dir / f"hf-{step}")
    check_target(out, overwrite)  # before building the model
    mesh = make_mesh({"fsdp": -1})
    tokenizer = tokenizer_dir(cfg)
    graphdef, trainable, frozen = split_trainable(prepare_model(cfg, mesh))
    target = abstract_like(placed_state(trainable, cfg.optim, cfg.seed, mesh, cfg.model.master_dtype))
    try:
        state = checkpoints.restore(step, target, None)
    except CheckpointDamaged as e:
        raise CheckpointDamaged(
            f"checkpoint {step} in {run_dir / 'checkpoints'} is damaged ({e}); export another "
            f"with --step (there are {steps})"
        ) from None
    checkpoints.close()
    trained = nnx.merge(graphdef, state.params, frozen)
    processor = Processor.for_model(tokenizer, trained.config, media_config(cfg))  # as the run's own export
    files = export_files(processor, tokenizer, cfg.stage, cfg.prompt_template)
    export_hf(trained, out, tokenizer, overwrite, files)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stjax.train.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run's output_dir")
    parser.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    parser.add_argument("--out", help="target directory (default: RUN_DIR/hf-<step>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the target whole when it holds files")
    add_debug_flag(parser)
    args = parser.parse_args(argv)
    out = export_checkpoint(args.run_dir, args.step, args.out, args.overwrite)
    which = f"checkpoint {args.step}" if args.step else "the latest checkpoint"
    print(f"exported {which} of {args.run_dir} to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


if __name__ == "__main__":
    run_cli(main)
