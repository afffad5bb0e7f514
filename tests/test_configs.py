"""Every file in configs/ loads and passes its checks; every training config runs one step of its
stage (`stjax.train.stages.train`) with its shapes shrunk to a tiny model (the same overrides a user would give
with --set), so no shipped config can rot unseen.

What the overrides keep: the config's dtypes, attention backend, remat policy, LoRA settings
(dropout included), optimizer, loss settings, batch and micro-batch sizes (so its gradient
accumulation) and its mesh where the 8 simulated devices can hold it. What they replace: the model
(a tiny random one of the same architecture), the data (the synthetic set, frames cut to 112 x 112),
the run length (1 step), GRPO's completion length (8 tokens), the loader workers (in-process) and the
final export."""

import dataclasses
import importlib.util
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import transformers

from stjax.compile_only import CHIPS
from stjax.eval.mcq import EvalConfig, check_config, parse_config
from stjax.models.config import QwenVLConfig
from stjax.models.qwen_vl import abstract_model
from stjax.sharding import mesh_shape, parse_mesh
from stjax.train import config as train_config
from stjax.train import stages
from stjax.train.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN = sorted(CONFIGS.glob("sft/*.yaml")) + sorted(CONFIGS.glob("grpo/*.yaml"))
EVAL = sorted(CONFIGS.glob("eval/*.yaml"))
MODELS = sorted(CONFIGS.glob("models/*.json"))


def test_every_config_is_listed():
    assert len(TRAIN) == 17 and len(EVAL) == 2 and len(MODELS) == 7
    assert {p.parent.name for p in CONFIGS.glob("*/*")} == {"sft", "grpo", "eval", "models"}


