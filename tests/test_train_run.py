"""The SFT run as users start it (`python -m stjax.train`): exact resume after SIGTERM, after kill -9
between saves and after kill -9 during an asynchronous save; 2 processes x 2 devices against
1 process x 4 devices; the K-in-a-row guard; config errors raised before anything is compiled.

One small synthetic set and one tiny base model are made once for the module and shared."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from stjax.train import config as train_config
from stjax.train import loop, sft, stages
from stjax.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STEPS = 24


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(synthetic data dir, tiny base model dir), made once."""
    from stjax.data.synthetic import generate
    from stjax.data.tokenizer import tiny_model_dir

    root = tmp_path_factory.mktemp("train-assets")
    data = generate(root / "data", 2, seed=0, sheet=0)
    model = tiny_model_dir(data / "tokenizer", root / "model", "qwen2_vl", seed=0)
    return data, model


def settings(out: Path, assets, **changes) -> list[str]:
    data, model = assets
    values = {
        "output_dir": out,
        "max_steps": STEPS,
        "batch_size": 2,
        "model.model_name_or_path": model,
        "data.path": data,
        "data.max_pixels": 12544,
        "data.token_buckets": "[256, 512]",
        "data.patch_buckets": "[256, 512]",
        "optim.learning_rate": 3e-3,
        "optim.max_grad_norm": 1.0,
        "checkpoint.save_steps": 0,
        "checkpoint.export_hf": "false",
        "mesh": "fsdp=-1",
        # the command line's embedded default sets these: given here, a run started either way agrees
        "data.synthetic_walks": 2,
        "data.synthetic_tasks": "[direction, landmark, action]",
    }
    values.update(changes)
    return [f"{k}={v}" for k, v in values.items()]


def start(
    out: Path, assets, devices: int = 1, env: dict | None = None, stage: str = "sft", **changes
) -> subprocess.Popen:
    args = [sys.executable, "-m", "stjax.train", "--stage", stage]
    for item in settings(out, assets, **changes):
        args += ["--set", item]
    env = {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "JAX_PLATFORMS": "cpu",
        **(env or {}),
    }
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expect: int = 0, timeout: float = 600) -> str:
    output, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == expect, output[-3000:]
    return output


