"""The run's console in batch jobs (plain lines every `logging_steps`), its ETA without the compile step, the
bar's stage name, and `report_to` (wandb's offline run files read back with their own protobuf schema)."""

from __future__ import annotations

import dataclasses
import json
import re
import struct

import numpy as np
import pytest

import stjax.train.metrics as metrics
from stjax.train import config as train_config
from stjax.train.metrics import MetricsLogger


class Clock:
    """time.time for the logger, moved on by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# step 1 compiles (100 s), every later step takes 2 s
DURATIONS = [100.0] + [2.0] * 9
LOSSES = [5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]


def run_steps(logger: MetricsLogger, clock: Clock, first: int, last: int) -> None:
    for step in range(first, last + 1):
        clock.now += DURATIONS[step - 1]
        logger.log(step, {"loss": LOSSES[step - 1], "skipped": 0.0})


def test_a_batch_job_log_gets_a_plain_line_every_logging_steps(tmp_path, monkeypatch, capsys):
    """stdout not a terminal (pytest captures it): no bar, a line at the first step, every 4th and the last,
    each metric the mean over the steps since the line before (TRL's logging); the ETA counts 2 s a step, not
    the compile step's 100 s."""
    clock = Clock()
    monkeypatch.setattr(metrics.time, "time", clock)
    with MetricsLogger(tmp_path, total_steps=10, logging_steps=4, desc="grpo") as logger:
        assert logger.bar is None
        run_steps(logger, clock, 1, 10)
    lines = capsys.readouterr().out.splitlines()
    assert [int(re.match(r"grpo step (\d+)/10 ", line).group(1)) for line in lines] == [1, 4, 8, 10]
    means = [float(re.search(r" loss=(\S+) ", line).group(1)) for line in lines]
    np.testing.assert_allclose(
        means, [5.0, np.mean(LOSSES[1:4]), np.mean(LOSSES[4:8]), np.mean(LOSSES[8:10])], rtol=1e-3
    )  # printed to 4 significant digits
    etas = [line.rsplit("eta=", 1)[1] for line in lines]
    assert etas == ["?", "0:00:12", "0:00:04", "0:00:00"]  # (10 - step) x 2 s; unknown right after compiling
    assert all("\r" not in line and len(line) < 200 for line in lines)


def test_a_fraction_for_logging_steps_is_a_share_of_the_run():
    assert metrics.logging_interval(0.25, 10) == 3 and metrics.logging_interval(10, 3) == 10  # TRL: ceil(x * steps)


def test_the_bar_names_the_stage_and_its_eta_leaves_out_the_compile_step(tmp_path, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(metrics.time, "time", clock)
    with MetricsLogger(tmp_path, total_steps=10, interactive=True, desc="sft") as logger:
        run_steps(logger, clock, 1, 1)
        assert str(logger.bar).startswith("sft:") and "<?" in str(logger.bar)  # no rate yet: only compiling
        run_steps(logger, clock, 2, 3)
        assert "<00:14" in str(logger.bar)  # 7 steps x 2 s (with the compile step: 7 x 34.7 s, 04:02)


def read_wandb_records(path) -> list:
    """The records of a wandb transaction log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB's
    log format (32 KiB blocks of records with a 7-byte header: CRC, length, type; FULL=1, FIRST, MIDDLE, LAST=4),
    each payload a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B" and struct.unpack("<H", data[4:6])[0] == 0xBEE1
    pos, payload, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def test_wandb_offline_run_files_hold_every_steps_metrics(tmp_path, monkeypatch):
    """report_to: [wandb] with WANDB_MODE=offline: the run's transaction log under <output_dir>/wandb holds the
    config and each step's values; a resumed run logs to the same wandb run id."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with MetricsLogger(out, total_steps=4, report_to=["wandb"], progress=False, config={"stage": "sft"}) as logger:
        for step in (1, 2):
            logger.log(step, {"loss": 1.0 / step, "reward": 0.25})
    with MetricsLogger(out, total_steps=4, start_step=2, report_to=["wandb"], progress=False) as logger:
        logger.log(3, {"loss": 0.125, "reward": 0.5})
    runs = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({p.name for p in runs}) == 1  # one wandb run id for the two invocations
    history, config = [], {}
    for path in runs:
        for record in read_wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                history.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
            elif kind == "run":
                config |= {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.run.config.update
                }
    assert [(h["_step"], h["loss"], h["reward"]) for h in history] == [(1, 1.0, 0.25), (2, 0.5, 0.25), (3, 0.125, 0.5)]
    assert config["stage"] == "sft"


def test_report_to_is_checked_with_the_config(monkeypatch):
    cfg = train_config.TrainConfig()
    with pytest.raises(train_config.ConfigError, match="'mlflow' is not one of tensorboard, wandb"):
        train_config.check(dataclasses.replace(cfg, report_to=("mlflow",)), 1)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "wandb" else find_spec(name))
    with pytest.raises(train_config.ConfigError, match=r'pip install "stjax\[wandb\]"'):
        train_config.check(dataclasses.replace(cfg, report_to=("wandb",)), 1)
    with pytest.raises(train_config.ConfigError, match="logging_steps=0"):
        train_config.check(dataclasses.replace(cfg, logging_steps=0), 1)
