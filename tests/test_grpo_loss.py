"""GRPO's advantages and policy loss against an independent PyTorch transcription of TRL 1.16's
`GRPOTrainer` formulas (the advantage block of `_generate_and_score_completions` and
`_compute_loss`, with one process, no accumulation and one step per generation), in value and in
the gradient with respect to the log-probs, to 1e-5."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from stjax.train import config as train_config
from stjax.train.rl.learner import LossSettings
from stjax.train.rl.objective import group_advantages, policy_loss
from stjax.train.rl.rollout import completion_keys

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- TRL 1.16, transcribed


def trl_nanstd(x: torch.Tensor, dim=None, keepdim=False) -> torch.Tensor:
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = count / (count - 1)
    correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std = trl_nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations, dim=0)
    else:  # batch
        std = trl_nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


def trl_loss(
    per_token_logps,
    old_per_token_logps,
    ref_per_token_logps,
    advantages,
    mask,
    *,
    loss_type,
    beta,
    epsilon_low,
    epsilon_high,
    importance_sampling_level,
    max_completion_length,
    accumulation=1,
    num_items_in_batch=None,
):
    """One micro-batch's loss as TRL's `_compute_loss` makes it in training, of `accumulation`
    micro-batches per step (`steps_per_generation` = `accumulation`, one process); `num_items_in_batch`:
    the completion tokens of the whole step (dapo and cispo), default this batch's."""
    advantages = advantages.unsqueeze(1)
    old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean() / accumulation
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0) / accumulation
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length) / accumulation
    else:  # dapo, cispo: num_items_in_batch spans the generation batch
        # (normaliser x accumulation / steps_per_generation)
        items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token_loss * mask).sum() / items.clamp(min=1.0)

    def global_masked_mean(x):
        if x.shape[1] == 1:
            return x.sum() / x.shape[0]
        return (x * mask).sum() / mask.sum().clamp(min=1.0)

    metrics = {}
    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = global_masked_mean(((coef_1 > epsilon_high) & (advantages > 0)).float())
    else:
        low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
        high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
        metrics.update(
            {
                "clip_ratio/low_mean": global_masked_mean(low.float()),
                "clip_ratio/high_mean": global_masked_mean(high.float()),
                "clip_ratio/region_mean": global_masked_mean((low | high).float()),
            }
        )
    return loss, metrics


# ---------------------------------------------------------------- the batch


def batch(seed: int = 0, n: int = 6, t: int = 7):
    """Log-probs, old ones 0.4 apart on average (ratios well outside [0.8, 1.2] on both sides), a
    reference, advantages of both signs, a ragged mask with one row of no completion tokens."""
    rng = np.random.default_rng(seed)
    logp = -rng.gamma(2.0, 0.7, (n, t)).astype(np.float32)
    old = (logp + rng.normal(0, 0.4, (n, t))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.6, (n, t))).astype(np.float32)
    advantages = rng.normal(0, 1, n).astype(np.float32)
    lengths = np.array([t, 3, 0, 5, 1, t])[:n]
    mask = (np.arange(t) < lengths[:, None]).astype(np.float32)
    return logp, old, ref, advantages, mask


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"]
CASES = list(itertools.product(LOSS_TYPES, ["token", "sequence"], [0.0, 0.1], [(0.2, 0.2), (0.2, 0.28)], [True, False]))


@pytest.mark.parametrize("loss_type, level, beta, clip, with_old", CASES)
def test_policy_loss_equals_trl(loss_type, level, beta, clip, with_old):
    logp, old, ref, advantages, mask = batch()
    low, high = clip if loss_type != "cispo" else (clip[0], 5.0)  # CISPO's epsilon_high caps the ratio itself
    settings = dict(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=low,
        epsilon_high=high,
        importance_sampling_level=level,
        max_completion_length=logp.shape[1],
    )

    def ours(x):
        return policy_loss(
            x,
            jnp.asarray(old) if with_old else None,
            jnp.asarray(ref),
            jnp.asarray(advantages),
            jnp.asarray(mask),
            **settings,
        )

    (loss, metrics), grad = jax.value_and_grad(ours, has_aux=True)(jnp.asarray(logp))
    x = torch.tensor(logp, requires_grad=True)
    want, want_metrics = trl_loss(
        x,
        torch.tensor(old) if with_old else None,
        torch.tensor(ref),
        torch.tensor(advantages),
        torch.tensor(mask),
        **settings,
    )
    want.backward()
    np.testing.assert_allclose(float(loss), want.item(), **TOL)
    np.testing.assert_allclose(np.asarray(grad), x.grad.numpy(), **TOL)
    assert set(metrics) == set(want_metrics)
    for name, value in want_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value.item(), **TOL, err_msg=name)
    assert np.abs(x.grad.numpy()).sum() > 0 and np.all(x.grad.numpy()[mask == 0] == 0)


