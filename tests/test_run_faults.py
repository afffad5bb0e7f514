"""Faults of issue #24's probe: a run never resumes another stage's checkpoints, nor adapters on a
changed base model, nor a checkpoint whose bytes changed on disk (checksums); a model holding NaN is
never exported; broken rewards stop a GRPO run in one line; bad GRPO settings are refused before
anything is written; a changed num_generations is not resumed."""

import json
import math
import os
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import pytest
from test_grpo_run import GRPO
from test_train_faults import assets, small_checkpoints, train  # noqa: F401
from test_train_run import ROOT, finish, settings, start

from stjax.data.formats import Sample
from stjax.train import config as train_config
from stjax.train import loop, rewards, rundir, stages
from stjax.train.checkpoint import Checkpointer, abstract_like
from stjax.train.config import ConfigError

IN_PROCESS = {"mesh": "fsdp=2,tensor=4"}  # this process has 8 devices


def no_model(*args):
    raise AssertionError("the model was built before the run was refused")


def files(out: Path) -> dict[str, bytes]:
    """Every file under out_dir but the lock (it names its latest holder)."""
    return {
        str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != ".lock"
    }


@pytest.fixture(scope="module")
def lora_run(assets, tmp_path_factory):
    """A 2-step LoRA SFT run (checkpoints 1 and 2) on its own copy of the base model."""
    root = tmp_path_factory.mktemp("lora-run")
    model = shutil.copytree(assets[1], root / "model")
    changes = {"max_steps": 2, "checkpoint.save_steps": 1, "lora.r": 4, "model.model_name_or_path": model}
    train(root / "run", assets, **changes)
    return root / "run", changes


def test_a_grpo_run_on_an_sft_runs_directory_is_refused_and_the_reverse(assets, lora_run, tmp_path, monkeypatch):
    out = shutil.copytree(lora_run[0], tmp_path / "run")
    before = files(out)
    monkeypatch.setattr(loop, "prepare_model", no_model)
    values = settings(out, assets, **{**lora_run[1], **GRPO, **IN_PROCESS})
    with pytest.raises(ConfigError, match=r"other settings \(stage: 'sft' -> 'grpo'"):
        stages.train(train_config.load(None, values, stage="grpo"))
    assert files(out) == before  # nothing written, the sound SFT checkpoints not set aside
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "stage": "grpo"}))  # as a GRPO run would leave it
    with pytest.raises(ConfigError, match=r"other settings \(stage: 'grpo' -> 'sft'"):
        stages.train(train_config.load(None, settings(out, assets, **{**lora_run[1], **IN_PROCESS})))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1", "2"]


def test_a_resume_on_a_changed_base_model_is_refused(assets, lora_run, tmp_path, monkeypatch):
    out = shutil.copytree(lora_run[0], tmp_path / "run")
    weights = Path(lora_run[1]["model.model_name_or_path"]) / "model.safetensors"
    original, stat = weights.read_bytes(), weights.stat()
    monkeypatch.setattr(loop, "prepare_model", no_model)
    try:
        changed = bytearray(original)
        changed[-1] ^= 0x10  # one weight of the last tensor
        weights.write_bytes(bytes(changed))
        with pytest.raises(
            ConfigError,
            match=r"the model files in .*model changed since this run began "
            r"\(model.safetensors\)",
        ):
            stages.train(
                train_config.load(None, settings(out, assets, **{**lora_run[1], "max_steps": 4, **IN_PROCESS}))
            )
    finally:
        weights.write_bytes(original)
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_the_export_tool_says_what_is_wrong(assets, lora_run, tmp_path):
    from test_train_faults import damage

    from stjax.train.checkpoint import CheckpointDamaged
    from stjax.train.export import export_checkpoint

    with pytest.raises(ConfigError, match=r"is not a training run's output_dir .*; it is a model directory"):
        export_checkpoint(assets[1])
    out = shutil.copytree(lora_run[0], tmp_path / "run")
    damage(out / "checkpoints" / "2", "missing state")
    with pytest.raises(
        CheckpointDamaged,
        match=r"checkpoint 2 in .* is damaged \(cannot read its metadata: .*\); "
        r"export another with --step \(there are \[1, 2\]\)",
    ):
        export_checkpoint(out, out=tmp_path / "hf")
    for step in ("1", "2"):
        (out / "checkpoints" / step).rename(out / "checkpoints" / f"{step}.damaged-x")
    with pytest.raises(
        ConfigError,
        match=r"no checkpoint in .* \(there are \[\]; set aside as damaged: "
        r"1.damaged-x, 2.damaged-x\)",
    ):
        export_checkpoint(out)
    assert not (tmp_path / "hf").exists()


