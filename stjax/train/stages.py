"""Training from a config: the stages by name, and the embedded default turned into plain paths.

    config -> checked against the devices (`loop.checked_mesh`) -> `resolve`: what the config leaves to be
    made is made and named (the synthetic set, a tiny random model, GRPO's SFT cold start) -> the
    stage's loop (`loop.train`)

so the loop and the stages see only files: a data file, a tokenizer, a model directory or preset.
`python -m stjax.train`, the demo and the tests all start here (`train`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from pathlib import Path

import jax
from jax.experimental import multihost_utils

from stjax.io import as_path
from stjax.train import config, loop, rundir
from stjax.train.config import TrainConfig


def stage_steps(name: str) -> type[loop.Stage]:
    """The class that runs stage `name`'s steps on the shared loop (`config.STAGES`)."""
    module, cls = config.STAGES[name].trainer.split(":")
    return getattr(importlib.import_module(module), cls)


def train(cfg: TrainConfig) -> dict:
    """Train as configured; returns the summary. Config errors come before any work; output_dir is locked
    before anything is made under it (a second run on it is refused, not left to overwrite what this one reads)."""
    mesh = loop.checked_mesh(cfg)
    lock = rundir.lock(as_path(cfg.output_dir))
    summary = loop.train(resolve(cfg), stage_steps(cfg.stage), mesh)
    if lock is not None:
        lock.release()
    return summary


def on_process_zero(make: Callable[[], object], what: Path) -> None:
    """Let process 0 create `what` (if missing) while the others wait for it."""
    if jax.process_index() == 0 and not what.exists():
        make()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"made {what}")


def resolve(cfg: TrainConfig) -> TrainConfig:
    """The config with every input a plain path, made first where the config leaves it to be made
    (once: a rerun reuses what exists):

    - GRPO with no model.model_name_or_path on the synthetic set: the SFT cold start, trained as `--stage sft`
      makes it (`cold_start`), is the model;
    - data.format synthetic: the set rendered at data.path (default <output_dir>/data), then read as the
      plain JSONL file it is, with its tokenizer;
    - no model.model_name_or_path: a tiny random model for the tokenizer, at <output_dir>/base-model.
    """
    out = Path(cfg.output_dir)  # local whenever something is made here (`config.check_output_dir`)
    if cfg.stage == "grpo" and not cfg.model.model_name_or_path and cfg.data.format == "synthetic":
        cfg = cold_start(cfg)
    data = cfg.data
    if data.format == "synthetic":
        from stjax.data.synthetic import generate

        root = Path(data.path or out / "data")
        on_process_zero(
            lambda: generate(root, data.synthetic_walks, cfg.seed, tasks=data.synthetic_tasks), root / "plain.jsonl"
        )
        cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(
                data,
                format="plain",
                path=str(root / "plain.jsonl"),
                tokenizer=data.tokenizer or str(root / "tokenizer"),
                video_root="",  # the set names its videos relative to its file
            ),
        )
    if not cfg.model.model_name_or_path:
        from stjax.data.tokenizer import tiny_model_dir

        tokenizer, source = loop.tokenizer_dir(cfg), out / "base-model"
        on_process_zero(lambda: tiny_model_dir(tokenizer, source, cfg.model.arch, cfg.seed), source / "config.json")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_name_or_path=str(source)))
    return cfg


def cold_start(cfg: TrainConfig) -> TrainConfig:
    """GRPO's embedded starting point: the SFT cold start as `--stage sft` makes it (under
    <output_dir>/sft, trained when missing) as the model, and its synthetic set as the data."""
    out = Path(cfg.output_dir) / "sft"
    if not (out / "hf" / "config.json").exists():
        train(
            config.load(
                None,
                [],
                config.EMBEDDED["sft"],
                stage="sft",
                output_dir=str(out),
                seed=cfg.seed,
                model={"arch": cfg.model.arch},
                data={"synthetic_walks": cfg.data.synthetic_walks, "synthetic_tasks": list(cfg.data.synthetic_tasks)},
            )
        )
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, model_name_or_path=str(out / "hf")),
        data=dataclasses.replace(cfg.data, path=cfg.data.path or str(out / "data")),
    )
