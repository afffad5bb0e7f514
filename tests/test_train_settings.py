"""The training config as a TRL user meets it: TRL / transformers / PEFT names (an old stjax name is
refused with its new one), a `--help` that gives every setting's meaning and allowed values from the
fields themselves, `--stage` refused where the config names another stage, one ConfigError, and the
stage registry that the command line and the check share. No model is built: each test is cheap."""

import dataclasses
import io
import re
from contextlib import redirect_stdout

import pytest

import stjax.models.config
import stjax.settings
from stjax.models.attention import BACKENDS
from stjax.train import config as train_config
from stjax.train.__main__ import main as train_main
from stjax.train.config import HINTS, RENAMED, STAGES, ConfigError, TrainConfig


def keys(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every setting's dotted key, from the dataclasses (not from the help text under test)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            out += keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def help_text() -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        train_main(["--help"])
    return out.getvalue()


def test_help_describes_every_setting_with_its_allowed_values():
    text = help_text()
    described = dict(re.findall(r"^  (\S+) = .*?: (.+)$", text, flags=re.M))
    assert sorted(described) == sorted(keys())  # every key, none twice, none invented
    assert all(len(meaning) > 10 for meaning in described.values()), described
    assert f"(one of {' | '.join(BACKENDS)})" in described["model.attention"]
    assert "(one of grpo | bnpo | dr_grpo | dapo | cispo)" in described["grpo.loss_type"]
    assert "(>= 1)" in described["gradient_accumulation_steps"]
    # the text is the field's own (one source): the metadata, not a second copy
    field = next(f for f in dataclasses.fields(train_config.GRPOSection) if f.name == "beta")
    assert described["grpo.beta"].startswith(field.metadata["help"])


@pytest.mark.parametrize("old", sorted(HINTS))
def test_an_old_or_trl_name_is_refused_with_what_to_type(tmp_path, old):
    *section, name = old.split(".")
    with pytest.raises(ConfigError, match=rf"^`{re.escape(old)}` {re.escape(HINTS[old])}$") as error:
        train_config.load(None, [f"{old}=1"])
    assert "\n" not in str(error.value)
    path = tmp_path / "old.yaml"
    path.write_text(f"{section[0]}:\n  {name}: 1\n" if section else f"{name}: 1\n")
    with pytest.raises(ConfigError, match=rf"^`{re.escape(old)}` {re.escape(HINTS[old])}$"):
        train_config.load(path)


def test_the_renames_name_existing_keys_and_the_hints_say_what_to_type():
    assert str(pytest.raises(ConfigError, train_config.load, None, ["steps=3"]).value) == "`steps` is now `max_steps`"
    assert HINTS["micro_batch_size"] == "is now `gradient_accumulation_steps` (= batch_size / micro_batch_size)"
    assert "`batch_size`, the global batch" in HINTS["per_device_train_batch_size"]
    assert all(new in keys() for new in RENAMED.values())
    assert train_config.load(None, ["batch_size=8", "gradient_accumulation_steps=4"]).micro_batch == 2


def test_gradient_checkpointing_takes_transformers_booleans():
    assert train_config.load(None, ["model.gradient_checkpointing=true"]).model.gradient_checkpointing == "full"
    assert train_config.load(None, ["model.gradient_checkpointing=false"]).model.gradient_checkpointing == "none"
    assert train_config.load(None, ["model.gradient_checkpointing=dots"]).model.gradient_checkpointing == "dots"


@pytest.mark.parametrize("where", ["file", "set"])
def test_stage_on_the_command_line_conflicting_with_the_configs_is_refused(tmp_path, where, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("stage: sft\n" if where == "file" else "max_steps: 1\n")
    argv = ["--stage", "grpo", "--config", str(path)] + (["--set", "stage=sft"] if where == "set" else [])
    with pytest.raises(
        ConfigError,
        match=r"^--stage grpo conflicts with stage: sft in " + (re.escape(str(path)) if where == "file" else "--set"),
    ):
        train_main(argv)
    # the same stage twice, or a config without one, is no conflict
    assert train_config.load(path, [], stage="sft").stage == "sft"
    assert train_config.load(None, ["max_steps=1"], stage="grpo").stage == "grpo"


def test_one_config_error_for_models_and_runs():
    assert stjax.models.config.ConfigError is ConfigError is stjax.settings.ConfigError
    with pytest.raises(ConfigError):
        stjax.models.config.QwenVLConfig.from_file("/no/such/model")


def test_each_section_exports_and_checks_its_allowed_values():
    allowed = stjax.settings.choices(TrainConfig)
    assert allowed["stage"] == tuple(STAGES)
    assert allowed["model.attention"] == BACKENDS
    assert allowed["lora.target_modules"] == train_config.LORA_TARGETS
    with pytest.raises(ConfigError, match=r"^grpo.scale_rewards='mean' is not one of group, batch, none$"):
        train_config.GRPOSection(scale_rewards="mean").check()
    with pytest.raises(ConfigError, match=r"^data.num_frames=0 must be >= 1$"):
        train_config.DataSection(num_frames=0).check()
    with pytest.raises(ConfigError, match=r"^optim.warmup_ratio=1.5 must be in \[0, 1\]$"):
        train_config.OptimConfig(warmup_ratio=1.5).check()


def test_the_stage_registry_is_what_the_command_line_and_the_check_use(monkeypatch):
    assert set(STAGES) == {"sft", "grpo"} and train_config.EMBEDDED["grpo"] is STAGES["grpo"].embedded
    assert "--stage {sft,grpo}" in help_text()
    # the check asks the stage for its templates and its own check
    seen = []
    monkeypatch.setitem(
        STAGES,
        "sft",
        dataclasses.replace(STAGES["sft"], templates=("", "sft", "problem"), check=lambda *a: seen.append(a)),
    )
    train_config.check(train_config.load(None, ["data.template=problem"]), 1)
    assert len(seen) == 1


def test_the_evaluator_explains_every_option_and_reads_yaml_as_training_does(tmp_path):
    from stjax.eval.mcq import EvalConfig, parse_config

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        parse_config(["--help"])
    text = " ".join(out.getvalue().split())  # argparse wraps the help lines
    for f in dataclasses.fields(EvalConfig):
        assert len(f.metadata["help"]) > 10 and " ".join(f.metadata["help"].split()) in text, f.name
    assert "--walks WALKS embedded default only (no --model, no --data): walks of its synthetic benchmark" in text
    config = tmp_path / "eval.yaml"
    config.write_text("fps: 2\nmax-new-tokens: 16\n")
    cfg = parse_config(["--config", str(config)])
    assert (cfg.fps, type(cfg.fps), cfg.max_new_tokens) == (2.0, float, 16)
    config.write_text("max_new_tokens: many\n")
    with pytest.raises(SystemExit, match=r"eval.yaml: max_new_tokens takes a int, got 'many'$"):
        parse_config(["--config", str(config)])


@pytest.mark.parametrize("config", ["configs/sft/tiny-cpu.yaml", "configs/grpo/tiny-cpu.yaml"])
def test_the_single_node_launcher_runs_the_configs_stage(config):
    """The launcher hands the config over as it is (no stage of its own): PYTHON=echo prints the command."""
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": "echo", "XLA_CLIENT_MEM_FRACTION": "0.9"}
    result = subprocess.run(
        ["bash", "launch/h100_single_node.sh", config, "--set", "max_steps=1"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.split() == ["-m", "stjax.train", "--config", config, "--set", "max_steps=1"]
    assert "the config's stage (SFT or GRPO)" in (root / "launch/h100_single_node.sh").read_text()


@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_the_slurm_and_tpu_launchers_run_the_configs_stage(stage, tmp_path):
    """The SLURM and TPU launchers hand the config over as it is (no --stage of their own) and name its stage in
    their log: `srun` and `gcloud` replaced by scripts that print what they are given."""
    import base64
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    config = f"configs/{stage}/tiny-cpu.yaml"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("srun", "gcloud"):
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "{tool}"; printf " %s" "$@"; echo\n')
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    slurm = {"SLURM_SUBMIT_DIR": str(root), "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"}
    slurm |= {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_CPUS_ON_NODE": "4"}
    run = lambda args, extra: subprocess.run(
        args, cwd=root, env=env | extra, capture_output=True, text=True, check=True, timeout=60
    )

    result = run(["bash", "launch/slurm_multinode.sbatch", config, "--set", "max_steps=1"], slurm)
    assert f"job 7 (restart 0): {stage} on 2 nodes x 8 GPUs" in result.stdout
    srun = next(line for line in result.stdout.splitlines() if line.startswith("srun "))
    assert srun.endswith(f" bash launch/h100_single_node.sh {config} --set max_steps=1")  # tested above

    result = run(["bash", "launch/tpu_pod.sh", config, "--set", "max_steps=1"], {"TPU_NAME": "t", "ZONE": "z"})
    assert f"training ({stage}) on every worker of t (z)" in result.stderr
    encoded = re.search(r"echo (\S+) \| base64 -d", result.stdout).group(1)
    remote = base64.b64decode(encoded).decode()
    assert f"args=(--config {config} --set mesh=fsdp=-1 --set max_steps=1 )" in remote
    assert 'exec "$python" -m stjax.train "${args[@]}"' in remote and "--stage" not in remote
