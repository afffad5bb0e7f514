"""Losses of the SFT stage: token cross-entropy under a loss mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp

AVERAGES = ("token", "sequence")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position, in float32. logits (B, L, V), targets (B, L)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def sft_loss(logits: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, average: str = "token") -> jax.Array:
    """Next-token cross-entropy where `loss_mask` (aligned with input_ids) marks the targets.

    average="token": mean over every target token of the batch (transformers' default);
    average="sequence": mean over tokens within each sequence, then over sequences.
    """
    nll = token_nll(logits[:, :-1], input_ids[:, 1:])
    mask = loss_mask[:, 1:].astype(jnp.float32)
    if average == "token":
        return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if average == "sequence":
        per_sequence = jnp.sum(nll * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)
        has_targets = (jnp.sum(mask, axis=1) > 0).astype(jnp.float32)
        return jnp.sum(per_sequence * has_targets) / jnp.maximum(jnp.sum(has_targets), 1.0)
    raise ValueError(f"unknown loss average {average!r}; choose from {AVERAGES}")
