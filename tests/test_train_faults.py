"""Faults of issue #15 in training: damaged checkpoints are set aside and the run resumes from the
newest one that restores; a failed save stops the run at once and keeps the last good checkpoint;
SIGINT saves like SIGTERM; metrics.jsonl holds each step once; a run that trains nothing fails and
exports nothing; a refused resume leaves out_dir unchanged; one run per out_dir; changed data is
detected on resume."""

import contextlib
import dataclasses
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import grain
import jax.numpy as jnp
import pytest
from test_train_run import finish, logged_steps, settings, start, wait_for

from stjax.io import OutputError
from stjax.train import config as train_config
from stjax.train import loop, stages
from stjax.train.checkpoint import CheckpointDamaged, Checkpointer, CheckpointMismatch, abstract_like
from stjax.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from stjax.data.synthetic import generate
    from stjax.data.tokenizer import tiny_model_dir

    root = tmp_path_factory.mktemp("train-fault-assets")
    data = generate(root / "data", 1, seed=0, sheet=0)
    return data, tiny_model_dir(data / "tokenizer", root / "model", "qwen2_vl", seed=0)


def train(out: Path, assets, expect: int = 0, **changes) -> str:
    """A run as users start it, on one device (compiles faster than this test process's 8); its output."""
    return finish(start(out, assets, **changes), expect)


def refused(out: Path, assets, **changes) -> None:
    """An in-process run that must be refused before any device work (this process has 8 devices)."""
    stages.train(train_config.load(None, settings(out, assets, **{"mesh": "fsdp=2,tensor=4", **changes})))


