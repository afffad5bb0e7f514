"""GRPO's objective: advantage estimators and loss types, registered by TRL's names.

`ADVANTAGES` is keyed by TRL's `scale_rewards` (how a group's centred rewards are scaled) and
`LOSS_TYPES` by TRL's `loss_type`: each loss type is a surrogate (the per-token policy term and its
clip metrics) and a normaliser (how the token terms are summed into one number). Both are TRL 1.16's
formulas (`GRPOTrainer._compute_loss` and the advantage computation), tested against a PyTorch
transcription of them. A new estimator or loss type is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# ---------------------------------------------------------------- advantages


def _group_std(r: jax.Array, group_size: int) -> jax.Array:
    return jnp.repeat(jnp.nanstd(r.reshape(-1, group_size), axis=1, ddof=1), group_size)


def _batch_std(r: jax.Array, group_size: int) -> jax.Array:
    return jnp.broadcast_to(jnp.nanstd(r, ddof=1), r.shape)


# scale_rewards -> the spread the centred rewards are divided by (None: centred only)
ADVANTAGES: dict[str, Callable[[jax.Array, int], jax.Array] | None] = {
    "group": _group_std,
    "batch": _batch_std,
    "none": None,
}


def group_advantages(rewards, group_size: int, scale_rewards: str = "group") -> jax.Array:
    """(r - mean_G(r)) / (std(r) + 1e-4) per completion, groups of `group_size` adjacent rows.

    std with Bessel's correction, as TRL; `scale_rewards` (`ADVANTAGES`): "group" (each group's std),
    "batch" (the whole batch's std, still centred per group) or "none" (centred only). NaN rewards
    ("does not apply" for every function) are left out of the statistics and get advantage 0; a
    group of equal rewards gets 0, never NaN.
    """
    if scale_rewards not in ADVANTAGES:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of {', '.join(ADVANTAGES)}")
    r = jnp.asarray(rewards, jnp.float32)
    advantages = r - jnp.repeat(jnp.nanmean(r.reshape(-1, group_size), axis=1), group_size)
    spread = ADVANTAGES[scale_rewards]
    if spread is not None:
        advantages = advantages / (spread(r, group_size) + 1e-4)
    return jnp.nan_to_num(advantages, nan=0.0)


# ---------------------------------------------------------------- loss types


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """TRL's masked mean: over the tokens, or over the sequences for one value per sequence."""
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        return jnp.mean(x)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def clipped_surrogate(ratio, advantages, logp, mask, epsilon_low: float, epsilon_high: float):
    """PPO's clipped objective, negated; clip metrics: the tokens whose ratio left the trust region."""
    clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return per_token, {
        "clip_ratio/low_mean": masked_mean(low, mask),
        "clip_ratio/high_mean": masked_mean(high, mask),
        "clip_ratio/region_mean": masked_mean(low | high, mask),
    }


def cispo_surrogate(ratio, advantages, logp, mask, epsilon_low: float, epsilon_high: float):
    """CISPO: the importance weight capped at `epsilon_high` and held constant, times A log p, negated."""
    per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_high)) * advantages * logp
    return per_token, {"cispo_clip_ratio": masked_mean((ratio > epsilon_high) & (advantages > 0), mask)}


def sequence_mean(weighted, per_row, tokens, sequences, max_completion_length):
    """grpo: each sequence's token mean, then the mean over sequences."""
    return jnp.sum(jnp.sum(weighted, axis=-1) / per_row) / sequences


def fixed_length_mean(weighted, per_row, tokens, sequences, max_completion_length):
    """dr_grpo: the sum over (sequences x max_completion_length), a length-free normaliser."""
    return jnp.sum(weighted) / (sequences * max_completion_length)


def token_mean(weighted, per_row, tokens, sequences, max_completion_length):
    """bnpo, dapo, cispo: the sum over the batch's completion tokens."""
    return jnp.sum(weighted) / jnp.maximum(tokens, 1.0)


class LossType(NamedTuple):
    surrogate: Callable  # (ratio, advantages, logp, mask, epsilon_low, epsilon_high) -> (per_token, metrics)
    normaliser: Callable  # (weighted, per_row, tokens, sequences, max_completion_length) -> loss


LOSS_TYPES: dict[str, LossType] = {
    "grpo": LossType(clipped_surrogate, sequence_mean),
    "bnpo": LossType(clipped_surrogate, token_mean),
    "dr_grpo": LossType(clipped_surrogate, fixed_length_mean),
    "dapo": LossType(clipped_surrogate, token_mean),
    "cispo": LossType(cispo_surrogate, token_mean),
}


def policy_loss(
    logp: jax.Array,
    old_logp: jax.Array | None,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    loss_type: str = "grpo",
    beta: float = 0.1,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    max_completion_length: int = 256,
    num_items_in_batch: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss over (N, T) completion log-probs, and its metrics (masked means).

    `old_logp` None: the policy before this update is the current one (one update per rollout
    batch): the ratio is exp(logp - stop_gradient(logp)) = 1 with the policy gradient as its
    gradient. `ref_logp` is used when `beta` > 0. `mask` marks the completion tokens. The loss
    type's normaliser (`LOSS_TYPES`) sums over `num_items_in_batch` tokens and `num_sequences` of
    the whole step when this batch is one micro-batch of it; default: this batch's own.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    surrogate, normaliser = LOSS_TYPES[loss_type]
    mask = mask.astype(jnp.float32)
    advantages = advantages[:, None] if advantages.ndim == 1 else advantages
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    log_ratio = logp - old_logp
    per_row = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = (jnp.sum(log_ratio * mask, axis=-1) / per_row)[:, None]
    else:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} is not token or sequence")

    per_token, clip_metrics = surrogate(jnp.exp(log_weights), advantages, logp, mask, epsilon_low, epsilon_high)
    metrics = {}
    if beta != 0.0:
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        metrics["kl"] = masked_mean(kl, mask)
    tokens = jnp.sum(mask) if num_items_in_batch is None else num_items_in_batch
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    loss = normaliser(per_token * mask, per_row, tokens, sequences, max_completion_length)
    return loss, metrics | clip_metrics