def compile_targets() -> dict[str, str]:
    """benchmarks/compile_check.py's config -> target table."""
    path = CONFIGS.parent / "benchmarks" / "compile_check.py"
    spec = importlib.util.spec_from_file_location("compile_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TARGETS


def target_devices(topology: str) -> tuple[str, int]:
    """(chip, device count) a target names: v5p:2x2x2 -> (v5p, 8), h100x4 -> (h100, 4)."""
    chip, _, shape = topology.partition(":")
    if not shape:
        chip, _, shape = topology.rpartition("x")
    return chip, math.prod(int(n) for n in shape.split("x"))


def test_every_accelerator_config_names_a_target_the_compile_check_compiles_it_for():
    """Each shipped training config but the CPU ones (run whole by the test below) is in
    benchmarks/compile_check.py's table, so BENCHMARKS.md's compile table can cover it: a known chip, and
    as many devices as the config's mesh passes its checks on. No entry names a config that is gone."""
    targets = compile_targets()
    assert all((CONFIGS.parent / name).is_file() for name in targets)
    for path in TRAIN:
        name = f"configs/{path.parent.name}/{path.name}"
        if "cpu" in path.stem:
            assert name not in targets
            continue
        assert name in targets, f"{name} has no target in benchmarks/compile_check.py"
        chip, devices = target_devices(targets[name])
        assert chip in CHIPS, (name, targets[name])
        train_config.check(train_config.load(path), devices)


def architecture(cfg: train_config.TrainConfig) -> str:
    """The config's architecture: named by its model directory, else `model.arch`."""
    if not cfg.model.model_name_or_path:
        return cfg.model.arch
    return (
        "qwen3_vl"
        if "qwen3" in cfg.model.model_name_or_path.lower()
        else "qwen2_5_vl"
        if "2.5" in cfg.model.model_name_or_path
        else "qwen2_vl"
    )


def shrunk_mesh(cfg: train_config.TrainConfig, devices: int) -> str:
    """The config's mesh if the devices can hold it, else fsdp over as many devices as the
    micro-batch divides and tensor parallelism over the rest."""
    try:
        train_config.check(cfg, devices)
        return cfg.mesh
    except ConfigError:
        rows = cfg.micro_batch
        if cfg.stage == "grpo":  # whole prompts' groups per device
            rows = math.gcd(rows, cfg.batch_size // cfg.grpo.num_generations)
        fsdp = math.gcd(rows, devices)
        return f"fsdp={fsdp},tensor={devices // fsdp}"


def shrunk_rollout_mesh(cfg: train_config.TrainConfig, devices: int) -> str:
    """The config's rollout mesh if the devices can hold it, else its tensor axis over half of them and
    two copies (each copy decodes whole groups)."""
    try:
        mesh_shape(parse_mesh(cfg.grpo.rollout_mesh), devices)
        return cfg.grpo.rollout_mesh
    except ValueError:
        return f"data=2,tensor={devices // 2}"


@pytest.mark.slow  # one compile of the sharded step per config: 15-60 s each on 2 cores
@pytest.mark.parametrize("path", TRAIN, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_train_config_runs_one_step_shrunk(path, synthetic_assets, tmp_path):
    data, models = synthetic_assets
    cfg = train_config.load(path)
    if "=-1" not in cfg.mesh:  # the config passes its checks on the devices its mesh names (4 or 8 GPUs, 32 chips)
        train_config.check(cfg, math.prod(parse_mesh(cfg.mesh).values()))
    shrunk = train_config.load(
        path,
        [
            f"output_dir={tmp_path}",
            "max_steps=1",
            f"model.model_name_or_path={models[architecture(cfg)]}",
            "data.format=synthetic",
            f"data.path={data}",
            "data.max_pixels=12544",
            "data.token_buckets=[512, 1024]",
            "data.patch_buckets=[1024, 2048]",
            "data.dataloader_num_workers=0",
            "checkpoint.export_hf=false",
            f"mesh={shrunk_mesh(cfg, jax.device_count())}",
        ]
        + (["grpo.max_completion_length=8"] if cfg.stage == "grpo" else [])
        + ([f"grpo.rollout_mesh={shrunk_rollout_mesh(cfg, jax.device_count())}"] if cfg.grpo.rollout_mesh else []),
    )
    # what the overrides keep
    kept = ("batch_size", "gradient_accumulation_steps", "loss_average", "loss_chunk", "optim", "lora")
    assert all(getattr(shrunk, k) == getattr(cfg, k) for k in kept)
    assert (
        shrunk.model.param_dtype,
        shrunk.model.master_dtype,
        shrunk.model.compute_dtype,
        shrunk.model.gradient_checkpointing,
        shrunk.model.attention,
    ) == (
        cfg.model.param_dtype,
        cfg.model.master_dtype,
        cfg.model.compute_dtype,
        cfg.model.gradient_checkpointing,
        cfg.model.attention,
    )
    train_config.check(shrunk, jax.device_count())
    summary = stages.train(shrunk)
    assert summary["steps"] == 1 and summary["skipped_steps"] == 0 and np.isfinite(summary["final_loss"])
    assert (tmp_path / "checkpoints" / "1").is_dir()


@pytest.mark.parametrize("path", EVAL, ids=lambda p: p.stem)
def test_eval_config_loads_and_validates(path):
    cfg = parse_config(["--config", str(path)])
    check_config(cfg)
    assert cfg.model and cfg.data  # a complete run, not the embedded default


def test_eval_config_check_refuses_bad_values():
    with pytest.raises(SystemExit, match="--mode 'sample' is not one of"):
        check_config(EvalConfig(mode="sample"))
    with pytest.raises(SystemExit, match="--max-new-tokens takes an integer, got '512'"):
        check_config(EvalConfig(max_new_tokens="512"))
    with pytest.raises(SystemExit, match="--fps takes a number, got '1e-5'"):
        check_config(EvalConfig(fps="1e-5"))


HF_CLASSES = {
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
}


@pytest.mark.parametrize("path", MODELS, ids=lambda p: p.stem)
def test_model_preset_has_transformers_parameter_count(path):
    """Each preset loads, transformers reads its config, and the model built from it has exactly
    transformers' parameter count and the same tensor shapes (built on the meta device: no memory)."""
    cfg = QwenVLConfig.from_file(path)
    hf_config = transformers.AutoConfig.for_model(**cfg.to_hf_dict())
    with torch.device("meta"):
        hf = HF_CLASSES[cfg.model_type]._from_config(hf_config)
    theirs = sum(p.numel() for p in hf.parameters())
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_model(cfg)))
    assert ours == theirs, (ours, theirs)


def test_cold_start_is_trained_as_stage_sft_makes_it(monkeypatch, tmp_path):
    """GRPO's embedded cold start: `--stage sft`'s embedded config but for what GRPO sets (its folder, seed,
    architecture and walk count); the SFT media settings (112 x 112 frames, small buckets) are kept."""
    made = []
    monkeypatch.setattr(stages, "train", made.append)
    cfg = train_config.load(
        None,
        [],
        train_config.EMBEDDED["grpo"],
        stage="grpo",
        output_dir=str(tmp_path),
        seed=3,
        model={"arch": "qwen2_5_vl"},
        data={"synthetic_walks": 5},
    )
    stages.cold_start(cfg)
    stage_sft = train_config.load(None, [], train_config.EMBEDDED["sft"], stage="sft")
    assert made == [
        dataclasses.replace(
            stage_sft,
            output_dir=str(tmp_path / "sft"),
            seed=3,
            model=dataclasses.replace(stage_sft.model, arch="qwen2_5_vl"),
            data=dataclasses.replace(stage_sft.data, synthetic_walks=5),
        )
    ]
    assert made[0].data.max_pixels == train_config.EMBEDDED["sft"]["data"]["max_pixels"] < 360 * 420