def losses(out: Path, name: str = "loss") -> dict[int, float]:
    """step -> loss (or another metric), the last record of each step (a resumed run repeats the
    steps after its checkpoint)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[name] for r in records}


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before the condition held:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def logged_steps(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    """The directory of an uninterrupted run (exported to out_dir/hf at its end)."""
    out = tmp_path_factory.mktemp("uninterrupted")
    finish(start(out, assets, **{"checkpoint.export_hf": "true"}))
    return out


@pytest.fixture(scope="module")
def reference(uninterrupted):
    """Per-step losses of the uninterrupted run."""
    result = losses(uninterrupted)
    assert sorted(result) == list(range(1, STEPS + 1))
    assert result[STEPS] < result[1] - 1.0, result  # it learns
    return result


def test_export_on_request_equals_the_end_of_run_export(uninterrupted, tmp_path, capsys):
    from safetensors.numpy import load_file
    from transformers import Qwen2VLForConditionalGeneration

    from stjax.train.export import export_checkpoint, main

    out = tmp_path / "hf"
    main([str(uninterrupted), "--out", str(out)])  # as `python -m stjax.train.export` runs it: it says what it wrote
    printed = capsys.readouterr().out
    assert f"exported the latest checkpoint of {uninterrupted} to {out}: " in printed
    assert "config.json" in printed and "model.safetensors" in printed and "tokenizer.json" in printed
    ours, theirs = load_file(out / "model.safetensors"), load_file(uninterrupted / "hf" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])
    assert (out / "tokenizer.json").exists()
    Qwen2VLForConditionalGeneration.from_pretrained(out)  # a directory transformers loads
    with pytest.raises(ConfigError, match="no checkpoint 7"):
        export_checkpoint(uninterrupted, step=7)


def test_sigterm_saves_and_the_rerun_continues_the_exact_run(assets, reference, tmp_path):
    proc = start(tmp_path, assets, **{"checkpoint.save_steps": 5})
    wait_for(lambda: logged_steps(tmp_path) >= 7, proc)
    proc.send_signal(signal.SIGTERM)
    output = finish(proc, expect=loop.PREEMPTED_EXIT_CODE)
    assert "stopped by SIGTERM" in output
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] >= 7 and saved[-1] % 5  # the SIGTERM checkpoint, not a periodic one
    finish(start(tmp_path, assets, **{"checkpoint.save_steps": 5}))
    assert losses(tmp_path) == reference  # bit for bit


def test_kill_between_saves_resumes_from_the_last_checkpoint(assets, reference, tmp_path):
    proc = start(tmp_path, assets, **{"checkpoint.save_steps": 4})
    wait_for(lambda: logged_steps(tmp_path) >= 10, proc)
    proc.kill()
    proc.wait()
    assert logged_steps(tmp_path) < STEPS
    finish(start(tmp_path, assets, **{"checkpoint.save_steps": 4}))
    assert losses(tmp_path) == reference
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [16, 20, 24]  # checkpoint.keep = 3: the older ones were deleted


def test_kill_during_an_async_save_leaves_the_previous_checkpoint(assets, reference, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    proc = start(tmp_path, assets, **{"checkpoint.save_steps": 4})
    wait_for(lambda: (checkpoints / "4").is_dir(), proc)
    partial = lambda: [p for p in checkpoints.iterdir() if "tmp" in p.name and not p.name.startswith("4")]
    wait_for(lambda: bool(partial()), proc, poll=0.0005)
    proc.kill()
    proc.wait()
    left = partial()
    assert left, "the kill came after the save finished"
    complete = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    output = finish(start(tmp_path, assets, **{"checkpoint.save_steps": 4}))
    assert f"resumed from step {complete[-1]}" in output
    assert losses(tmp_path) == reference


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_and_two_processes(tmp_path: Path, assets, **settings) -> tuple[Path, Path]:
    """The same run as 1 process of 4 devices and as 2 processes of 2 devices: their out_dirs."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    finish(start(single, assets, devices=4, **settings))
    coordinator = f"127.0.0.1:{free_port()}"
    procs = [
        start(
            multi,
            assets,
            devices=2,
            **settings,
            **{"distributed.coordinator": coordinator, "distributed.num_processes": 2, "distributed.process_id": i},
        )
        for i in range(2)
    ]
    for proc in procs:
        finish(proc)
    return single, multi


def test_two_processes_of_two_devices_equal_one_process_of_four(assets, tmp_path):
    single, multi = one_and_two_processes(
        tmp_path, assets, max_steps=3, batch_size=4, mesh="fsdp=-1", **{"checkpoint.export_hf": "true"}
    )
    a, b = losses(single), losses(multi)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    # The same samples, gathered in another order: equal up to float summation order.
    np.testing.assert_allclose([b[k] for k in a], list(a.values()), rtol=1e-5)
    # Process 0 gathered the sharded parameters and exported the same model: equal to 1e-5 but
    # for the rare entry whose near-zero gradient Adam's normalisation turns into a different
    # update (at most lr per step).
    from safetensors.numpy import load_file

    one, two = load_file(single / "hf" / "model.safetensors"), load_file(multi / "hf" / "model.safetensors")
    assert one.keys() == two.keys() and len(one) > 20
    a, b = (np.concatenate([t[name].ravel() for name in sorted(one)]) for t in (one, two))
    assert np.abs(a - b).max() <= 2 * 3 * 3e-3
    assert np.mean(np.abs(a - b) > 1e-5) < 1e-3


def config(tmp_path, assets, **changes):
    """An in-process run's config (this test process has 8 devices)."""
    return train_config.load(None, settings(tmp_path, assets, **{"mesh": "fsdp=2,tensor=4", **changes}))


