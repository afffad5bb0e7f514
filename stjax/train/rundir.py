"""A training run's directory: one run at a time, and a resume that continues the same run.

`lock` keeps a second run out of output_dir. `check_resume` compares, before anything large is built,
the stage and the settings that shape the train state or the data order with those the checkpoints
were made under (output_dir/config.json), and `check_inputs` the data file's SHA-256 and the model
directory's files (`model_fingerprints`) with those recorded when the run began (output_dir/inputs.json):
a resumed run never mixes two runs, stages, data sets or base models. `write_config` records the
settings only once the run is known to be valid, so a refused rerun leaves output_dir as it was.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from stjax.io import DirectoryLock, file_digest, write_text_atomic
from stjax.models.loading import model_fingerprints
from stjax.settings import ConfigError, changed
from stjax.train.config import RENAMED, STAGES, TrainConfig

CONFIG, INPUTS = "config.json", "inputs.json"
# Settings a checkpoint depends on: the stage (an SFT checkpoint is no GRPO run's, nor the reverse),
# the train state's layout, and the order the data iterator walks (a stage adds its own: STAGES).
RESUME_KEYS = (
    "stage",
    "seed",
    "batch_size",
    "model.model_name_or_path",
    "model.arch",
    "model.param_dtype",
    "model.master_dtype",
    "lora.r",
    "lora.target_modules",
    "data.format",
    "data.path",
    "data.shuffle",
    "data.synthetic_walks",
    "data.synthetic_tasks",
)


def lock(out: Path) -> DirectoryLock | None:
    """Process 0 holds output_dir for the life of the process (or until `release`)."""
    return DirectoryLock(out, "training run").acquire() if jax.process_index() == 0 else None


def has_checkpoints(out: Path) -> bool:
    directory = out / "checkpoints"
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def recorded_config(out: Path) -> dict:
    """The config a run recorded in `out`, its keys under today's names (a run recorded before the TRL renames,
    `config.RENAMED`, resumes and exports; `micro_batch_size` becomes the accumulation count it implied)."""
    try:
        values = json.loads((out / CONFIG).read_text())
    except ValueError as e:
        raise ConfigError(f"{out / CONFIG} is not readable ({e}); the checkpoints beside it cannot be used") from None
    for old, new in RENAMED.items():
        section, _, key = old.rpartition(".")
        holder = values.get(section, {}) if section else values
        if key in holder:
            value = holder.pop(key)
            holder[new.rpartition(".")[2]] = values["batch_size"] // value if old == "micro_batch_size" else value
    return values


def check_resume(out: Path, cfg: TrainConfig) -> None:
    """Refuse to resume checkpoints made under other RESUME_KEYS settings (before loading anything)."""
    if not has_checkpoints(out) or not (out / CONFIG).exists():
        return
    before = recorded_config(out)
    differ = changed(before, dataclasses.asdict(cfg), RESUME_KEYS + STAGES[cfg.stage].resume_keys)
    if differ:
        listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in differ.items())
        raise ConfigError(
            f"{out} holds checkpoints of a run with other settings ({listed}); "
            "use another output_dir or the same settings"
        )


def check_inputs(out: Path, data_file: Path, model_dir: Path | None) -> None:
    """Record the data file's digest and the model directory's files (None: a preset, or a model made
    in output_dir) when the run begins; refuse a resume after either changed."""
    digest = file_digest(data_file)
    model_files = model_fingerprints(model_dir) if model_dir is not None else {}
    recorded = json.loads((out / INPUTS).read_text()) if (out / INPUTS).exists() else None
    if recorded is not None and has_checkpoints(out):
        if recorded.get("data_sha256") != digest:
            raise ConfigError(
                f"{data_file} changed since this run began (SHA-256 {digest[:12]}, recorded "
                f"{str(recorded.get('data_sha256'))[:12]}); resuming would mix two data sets: restore "
                "the file or use another output_dir"
            )
        before = recorded.get("model_files", model_files)  # runs begun before models were recorded: unchecked
        files = sorted(n for n in before.keys() | model_files.keys() if before.get(n) != model_files.get(n))
        if files:
            raise ConfigError(
                f"the model files in {model_dir} changed since this run began ({', '.join(files)}); "
                "resuming would train on another base model: restore them or use another output_dir"
            )
    if recorded is None or not has_checkpoints(out):
        _write_json(
            out / INPUTS,
            {
                "data_file": str(data_file),
                "data_sha256": digest,
                "model_dir": str(model_dir) if model_dir else None,
                "model_files": model_files,
            },
        )


def write_config(out: Path, cfg: TrainConfig) -> None:
    """The run's settings as output_dir/config.json (read by `stjax.train.export` and by a resume)."""
    _write_json(out / CONFIG, dataclasses.asdict(cfg))


def _write_json(path: Path, value: dict) -> None:
    if jax.process_index() == 0:
        write_text_atomic(path, json.dumps(value, indent=1))
