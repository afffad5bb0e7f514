"""The GRPO stage as users start it (`python -m stjax.train --stage grpo`): a run stopped by SIGTERM
and rerun gives the uninterrupted run's per-step rewards and losses bit for bit; 2 processes x 2
devices equal 1 process x 4 devices; config errors before any work. What the embedded default learns
is checked on the demo's run (tests/test_demo.py)."""

import json
import signal

import numpy as np
import pytest

from stjax.train import config as train_config
from stjax.train import grpo, loop
from stjax.train.config import ConfigError
from test_train_run import assets, finish, logged_steps, losses, one_and_two_processes, start, wait_for  # noqa: F401

STEPS = 6
GRPO = {"steps": STEPS, "batch_size": 4, "grpo.num_generations": 2, "grpo.max_completion_length": 8,
        "grpo.beta": 0.1, "grpo.reward_funcs": "[accuracy, format, reverse_thinking]",
        "grpo.reward_weights": "[]",  # all 1 (the embedded default weighs its own two rewards)
        "optim.learning_rate": 1e-2,
        "grpo.log_completions_steps": 2}


def run_grpo(out, assets, **changes):
    return start(out, assets, stage="grpo", **{**GRPO, **changes})


def per_step(out):
    return {name: losses(out, name) for name in ("loss", "reward", "rewards/format/mean", "completions/mean_length")}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-uninterrupted")
    finish(run_grpo(out, assets))
    return out


def test_a_run_logs_what_a_user_watches(uninterrupted):
    record = json.loads((uninterrupted / "metrics.jsonl").read_text().splitlines()[-1])
    for name in ("reward", "reward_std", "rewards/accuracy/mean", "rewards/format/std", "rewards/reverse_thinking/mean",
                 "rewards/accuracy/errors", "accuracy", "format_rate", "completions/mean_length",
                 "completions/max_length", "completions/clipped_ratio", "kl", "clip_ratio/region_mean", "entropy",
                 "frac_reward_zero_std", "rollout_time", "scoring_time", "logprob_time", "update_time",
                 "rollout_tokens_per_s", "learning_rate", "grad_norm", "completions/think_words", "answers/A"):
        assert name in record, name
    completions = [json.loads(line) for line in (uninterrupted / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in completions} == {2, 4, 6}
    assert set(completions[0]) == {"step", "prompt_id", "completion", "rewards", "reward"}
    assert (uninterrupted / "hf" / "config.json").exists() is False  # export_hf off in these runs


def test_sigterm_and_the_rerun_give_the_uninterrupted_runs_steps_bit_for_bit(assets, uninterrupted, tmp_path):
    proc = run_grpo(tmp_path, assets, **{"checkpoint.every": 2})
    wait_for(lambda: logged_steps(tmp_path) >= 3, proc, timeout=900)
    proc.send_signal(signal.SIGTERM)
    assert "stopped by SIGTERM" in finish(proc, expect=loop.PREEMPTED_EXIT_CODE)
    assert logged_steps(tmp_path) < STEPS
    finish(run_grpo(tmp_path, assets, **{"checkpoint.every": 2}))
    assert per_step(tmp_path) == per_step(uninterrupted)
    logged = lambda out: (out / "completions.jsonl").read_text().splitlines()
    assert logged(tmp_path) == logged(uninterrupted)  # each logged step once, the same completions


def test_two_processes_of_two_devices_equal_one_process_of_four(assets, tmp_path):
    """The processes hold other prompts in other rows than the single process, yet each completion
    has its own key (run, step, sample id, index in the group): the same completions (a reward that
    tells them apart, to 1e-6: summed in another order) and the same losses (1e-5)."""
    from test_train_run import ROOT

    user = "test_grpo_rewards.distinct_characters"
    single, multi = one_and_two_processes(tmp_path, assets, stage="grpo", env={"PYTHONPATH": str(ROOT / "tests")}, **{
        **GRPO, "steps": 2, "batch_size": 8, "mesh": "fsdp=-1", "grpo.scale_rewards": "batch",
        "grpo.reward_funcs": f"[accuracy, format, {user}]"})
    a, b = per_step(single), per_step(multi)
    tells_apart = lambda out: losses(out, f"rewards/{user}/mean")
    assert min(tells_apart(single).values()) > 0
    np.testing.assert_allclose(list(tells_apart(multi).values()), list(tells_apart(single).values()), rtol=1e-6)
    for name in ("rewards/format/mean", "completions/mean_length"):  # means of integers: exact
        assert a[name] == b[name], name
    for name in ("reward", "loss"):
        np.testing.assert_allclose(list(b[name].values()), list(a[name].values()), rtol=1e-5, atol=1e-7, err_msg=name)


def test_other_options_run_and_a_raising_reward_is_counted(assets, tmp_path):
    """Two updates per rollout batch (old log-probs from a forward before the first), dapo over
    sequence-level ratios, truncated completions masked, decoding on a tensor-parallel mesh, LoRA over
    an nf4 base (QLoRA: the reference is the base with the adapters off), and a user's reward (by
    dotted path) that raises on some completions: the run finishes, every step's loss is finite, and
    the failures are counted."""
    from test_train_run import ROOT

    user = "test_grpo_rewards.raises_on_odd_length"
    changes = {"grpo.num_iterations": 2, "grpo.loss_type": "dapo", "grpo.importance_sampling_level": "sequence",
               "grpo.mask_truncated_completions": "true", "grpo.rollout_mesh": "tensor=-1", "grpo.epsilon_high": 0.28,
               "grpo.reward_funcs": f"[accuracy, {user}]", "steps": 3, "mesh": "fsdp=2", "batch_size": 4,
               "lora.rank": 4, "lora.quantize_base": "nf4", "lora.quantize_targets": "all"}
    finish(run_grpo(tmp_path, assets, devices=2, env={"PYTHONPATH": str(ROOT / "tests")}, **changes))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
    assert sum(r[f"rewards/{user}/errors"] for r in records) > 0  # 12 completions: some of odd length


@pytest.mark.parametrize("changes, message", [
    ({"batch_size": 6, "grpo.num_generations": 4}, "multiple of grpo.num_generations"),
    ({"batch_size": 6, "grpo.num_generations": 2}, "must divide over data x fsdp"),
    ({"grpo.loss_type": "ppo"}, "grpo.loss_type='ppo' is not one of"),
    ({"grpo.reward_weights": "[1.0, 2.0]"}, "one weight per reward function"),
    ({"data.template": "sft"}, "does not fit the grpo stage"),
])
def test_config_errors_come_before_any_loading(assets, tmp_path, monkeypatch, changes, message):
    monkeypatch.setattr(loop, "prepare_data", lambda *a: pytest.fail("the run went past its checks"))
    values = {**GRPO, "out_dir": tmp_path, "mesh": "fsdp=2,tensor=4", **changes}
    with pytest.raises(ConfigError, match=message):
        grpo.run(train_config.load(None, [f"{k}={v}" for k, v in values.items()], stage="grpo"))