def test_k_non_finite_steps_in_a_row_stop_the_run_with_the_last_good_state_saved(assets, tmp_path, monkeypatch):
    from stjax.train import batch as batch_lib

    real = batch_lib.host_batch

    def poisoned(model_cfg, micro_batches):
        b = real(model_cfg, micro_batches)
        return b.replace(
            inputs=b.inputs.replace(
                vision=b.inputs.vision.replace(patches=np.full_like(b.inputs.vision.patches, np.nan))
            )
        )

    monkeypatch.setattr(sft, "host_batch", poisoned)
    cfg = config(tmp_path, assets, max_bad_steps=3, **{"lora.r": 4})
    with pytest.raises(loop.TrainingStopped, match="3 non-finite steps in a row"):
        stages.train(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [1, 1, 1]
    assert (tmp_path / "checkpoints" / "3").is_dir()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"optim.learning_rte": 1e-3}, "unknown config key optim.learning_rte"),
        ({"mesh": "fsdp=3,tensor=-1"}, "does not divide 8 devices"),
        ({"mesh": "fsdp=4"}, "needs 4 devices, but 8 are available"),
        ({"mesh": "fsdp=8", "batch_size": 4}, "does not divide over data x fsdp = 8"),
        ({"batch_size": 6, "gradient_accumulation_steps": 4}, "multiple of gradient_accumulation_steps"),
        ({"stage": "ppo"}, "stage='ppo' is not one of sft, grpo"),
        ({"lora.target_modules": "[q_proj, qkv]"}, "lora.target_modules"),
        ({"optim.learning_rate": "fast"}, "optim.learning_rate takes a float"),
        ({"data.second_per_grid": "frames"}, "data.second_per_grid='frames' is not one of seed, kept_frames"),
        ({"lora.quantize_base": "nf5"}, "lora.quantize_base='nf5' is not one of none, nf4, int8"),
        ({"lora.quantize_base": "nf4"}, r"freezes the base: it needs adapters to train \(lora.r > 0\)"),
        ({"lora.r": 4, "lora.quantize_base": "int8", "lora.double_quant": "true"}, "double_quant quantizes nf4's"),
    ],
)
def test_config_errors_come_before_any_loading_or_compiling(assets, tmp_path, monkeypatch, changes, message):
    def too_far(*args, **kwargs):
        raise AssertionError("the run went past its checks")

    monkeypatch.setattr(loop, "prepare_data", too_far)
    monkeypatch.setattr(jax, "jit", too_far)
    with pytest.raises(ConfigError, match=message):
        stages.train(config(tmp_path, assets, **changes))


def test_set_needs_key_equals_value():
    with pytest.raises(ConfigError, match="key=value"):
        train_config.load(None, ["max_steps"])


def test_a_sample_with_a_missing_video_is_recorded_and_the_run_goes_on(assets, tmp_path):
    data, _ = assets
    rows = (data / "plain.jsonl").read_text().splitlines()
    broken = json.loads(rows[0])
    broken.update(id="broken-sample", video=str(tmp_path / "missing.mp4"))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join([json.dumps(broken)] + rows[:3]) + "\n")
    cfg = config(
        tmp_path / "run",
        assets,
        max_steps=1,
        peak_flops=1e12,
        **{
            "data.format": "plain",
            "data.path": path,
            "data.video_root": data / "synth",
            "data.tokenizer": data / "tokenizer",
            "data.shuffle": "false",
        },
    )
    summary = stages.train(cfg)
    assert summary["steps"] == 1
    skipped = json.loads((tmp_path / "run" / "skipped_samples.0.json").read_text())
    assert [s["id"] for s in skipped] == ["broken-sample"]
    assert "missing.mp4" in skipped[0]["reason"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["patches"] == 2 * 4 * 8 * 8  # 2 samples x (8 frames / 2) x (112 / 14)^2 patches
    assert 0 < record["mfu"] < 1  # logged once a device peak is known
