"""The GRPO metrics that carry TRL's names equal TRL 1.16's formulas for them, transcribed here in
PyTorch from `GRPOTrainer._generate_and_score_completions` (trl/trainer/grpo_trainer.py: the
completion lengths, the reward statistics of `multi_objective_aggregation="sum_then_normalize"`), to
1e-6; NaN where TRL gives NaN. The policy metrics (kl, clip_ratio/*) are checked per micro-batch in
tests/test_grpo.py."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_grpo_loss import trl_nanstd

from stjax.train.rewards import RewardTable
from stjax.train.rl.scores import Scores

G = 4


def trl_metrics(
    rewards_per_func: torch.Tensor,
    reward_weights: torch.Tensor,
    num_generations: int,
    scale_rewards: str,
    completion_lengths: torch.Tensor,
    is_truncated: torch.Tensor,
    names: list[str],
) -> dict[str, float]:
    metrics = {}
    metrics["completions/mean_length"] = completion_lengths.float().mean().item()
    metrics["completions/min_length"] = completion_lengths.float().min().item()
    metrics["completions/max_length"] = completion_lengths.float().max().item()
    metrics["completions/clipped_ratio"] = is_truncated.float().mean().item()
    term_completion_lengths = completion_lengths[~is_truncated]
    if len(term_completion_lengths) == 0:
        term_completion_lengths = torch.zeros(1)
    metrics["completions/mean_terminated_length"] = term_completion_lengths.float().mean().item()
    metrics["completions/min_terminated_length"] = term_completion_lengths.float().min().item()
    metrics["completions/max_terminated_length"] = term_completion_lengths.float().max().item()

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    if scale_rewards in ["group", "none"]:
        std_rewards = trl_nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:
        std_rewards = trl_nanstd(rewards).expand_as(rewards)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    for i, name in enumerate(names):
        metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i]).item()
        metrics[f"rewards/{name}/std"] = trl_nanstd(rewards_per_func[:, i]).item()
    metrics["reward"] = torch.nanmean(rewards).item()
    metrics["reward_std"] = trl_nanstd(rewards).item()
    metrics["frac_reward_zero_std"] = is_std_zero.float().mean().item()
    return metrics


def step_scores(seed: int = 0):
    """Five groups of four: one of equal rewards, one whose first completion no function applies to,
    a function that applies to one completion only (its std: NaN), a quarter of the completions cut
    at the length limit."""
    rng = np.random.default_rng(seed)
    n = 5 * G
    values = np.stack([rng.integers(0, 2, n).astype(float), rng.normal(0, 1, n), np.full(n, np.nan)], axis=1)
    values[0:G, :2] = [1.0, 0.5]  # a group of equal rewards
    values[G, :2] = np.nan  # no function applies
    values[7, 2] = 0.25  # the third function applies once
    lengths = rng.integers(1, 9, n)
    truncated = np.arange(n) % 4 == 1
    table = RewardTable(values=values, errors=np.zeros(3, np.int64), invalid=np.zeros(3, np.int64), problems=[""] * 3)
    texts = ["<think>a b</think><answer>A</answer>"] * n
    samples = [SimpleNamespace(answer="A", options=["A. x", "B. y"])] * n
    weights = np.array([1.0, 0.5, 2.0])
    scores = Scores.gather(table, weights, texts, samples, lengths, truncated.astype(float))
    return scores, values, weights, lengths, truncated


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_trl_named_metrics_equal_trls_formulas(scale_rewards):
    scores, values, weights, lengths, truncated = step_scores()
    names = ["accuracy", "user", "rare"]
    ours = scores.metrics(names, G, scale_rewards)
    want = trl_metrics(
        torch.tensor(values),
        torch.tensor(weights),
        G,
        scale_rewards,
        torch.tensor(lengths),
        torch.tensor(truncated),
        names,
    )
    for name, value in want.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-6, equal_nan=True, err_msg=name)
    assert np.isnan(want["rewards/rare/std"])  # the data reach TRL's NaN case
    if scale_rewards != "batch":  # a group of equal rewards among others (batch: the batch's std is not 0)
        assert 0 < want["frac_reward_zero_std"] < 1
    assert want["completions/mean_terminated_length"] != want["completions/mean_length"]


def test_no_completion_ended_gives_trls_zero_terminated_length():
    scores, values, weights, lengths, _ = step_scores(seed=1)
    scores.truncated[:] = 1.0
    ours = scores.metrics(["a", "b", "c"], G, "group")
    assert ours["completions/mean_terminated_length"] == ours["completions/max_terminated_length"] == 0.0


def test_two_processes_give_their_rows_in_order_and_their_counts_summed(monkeypatch):
    """`Scores.gather` on process 0 of two (simulated: the gather appends what process 1's `gather` handed it):
    every completion's values in process order, each function's error and invalid counts summed."""
    from stjax.train.rl import scores as scores_lib

    rng = np.random.default_rng(2)
    texts = ["<think>a b</think><answer>A</answer>", "<answer>B</answer>", "no answer"]
    samples = [SimpleNamespace(answer="A", options=["A. x", "B. y"])] * 3
    tables = [
        RewardTable(rng.normal(size=(3, 2)), np.array([1, 0]), np.array([0, 2]), ["", ""]),
        RewardTable(rng.normal(size=(3, 2)), np.array([0, 3]), np.array([1, 0]), ["", ""]),
    ]
    lengths, truncated = [np.array([5, 2, 8]), np.array([1, 7, 3])], [np.array([0, 0, 1]), np.array([1, 0, 0])]
    handed = []
    monkeypatch.setattr(scores_lib, "global_rows", lambda local: handed.append(local) or local)
    Scores.gather(tables[1], np.ones(2), texts, samples, lengths[1], truncated[1])  # process 1's part
    monkeypatch.setattr(scores_lib, "global_rows", lambda local: np.concatenate([local, handed[0]]))
    both = Scores.gather(tables[0], np.ones(2), texts, samples, lengths[0], truncated[0])
    np.testing.assert_array_equal(both.rewards, np.concatenate([t.values for t in tables]))
    np.testing.assert_array_equal(both.reward, np.concatenate([t.values.sum(axis=1) for t in tables]))
    np.testing.assert_array_equal(both.lengths, np.concatenate(lengths))
    np.testing.assert_array_equal(both.truncated, np.concatenate(truncated))
    np.testing.assert_array_equal(both.answers, [0, 1, -1] * 2)
    assert both.errors.tolist() == [1, 3] and both.invalid.tolist() == [1, 2]