def test_a_checkpoint_with_flipped_bytes_is_damaged_and_the_previous_one_restores(tmp_path):
    state, iterator = small_checkpoints(tmp_path)
    array = max((tmp_path / "2" / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    data = bytearray(array.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the compressed values: they still decompress, to other numbers
    array.write_bytes(bytes(data))
    checkpoints = Checkpointer(tmp_path, every=1, keep=3)
    step, restored = checkpoints.restore_latest(abstract_like(state), iterator)
    checkpoints.close()
    assert step == 1 and float(restored["a"][10]) == 10.0 and next(iterator) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.damaged-checksum-mismatch-1-of-its-arrays-differ"]


def test_a_model_holding_nan_is_never_exported(assets, tmp_path):
    from stjax.models.loading import load_pretrained

    data, model_dir = assets
    model, _ = load_pretrained(model_dir)
    kernel = model.model.layers.gate_proj.kernel
    kernel[...] = kernel[...].at[0, 0, 0].set(jnp.nan)
    with pytest.raises(loop.TrainingStopped, match="holds NaN or infinite values .*gate_proj/kernel.*nothing exported"):
        loop.export_hf(model, tmp_path / "hf", data / "tokenizer")
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------ GRPO: rewards and settings


def always_raises(completions, **_):
    raise RuntimeError("the judge is unreachable")


def one_sample(i: int) -> Sample:
    return Sample(
        id=f"s{i}",
        video="v.mp4",
        question="q",
        options=["A. a", "B. b"],
        answer="A",
        task="direction",
        direction="forward",
    )


def scored(values):
    """rewards.score of a function returning `values`, one per completion."""
    fn = lambda completions, **_: values  # noqa: E731
    return rewards.score([fn], ["p"] * len(values), ["x"] * len(values), [one_sample(i) for i in range(len(values))])


@pytest.mark.parametrize(
    "values, message",
    [
        (
            ["0.5", 1.0],
            r"returned 1 value\(s\) that are neither a finite number nor None at step 3, e.g. '0.5' for sample s0",
        ),
        ([1.0, math.inf], r"e.g. inf for sample s1"),
        ([float("nan"), 0.0], r"e.g. nan for sample s0"),
        ([None, None], r"no reward applies to any completion of step 3 \(each of f returned None"),
    ],
)
def test_rewards_that_are_not_finite_numbers_stop_the_run(values, message):
    scores = scored(values)
    total = scores.values[:, 0]
    with pytest.raises(rewards.RewardError, match=message):
        rewards.check(["f"], scores.errors, scores.invalid, scores.problems, total, 3)


def test_a_reward_that_raises_on_some_completions_does_not_stop_the_run():
    fn = lambda completions, **_: [1.0 / (c == "ok") for c in completions]  # noqa: E731
    scores = rewards.score([fn], ["p"] * 2, ["ok", "bad"], [one_sample(0), one_sample(1)])
    assert scores.errors.tolist() == [1] and scores.values[:, 0].tolist() == [1.0, 0.0]
    rewards.check(["f"], scores.errors, scores.invalid, scores.problems, scores.values[:, 0], 1)


def test_a_reward_that_raises_on_every_completion_stops_the_run_in_one_line(assets, tmp_path):
    proc = start(
        tmp_path,
        assets,
        stage="grpo",
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"},
        **{**GRPO, "max_steps": 2, "grpo.reward_funcs": "[accuracy, test_run_faults.always_raises]"},
    )
    output = finish(proc, expect=1)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: reward test_run_faults.always_raises raised on every completion of step 1 \(4\), e.g. on sample "
        r"\S+: RuntimeError: the judge is unreachable; nothing of this step was trained \(--debug for the traceback\)",
        errors[0],
    ), output[-2000:]
    assert "Traceback" not in output
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"grpo.reward_funcs": "[acuracy]"}, "grpo.reward_funcs: reward function 'acuracy' is neither built in"),
        (
            {"grpo.reward_funcs": "[no_such_module.reward]"},
            "grpo.reward_funcs: reward function 'no_such_module.reward'",
        ),
        ({"grpo.rollout_mesh": "tensor=3"}, "grpo.rollout_mesh='tensor=3'"),
        ({"grpo.temperature": "nan"}, "grpo.temperature=nan must be a finite number"),
        ({"grpo.beta": "inf"}, "grpo.beta=inf must be a finite number"),
    ],
)
def test_a_refused_grpo_rerun_writes_nothing(assets, tmp_path, monkeypatch, changes, message):
    (tmp_path / "config.json").write_text("the previous run's settings")
    monkeypatch.setattr(loop, "prepare_data", lambda *a: pytest.fail("the run went past its checks"))
    values = settings(tmp_path, assets, **{**GRPO, **IN_PROCESS, **changes})
    with pytest.raises(ConfigError, match=message):
        stages.train(train_config.load(None, values, stage="grpo"))
    assert files(tmp_path) == {"config.json": b"the previous run's settings"}


def test_a_changed_num_generations_is_not_resumed(assets, tmp_path):
    cfg = train_config.load(None, settings(tmp_path, assets, **GRPO), stage="grpo")
    rundir.write_config(tmp_path, cfg)
    (tmp_path / "checkpoints" / "2").mkdir(parents=True)
    rundir.check_resume(tmp_path, cfg)
    more = train_config.load(None, settings(tmp_path, assets, **{**GRPO, "grpo.num_generations": 4}), stage="grpo")
    with pytest.raises(ConfigError, match=r"other settings \(grpo.num_generations: 2 -> 4\)"):
        rundir.check_resume(tmp_path, more)


def test_summary_json_keeps_the_history_of_the_runs_invocations(tmp_path):
    from stjax.train.metrics import MetricsLogger

    for start_step, steps, loss in ((0, (1, 2, 3), 2.0), (2, (3, 4), 1.0)):  # resumed from checkpoint 2
        with MetricsLogger(tmp_path, total_steps=4, start_step=start_step, progress=False) as log:
            for step in steps:
                log.log(step, {"loss": loss})
            summary = log.summary()
    recorded = json.loads((tmp_path / "summary.json").read_text())
    assert recorded == summary and summary["steps"] == 2 and summary["final_loss"] == 1.0
    assert [(i["from_step"], i["to_step"], i["steps"], i["final_loss"]) for i in recorded["invocations"]] == [
        (0, 3, 3, 2.0),
        (2, 4, 2, 1.0),
    ]
