"""The GRPO stage as users start it (`python -m stjax.train --stage grpo`): a run stopped by SIGTERM
and rerun gives the uninterrupted run's per-step rewards and losses bit for bit; 2 processes x 2
devices equal 1 process x 4 devices; config errors before any work. What the embedded default learns
is checked on the demo's run (tests/test_demo.py)."""

import json
import os
import signal

import numpy as np
import pytest
from test_train_run import (
    ROOT,
    assets,  # noqa: F401 (the module's fixture)
    finish,
    logged_steps,
    losses,
    one_and_two_processes,
    start,
    wait_for,
)

from stjax.train import config as train_config
from stjax.train import loop, stages
from stjax.train.config import ConfigError

STEPS = 6
# The built-in rewards are all 0 for a random tiny model; distinct_characters tells its completions apart, so the
# advantages are not 0 and the policy-gradient term carries the completions.
DISTINCT = "test_grpo_rewards.distinct_characters"
GRPO = {
    "max_steps": STEPS,
    "batch_size": 4,
    "grpo.num_generations": 2,
    "grpo.max_completion_length": 8,
    "grpo.beta": 0.1,
    "grpo.reward_funcs": f"[accuracy, format, reverse_thinking, {DISTINCT}]",
    "grpo.reward_weights": "[]",  # all 1 (the embedded default weighs its own two rewards)
    "optim.learning_rate": 1e-2,
    "grpo.log_completions_steps": 2,
}
TESTS_PATH = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]))}


def run_grpo(out, assets, **changes):
    """A GRPO run of the test settings with `changes`, the test rewards importable."""
    return start(out, assets, stage="grpo", env=TESTS_PATH, **{**GRPO, "grpo.loss_type": "dr_grpo", **changes})


def per_step(out):
    return {name: losses(out, name) for name in ("loss", "reward", "rewards/format/mean", "completions/mean_length")}