def steps_logged(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ damaged checkpoints


def damage(step_dir: Path, kind: str) -> None:
    if kind == "truncated array":
        array = max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        array.write_bytes(array.read_bytes()[:100])
    elif kind == "corrupt data state":
        next((step_dir / "data").glob("process_*.json")).write_text("{garbage")
    elif kind == "missing state":
        shutil.rmtree(step_dir / "state")
    elif kind == "empty manifest":
        (step_dir / "state" / "manifest.ocdbt").write_bytes(b"")


def small_checkpoints(directory: Path) -> tuple[dict, grain.DatasetIterator]:
    """Checkpoints 1 and 2 of a small state with a data position; returns the state and a fresh iterator."""
    state = {"a": jnp.arange(1000.0), "b": {"c": jnp.ones((20, 20))}}
    iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
    checkpoints = Checkpointer(directory, every=1, keep=3)
    for step in (1, 2):
        next(iterator)
        checkpoints.save(step, scaled(state, step), iterator)
        checkpoints.wait()
    checkpoints.close()
    return state, iter(grain.MapDataset.range(100).to_iter_dataset())


def scaled(state: dict, factor: float) -> dict:
    return {"a": state["a"] * factor, "b": {"c": state["b"]["c"] * factor}}


@pytest.mark.parametrize("kind", ["truncated array", "corrupt data state", "missing state", "empty manifest"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_previous_one_restores(tmp_path, kind, caplog):
    state, iterator = small_checkpoints(tmp_path)
    damage(tmp_path / "2", kind)
    checkpoints = Checkpointer(tmp_path, every=1, keep=3)
    step, restored = checkpoints.restore_latest(abstract_like(state), iterator)
    checkpoints.close()
    assert step == 1 and float(restored["a"][10]) == 10.0 and next(iterator) == 1  # the position after step 1
    aside = [p.name for p in tmp_path.iterdir() if ".damaged-" in p.name]
    assert len(aside) == 1 and aside[0].startswith("2.damaged-")
    warning = [r.getMessage() for r in caplog.records if r.name.startswith("stjax")]
    assert len(warning) == 1 and "\n" not in warning[0] and warning[0].startswith("checkpoint 2 is damaged")


def test_with_no_checkpoint_that_restores_the_run_stops_and_says_so(tmp_path):
    state, iterator = small_checkpoints(tmp_path)
    damage(tmp_path / "2", "missing state")
    damage(tmp_path / "1", "empty manifest")
    for _ in range(2):  # and a rerun does not quietly start afresh
        checkpoints = Checkpointer(tmp_path, every=1, keep=3)
        with pytest.raises(CheckpointDamaged, match="no checkpoint in .* restores"):
            checkpoints.restore_latest(abstract_like(state), iterator)
        checkpoints.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_checkpoint_of_another_train_state_is_refused_not_set_aside(tmp_path):
    state, iterator = small_checkpoints(tmp_path)
    other = {"a": jnp.arange(4.0), "b": {"c": jnp.ones((20, 20))}}
    checkpoints = Checkpointer(tmp_path, every=1, keep=3)
    with pytest.raises(CheckpointMismatch, match=f"checkpoint {tmp_path / '2'} does not match"):
        checkpoints.restore_latest(abstract_like(other), iterator)
    checkpoints.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


def test_a_run_resumes_past_a_damaged_checkpoint(assets, tmp_path):
    train(tmp_path, assets, max_steps=4, **{"checkpoint.save_steps": 2})
    damage(tmp_path / "checkpoints" / "4", "truncated array")
    train(tmp_path, assets, max_steps=6, **{"checkpoint.save_steps": 2})
    assert steps_logged(tmp_path) == [1, 2, 3, 4, 5, 6]  # 3 and 4 redone from checkpoint 2, each once
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert any(n.startswith("4.damaged-") for n in names) and "6" in names


# ------------------------------------------------------------------ saves that fail, signals

FILL_DISK = """
import resource, signal, sys
from stjax.cli import run_cli
from stjax.train import checkpoint, config, stages
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
save, saves = checkpoint.Checkpointer.save, []
def save_then_fill(self, *args):
    saves.append(1)
    if len(saves) == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    save(self, *args)
checkpoint.Checkpointer.save = save_then_fill
run_cli(lambda argv: stages.train(config.load(None, sys.argv[1:])))
"""


def test_a_failed_save_stops_the_run_at_once_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    args = settings(tmp_path, assets, max_steps=24, **{"checkpoint.save_steps": 6})
    result = subprocess.run(
        [sys.executable, "-c", FILL_DISK, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1, result.stderr[-2000:]
    # the run's report is one line; orbax's background threads' tracebacks only come with --debug
    (last,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in result.stderr and "ERROR" not in result.stderr, result.stderr[-3000:]
    assert last.startswith("error: writing checkpoint 12") and "the last good checkpoint is 6" in last, last
    assert max(steps_logged(tmp_path)) < 18  # stopped when the save failed, not at the next save
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["6"]  # no partial left
    train(tmp_path, assets, max_steps=24, **{"checkpoint.save_steps": 6})  # resumes from 6
    assert steps_logged(tmp_path) == list(range(1, 25))


def test_sigint_saves_like_sigterm(assets, tmp_path):
    proc = start(tmp_path, assets, max_steps=40)
    wait_for(lambda: logged_steps(tmp_path) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    output = finish(proc, expect=130)
    assert "stopped by SIGINT" in output
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [max(steps_logged(tmp_path))]


def test_metrics_hold_each_step_once_after_a_kill(assets, tmp_path):
    proc = start(tmp_path, assets, max_steps=8, **{"checkpoint.save_steps": 2})
    wait_for(lambda: logged_steps(tmp_path) >= 5, proc)
    proc.kill()
    proc.wait()
    train(tmp_path, assets, max_steps=8, **{"checkpoint.save_steps": 2})
    assert steps_logged(tmp_path) == list(range(1, 9))


# ------------------------------------------------------------------ runs that cannot or must not go on


def test_negative_steps_are_refused_before_any_work(assets, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "stjax.train",
            *sum(
                (["--set", a] for a in settings(tmp_path, assets, max_steps=-5, **{"checkpoint.export_hf": "true"})), []
            ),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "max_steps=-5 must be >= 0" in result.stderr
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_a_run_where_every_sample_is_unreadable_fails_and_exports_nothing(assets, tmp_path):
    data, model = assets
    rows = [json.loads(line) for line in (data / "plain.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        broken = tmp_path / f"broken{i}.mp4"
        broken.write_bytes(b"not a video" * 100)
        row["video"] = str(broken)
    (tmp_path / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = train(
        tmp_path / "run",
        assets,
        expect=1,
        **{
            "data.format": "plain",
            "data.path": tmp_path / "broken.jsonl",
            "data.tokenizer": data / "tokenizer",
            "checkpoint.export_hf": "true",
        },
    )
    assert output.strip().splitlines()[-1].startswith("error: no step was trained")
    assert not (tmp_path / "run" / "hf").exists()
    skipped = json.loads((tmp_path / "run" / "skipped_samples.0.json").read_text())  # every epoch's tries
    assert {s["id"] for s in skipped} == {r["id"] for r in rows}
    assert all("cannot open video" in s["reason"] for s in skipped)


def test_a_refused_resume_changes_nothing_and_is_refused_before_the_model_is_built(assets, tmp_path, monkeypatch):
    train(tmp_path, assets, max_steps=2)
    files = lambda: {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file() and p.name != ".lock"}
    before = files()

    def no_model(*args):
        raise AssertionError("the model was built before the resume was refused")

    monkeypatch.setattr(loop, "prepare_model", no_model)
    with pytest.raises(ConfigError, match=r"other settings \(lora.r: 0 -> 4\)"):
        refused(tmp_path, assets, max_steps=4, **{"lora.r": 4})
    assert files() == before  # (the lock file names its latest holder)


def test_a_tokenizer_that_does_not_match_the_model_is_refused_before_the_model_is_built(assets, tmp_path, monkeypatch):
    data, model = assets
    other = shutil.copytree(model, tmp_path / "model")
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(dict(config, video_token_id=config["video_token_id"] + 1)))
    monkeypatch.setattr(loop, "prepare_model", lambda *args: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match="image/video/vision-start ids .* differ from the model's"):
        refused(tmp_path / "run", assets, **{"model.model_name_or_path": other})
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_changed_data_file_is_detected_on_resume(assets, tmp_path, monkeypatch):
    data, _ = assets
    plain = tmp_path / "plain.jsonl"
    shutil.copy(data / "plain.jsonl", plain)
    changes = {
        "data.format": "plain",
        "data.path": plain,
        "data.video_root": data / "synth",
        "data.tokenizer": data / "tokenizer",
    }
    train(tmp_path / "run", assets, max_steps=2, **changes)
    rows = plain.read_text().splitlines()
    plain.write_text("\n".join(reversed(rows)) + "\n")
    monkeypatch.setattr(loop, "prepare_model", lambda *args: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match="plain.jsonl changed since this run began"):
        refused(tmp_path / "run", assets, max_steps=4, **changes)


@contextlib.contextmanager
def locked_elsewhere(directory: Path, what: str):
    """`directory`'s lock held by another process (as a run of `what` would hold it) for the block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from stjax.io import DirectoryLock; "
            f"DirectoryLock({str(directory)!r}, {what!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_second_run_on_the_same_out_dir_is_refused(assets, tmp_path):
    with locked_elsewhere(tmp_path, "training run"):
        with pytest.raises(OutputError, match="is in use by another training run"):
            refused(tmp_path, assets, max_steps=2)
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_second_embedded_default_run_is_refused_before_it_makes_its_inputs(tmp_path):
    """The embedded default makes its synthetic set and tiny model under output_dir: the lock comes first, so a
    second run neither renders videos nor rewrites the model the first one is reading."""
    cfg = train_config.load(None, [], train_config.EMBEDDED["sft"], output_dir=str(tmp_path), mesh="fsdp=2,tensor=4")
    with locked_elsewhere(tmp_path, "training run"):
        with pytest.raises(OutputError, match="is in use by another training run"):
            stages.train(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]


def test_a_run_recorded_under_the_old_names_resumes_and_exports_under_the_new(tmp_path):
    """A run directory whose config.json predates the TRL names (out_dir, steps, micro_batch_size, model.init,
    lora.rank, ...) is read under today's: its resume is not refused as changed, and its export parses it."""
    from stjax.train import rundir

    cfg = train_config.load(None, [], train_config.EMBEDDED["sft"], output_dir=str(tmp_path), batch_size=8)
    today = json.loads(json.dumps(dataclasses.asdict(cfg)))
    old = json.loads(json.dumps(today))
    old["out_dir"] = old.pop("output_dir")
    old["steps"] = old.pop("max_steps")
    old["epochs"] = old.pop("num_train_epochs")
    old["micro_batch_size"] = 8 // old.pop("gradient_accumulation_steps")
    old["model"]["init"] = old["model"].pop("model_name_or_path")
    old["lora"]["rank"] = old["lora"].pop("r")
    old["lora"]["targets"] = old["lora"].pop("target_modules")
    old["optim"]["b1"] = old["optim"].pop("adam_beta1")
    old["checkpoint"]["every"] = old["checkpoint"].pop("save_steps")
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    assert rundir.recorded_config(tmp_path) == today
    rundir.check_resume(tmp_path, cfg)  # the same settings: not refused
    assert train_config.parse(rundir.recorded_config(tmp_path)) == cfg