def test_the_batch_has_ratios_outside_the_clip_range_on_both_sides():
    logp, old, _, advantages, mask = batch()
    ratio = np.exp(logp - old)[mask == 1]
    assert (ratio < 0.8).sum() > 3 and (ratio > 1.28).sum() > 3


def test_micro_batch_normalisers_sum_to_the_whole_batch():
    """With the whole step's token and sequence counts, two halves' losses sum to the whole batch's."""
    logp, old, ref, advantages, mask = (jnp.asarray(a) for a in batch())
    for loss_type in ("grpo", "dr_grpo", "dapo", "cispo"):
        settings = dict(loss_type=loss_type, beta=0.1, max_completion_length=7, epsilon_high=0.28)
        whole = policy_loss(logp, old, ref, advantages, mask, **settings)[0]
        halves = sum(
            policy_loss(
                logp[s],
                old[s],
                ref[s],
                advantages[s],
                mask[s],
                **settings,
                num_items_in_batch=jnp.sum(mask),
                num_sequences=6,
            )[0]
            for s in (slice(0, 3), slice(3, 6))
        )
        np.testing.assert_allclose(float(halves), float(whole), rtol=1e-6)


def test_the_release_configuration_gives_the_recipe_formula():
    """beta 0.1, loss_type grpo, one update per batch (no old log-probs): the recipe note's
    -(exp(logp - stopgrad(logp)) * A - beta * KL), k3 KL, token mean per sequence then mean, in value
    and gradient (written here in NumPy: d/dlogp = -A + beta * (1 - exp(ref - logp)))."""
    logp, _, ref, advantages, mask = batch(seed=3)
    mask[2] = 1.0  # every row has tokens: the recipe's mean has no empty rows to think about
    beta = 0.1
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per_token = -(1.0 * advantages[:, None] - beta * kl)
    want = np.mean((per_token * mask).sum(1) / mask.sum(1))
    want_grad = (-advantages[:, None] + beta * (1 - np.exp(ref - logp))) * mask / mask.sum(1, keepdims=True) / len(mask)
    loss_fn = lambda x: policy_loss(
        x, None, jnp.asarray(ref), jnp.asarray(advantages), jnp.asarray(mask), loss_type="grpo", beta=beta
    )[0]
    loss, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp))
    np.testing.assert_allclose(float(loss), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale_rewards):
    rng = np.random.default_rng(1)
    rewards = rng.integers(0, 3, 24).astype(np.float32) + rng.normal(0, 0.1, 24).astype(np.float32)
    rewards[8:12] = 1.0  # a group of equal rewards
    rewards[17] = np.nan  # a completion no reward applies to
    got = np.asarray(group_advantages(rewards, 4, scale_rewards))
    want = trl_advantages(torch.tensor(rewards), 4, scale_rewards).numpy()
    np.testing.assert_allclose(got, want, **TOL)
    assert np.all(np.isfinite(got)) and np.all(got[8:12] == 0) and got[17] == 0


def test_a_group_of_equal_rewards_has_advantage_zero_never_nan():
    got = np.asarray(group_advantages(np.array([1.0, 1.0, 1.0, 0.0, 0.0, 0.0]), 3))
    assert np.all(got == 0)


def test_loss_settings_take_epsilon_high_from_the_config():
    load = lambda *sets: LossSettings.of(train_config.load(None, list(sets), stage="grpo"))
    assert (load("grpo.epsilon=0.2", "grpo.epsilon_high=0.28").epsilon_high, load("grpo.epsilon=0.3").epsilon_high) == (
        0.28,
        0.3,
    )  # unset: the same as epsilon
    assert load("grpo.epsilon=0.3").epsilon_low == 0.3


def test_each_completion_has_its_own_key_folded_with_the_step():
    """The rollout's keys differ between steps, prompts and a group's completions, and repeat for the
    same (run key, step, sample id, index)."""
    rng = jax.random.key_data(jax.random.key(0))
    ids = np.array([5, 9], np.int32)
    keys = {step: np.asarray(completion_keys(rng, step, ids, 3)) for step in (0, 1, 7)}
    rows = np.concatenate(list(keys.values()))
    assert len({tuple(r) for r in rows}) == len(rows) == 18
    np.testing.assert_array_equal(np.asarray(completion_keys(rng, 7, ids, 3)), keys[7])
    np.testing.assert_array_equal(
        np.asarray(completion_keys(rng, 1, ids[::-1], 3)), keys[1].reshape(2, 3, -1)[::-1].reshape(6, -1)
    )