@pytest.fixture(scope="module")
def uninterrupted(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo-uninterrupted")
    finish(run_grpo(out, assets))
    return out


def test_a_run_logs_what_a_user_watches(uninterrupted):
    """Every step's record holds the metrics a user watches, with values that agree with each other:
    the reward is the sum of the rewards' means, rewards that tell completions apart have a spread,
    the KL to the reference is > 0 once the policy moved (after the first update), lengths within the
    limit; the logged completions' rewards sum to their reward."""
    records = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    names = ("accuracy", "format", "reverse_thinking", DISTINCT)
    for r in records:
        for name in (
            "reward",
            "reward_std",
            "rewards/accuracy/mean",
            "rewards/format/std",
            "rewards/reverse_thinking/mean",
            "rewards/accuracy/errors",
            "accuracy",
            "format_rate",
            "completions/mean_length",
            "completions/max_length",
            "completions/clipped_ratio",
            "kl",
            "clip_ratio/region_mean",
            "entropy",
            "frac_reward_zero_std",
            "rollout_time",
            "scoring_time",
            "logprob_time",
            "update_time",
            "rollout_tokens_per_s",
            "learning_rate",
            "grad_norm",
            "completions/think_words",
            "answers/A",
        ):
            assert name in r and np.isfinite(r[name]), name
        np.testing.assert_allclose(r["reward"], sum(r[f"rewards/{n}/mean"] for n in names), rtol=1e-6)
        assert r[f"rewards/{DISTINCT}/mean"] > 0 and r["reward_std"] > 0 and r["frac_reward_zero_std"] < 1
        assert 1 <= r["completions/mean_length"] <= r["completions/max_length"] <= 8
        assert 0 <= r["completions/clipped_ratio"] <= 1 and r["entropy"] > 0 and r["grad_norm"] > 0
        assert r["accuracy"] == r["rewards/accuracy/mean"] and r["skipped"] == 0
    assert records[0]["kl"] < 1e-7 < min(r["kl"] for r in records[1:])  # the reference is the loaded model
    completions = [json.loads(line) for line in (uninterrupted / "completions.jsonl").read_text().splitlines()]
    assert {c["step"] for c in completions} == {2, 4, 6}
    assert set(completions[0]) == {"step", "prompt_id", "completion", "rewards", "reward"}
    for c in completions:
        np.testing.assert_allclose(c["reward"], sum(v for v in c["rewards"].values() if v is not None), rtol=1e-6)
    assert (uninterrupted / "hf" / "config.json").exists() is False  # export_hf off in these runs


def test_sigterm_and_the_rerun_give_the_uninterrupted_runs_steps_bit_for_bit(assets, uninterrupted, tmp_path):
    proc = run_grpo(tmp_path, assets, **{"checkpoint.save_steps": 2})
    wait_for(lambda: logged_steps(tmp_path) >= 3, proc, timeout=900)
    proc.send_signal(signal.SIGTERM)
    assert "stopped by SIGTERM" in finish(proc, expect=loop.PREEMPTED_EXIT_CODE)
    assert logged_steps(tmp_path) < STEPS
    finish(run_grpo(tmp_path, assets, **{"checkpoint.save_steps": 2}))
    assert per_step(tmp_path) == per_step(uninterrupted)
    logged = lambda out: (out / "completions.jsonl").read_text().splitlines()
    assert logged(tmp_path) == logged(uninterrupted)  # each logged step once, the same completions


def test_two_processes_of_two_devices_equal_one_process_of_four(assets, tmp_path):
    """The processes hold other prompts in other rows than the single process, yet each completion
    has its own key (run, step, sample id, index in the group): the same completions (a reward that
    tells them apart, to 1e-6: summed in another order) and the same losses (1e-5)."""
    user = DISTINCT
    single, multi = one_and_two_processes(
        tmp_path,
        assets,
        stage="grpo",
        env=TESTS_PATH,
        **{
            **GRPO,
            "max_steps": 2,
            "batch_size": 8,
            "mesh": "fsdp=-1",
            "grpo.scale_rewards": "batch",
            "grpo.reward_funcs": f"[accuracy, format, {user}]",
        },
    )
    a, b = per_step(single), per_step(multi)
    tells_apart = lambda out: losses(out, f"rewards/{user}/mean")
    assert min(tells_apart(single).values()) > 0
    np.testing.assert_allclose(list(tells_apart(multi).values()), list(tells_apart(single).values()), rtol=1e-6)
    for name in ("rewards/format/mean", "completions/mean_length"):  # means of integers: exact
        assert a[name] == b[name], name
    for name in ("reward", "loss"):
        np.testing.assert_allclose(list(b[name].values()), list(a[name].values()), rtol=1e-5, atol=1e-7, err_msg=name)


OTHER_OPTIONS = {
    # two updates per rollout batch (old log-probs from a forward before the first), sequence-level ratios,
    # truncated completions masked, decoding on a tensor-parallel mesh, LoRA over an nf4 base (QLoRA: the
    # reference is the base with the adapters off), a user's reward (by dotted path) that raises on some completions
    "dapo": {
        "grpo.num_iterations": 2,
        "grpo.loss_type": "dapo",
        "grpo.importance_sampling_level": "sequence",
        "grpo.mask_truncated_completions": "true",
        "grpo.rollout_mesh": "tensor=-1",
        "grpo.epsilon_high": 0.28,
        "grpo.reward_funcs": "[accuracy, test_grpo_rewards.raises_on_odd_length]",
        "max_steps": 3,
        "lora.r": 4,
        "lora.quantize_base": "nf4",
        "lora.quantize_targets": "all",
    },
    # no reference model (beta 0), LoRA over an int8 base, sampling at 0.7 with top_k and top_p, 2 micro-batches,
    # weighted rewards, the evaluator's accuracy rule
    "bnpo": {
        "grpo.loss_type": "bnpo",
        "grpo.beta": 0.0,
        "lora.r": 4,
        "lora.quantize_base": "int8",
        "grpo.temperature": 0.7,
        "grpo.top_k": 20,
        "grpo.top_p": 0.9,
        "gradient_accumulation_steps": 2,
        "grpo.reward_funcs": f"[accuracy, format, {DISTINCT}]",
        "grpo.reward_weights": "[1.0, 0.5, 2.0]",
        "grpo.accuracy_rule": "default",
        "max_steps": 2,
    },
    "cispo": {
        "grpo.loss_type": "cispo",
        "grpo.num_iterations": 2,
        "grpo.epsilon_high": 2.0,
        "grpo.scale_rewards": "batch",
        "max_steps": 2,
    },
}


@pytest.mark.parametrize("loss_type", list(OTHER_OPTIONS))
def test_other_options_run_and_a_raising_reward_is_counted(assets, tmp_path, loss_type):
    """Each loss type the runs above do not use (those use dr_grpo, the 2-process one grpo) with
    other options (see OTHER_OPTIONS): every step trains (finite loss, nothing skipped, a gradient
    wherever a completion weighs in: the rewards tell the completions apart), the KL is logged
    exactly when there is a reference (beta > 0), the clip metrics are the loss type's, and a
    raising reward's failures are counted."""
    changes = OTHER_OPTIONS[loss_type]
    finish(run_grpo(tmp_path, assets, devices=2, **{"mesh": "fsdp=2", "batch_size": 4, **changes}))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, changes["max_steps"] + 1))
    assert all(np.isfinite(r["loss"]) and r["skipped"] == 0 for r in records)
    # a gradient wherever a completion weighs in: with truncated completions masked (a random model rarely
    # ends one within 8 tokens), a step whose completions were all cut has none
    masked = changes.get("grpo.mask_truncated_completions") == "true"
    assert all((r["grad_norm"] > 0) == (r["completions/clipped_ratio"] < 1 or not masked) for r in records)
    assert all(("kl" in r) == (changes.get("grpo.beta", GRPO["grpo.beta"]) > 0) for r in records)
    assert all(("cispo_clip_ratio" in r) == (loss_type == "cispo") != ("clip_ratio/region_mean" in r) for r in records)
    if loss_type == "dapo":
        assert sum(r["rewards/test_grpo_rewards.raises_on_odd_length/errors"] for r in records) > 0


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"batch_size": 6, "grpo.num_generations": 4}, "multiple of grpo.num_generations"),
        ({"batch_size": 6, "grpo.num_generations": 2}, "must divide over data x fsdp"),
        ({"grpo.loss_type": "ppo"}, "grpo.loss_type='ppo' is not one of"),
        ({"grpo.reward_weights": "[1.0, 2.0]"}, "one weight per reward function"),
        ({"data.template": "sft"}, "does not fit the grpo stage"),
    ],
)
def test_config_errors_come_before_any_loading(assets, tmp_path, monkeypatch, changes, message):
    monkeypatch.setattr(loop, "prepare_data", lambda *a: pytest.fail("the run went past its checks"))
    values = {**GRPO, "output_dir": tmp_path, "mesh": "fsdp=2,tensor=4", **changes}
    with pytest.raises(ConfigError, match=message):
        stages.train(train_config.load(None, [f"{k}={v}" for k, v in values.items()], stage="grpo"))
