"""Where training metrics go besides `<output_dir>/metrics.jsonl`: TRL's `report_to` integrations.

    report_to: [tensorboard, wandb]    # default: none, as in transformers 5

- tensorboard: event files in `<output_dir>/tensorboard`, written by tensorboardX (numpy and protobuf; the
  `tensorboard` package would bring grpcio, werkzeug and markdown for the same files):
  `pip install "stjax[tensorboard]"`.
- wandb: a Weights & Biases run (project `$WANDB_PROJECT`, default "stjax") in `<output_dir>/wandb`; a resumed
  run continues the same wandb run. `WANDB_MODE=offline` keeps it on disk for a later `wandb sync`:
  `pip install "stjax[wandb]"`.

Each reporter gets every step's metrics, as metrics.jsonl does; only process 0 reports.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Iterable

from stjax.io import AppendLog, as_path, is_remote, write_text_atomic

# report_to name -> the package it needs (and the stjax extra that installs it)
REPORTERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}


def check_report_to(names: Iterable[str]) -> None:
    """A ValueError for an unknown name or a reporter whose package is not installed (before any work)."""
    for name in names:
        if name not in REPORTERS:
            raise ValueError(f"report_to: {name!r} is not one of {', '.join(REPORTERS)}")
        if importlib.util.find_spec(REPORTERS[name]) is None:
            raise ValueError(f'report_to: {name} needs the {REPORTERS[name]} package: pip install "stjax[{name}]"')


class _EventFiles:
    """tensorboardX's event files on object stores written through stjax.io (its own gs:// writer
    needs google-cloud-storage): each file is uploaded whole at each of tensorboardX's flushes."""

    def open(self, path: str) -> AppendLog:
        return AppendLog(path, binary=True, autoflush=False)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to make


class TensorBoard:
    def __init__(self, out_dir, start_step: int = 0):
        from tensorboardX import SummaryWriter, record_writer

        for scheme in ("gs", "s3", "az"):
            record_writer.register_writer_factory(scheme, _EventFiles())
        # a resumed run drops the events after its checkpoint, as metrics.jsonl does (`drop_steps_after`)
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """One wandb run per output_dir: its id is kept in `<output_dir>/wandb_run_id`, so a resumed run logs on."""

    def __init__(self, out_dir, config: dict | None):
        import wandb

        id_file = out_dir / "wandb_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else ""
        if not run_id:  # written whole or not at all: a kill mid-write must not cut the link to the run
            run_id = uuid.uuid4().hex[:12]
            write_text_atomic(id_file, run_id + "\n")
        local = None if is_remote(out_dir) else str(out_dir)  # wandb writes its files locally
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "stjax"),
            name=out_dir.name,
            id=run_id,
            resume="allow",
            dir=local,
            config=config,
        )

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporters(names: Iterable[str], out_dir, config: dict | None = None, start_step: int = 0) -> list:
    """The reporters named in `report_to`, writing under `out_dir` (a local path or an object store URL); a
    run resumed at `start_step` logs its steps after it again."""
    names = list(names)
    check_report_to(names)
    out_dir = as_path(out_dir)
    return [TensorBoard(out_dir, start_step) if name == "tensorboard" else Wandb(out_dir, config) for name in names]
