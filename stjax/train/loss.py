"""Losses of the SFT stage: token cross-entropy under a loss mask.

Two ways to the same number: `sft_loss` from full logits (B, L, vocab), and `chunked_sft_loss` from the
final hidden states and the output table, a slice of positions at a time. With a 152k vocabulary the
full float32 logits and their gradient take more memory than a 1.5B model's activations (4 x 4096
tokens: 10 GB each); the chunked loss never holds more than one slice's logits and computes their
gradient in the same pass, so the backward recomputes nothing. Given the positions that predict a
target, it makes logits at those alone: a reply after a long video prompt costs the output projection
only the reply's rows.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from stjax.sharding import constrain_batch

AVERAGES = ("token", "sequence")


def loss_totals(loss_mask: jax.Array) -> jax.Array:
    """(2,) float32: the target tokens and the sequences with targets of a (..., L) loss mask, over
    every row of it (all micro-batches of a step, all processes: the denominators of the average)."""
    per_row = jnp.sum(loss_mask[..., 1:] != 0, axis=-1)
    return jnp.stack([jnp.sum(per_row), jnp.sum(per_row > 0)]).astype(jnp.float32)


def loss_weights(loss_mask: jax.Array, average: str, totals: jax.Array | None = None) -> jax.Array:
    """(B, L) float32 weights on the predicting positions: position i predicts token i + 1 and weighs
    in when `loss_mask[:, i + 1]` marks a target; the last position predicts nothing.

    average="token": every target token of the step weighs the same (transformers' default);
    average="sequence": every sequence with targets weighs the same, its tokens equally within it.
    `totals` (`loss_totals` of the whole step) makes the weights of the step's micro-batches sum to
    the whole step's, however it is split (transformers' `num_items_in_batch`); default: this batch's.
    """
    mask = loss_mask[:, 1:].astype(jnp.float32)
    tokens, rows = loss_totals(loss_mask) if totals is None else totals
    if average == "token":
        weights = mask / jnp.maximum(tokens, 1.0)
    elif average == "sequence":
        per_row = jnp.sum(mask, axis=1, keepdims=True)
        weights = mask / jnp.maximum(per_row, 1.0) / jnp.maximum(rows, 1.0)
    else:
        raise ValueError(f"unknown loss average {average!r}; choose from {AVERAGES}")
    return jnp.pad(weights, ((0, 0), (0, 1)))


def next_tokens(input_ids: jax.Array) -> jax.Array:
    """The target of each position (the last one's is a placeholder with weight 0)."""
    return jnp.pad(input_ids[:, 1:], ((0, 0), (0, 1)))


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) per position, in float32. logits (..., V), targets (...)."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target_logit


def sft_loss(
    logits: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    average: str = "token",
    totals: jax.Array | None = None,
) -> jax.Array:
    """Next-token cross-entropy from full logits (B, L, V); `loss_mask` (aligned with input_ids) marks
    the targets; `totals` as in `loss_weights`."""
    return jnp.sum(loss_weights(loss_mask, average, totals) * token_nll(logits, next_tokens(input_ids)))


def chunked_sft_loss(
    hidden: jax.Array,
    table: jax.Array,
    input_ids: jax.Array,
    loss_mask: jax.Array,
    average: str = "token",
    chunk: int = 512,
    positions: jax.Array | None = None,
    totals: jax.Array | None = None,
) -> jax.Array:
    """`sft_loss(hidden @ table.T, ...)` without the full logits. hidden (B, L, D) final-norm states,
    table (V, D) the output projection (the tied embedding or lm_head's kernel transposed).

    A slice is at most `chunk` sequence positions of every row: the batch axis stays whole, so a batch
    sharded over devices stays sharded. The slices are made equal, the last padded with weight-0 positions.
    `positions` (B, K), when given, lists every position of each row that predicts a target
    (`stjax.train.batch.loss_positions`; its padding points at the last position, which weighs 0):
    only those rows of logits are made, the others weighing 0 anyway.
    """
    targets, weights = next_tokens(input_ids), loss_weights(loss_mask, average, totals)
    if positions is not None:
        hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
        targets, weights = (jnp.take_along_axis(x, positions, axis=1) for x in (targets, weights))
    split, _ = chunks(hidden.shape[1], chunk)
    return _weighted_nll(split(hidden), table, split(targets), split(weights))


def chunks(length: int, chunk: int):
    """(split, join) for cutting axis 1 of (B, length, ...) arrays into equal slices of at most
    `chunk` positions, (slices, B, c, ...), the last padded; `join` undoes it (padding dropped)."""
    slices = -(-length // chunk)
    size = -(-length // slices)
    pad = slices * size - length

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], slices, size, *x.shape[2:]), 1, 0)

    def join(x: jax.Array) -> jax.Array:
        x = jnp.moveaxis(x, 0, 1)
        return x.reshape(x.shape[0], slices * size, *x.shape[3:])[:, :length]

    return split, join


def _slice_logits(h: jax.Array, table: jax.Array) -> jax.Array:
    """One slice's logits (B, c, V), split by rows like the batch (never gathered whole)."""
    return constrain_batch(jnp.einsum("bcd,vd->bcv", constrain_batch(h), table, preferred_element_type=jnp.float32))


@jax.custom_vjp
def _weighted_nll(h: jax.Array, table: jax.Array, targets: jax.Array, weights: jax.Array) -> jax.Array:
    """sum(weights * nll) over slices (S, B, c, ...); the loss alone (no gradient wanted)."""

    def body(total, xs):
        h_s, t_s, w_s = xs
        return total + jnp.sum(w_s * token_nll(_slice_logits(h_s, table), t_s)), None

    return jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, targets, weights))[0]


def _weighted_nll_fwd(h, table, targets, weights):
    """The loss and its gradients in one pass: d nll / d logits = softmax - onehot(target)."""

    def body(carry, xs):
        total, d_table = carry
        h_s, t_s, w_s = xs
        logits = _slice_logits(h_s, table)
        lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        target_logit = jnp.take_along_axis(logits, t_s[..., None], axis=-1)
        total = total + jnp.sum(w_s * (lse - target_logit)[..., 0])
        # softmax - onehot as one element-wise pass (a compare with the target, no scatter)
        one_hot = jax.nn.one_hot(t_s, logits.shape[-1], dtype=logits.dtype)
        d_logits = ((jnp.exp(logits - lse) - one_hot) * w_s[..., None]).astype(h_s.dtype)
        d_table = d_table + jnp.einsum("bcv,bcd->vd", d_logits, h_s, preferred_element_type=jnp.float32)
        return (total, d_table), jnp.einsum("bcv,vd->bcd", d_logits, table)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(table.shape, jnp.float32))
    (total, d_table), d_h = jax.lax.scan(body, init, (h, targets, weights))
    return total, (d_h, d_table.astype(table.dtype))


def _weighted_nll_bwd(grads, g):
    d_h, d_table = grads
    return (g * d_h).astype(d_h.dtype), (g * d_table).astype(d_table.dtype), None, None


_weighted_nll.defvjp(_weighted_nll_fwd, _weighted_nll_bwd)


def token_logps(
    hidden: jax.Array, table: jax.Array, targets: jax.Array, chunk: int = 512
) -> tuple[jax.Array, jax.Array]:
    """log p(target) and the entropy of the next-token distribution at each position, (B, K) each,
    from (B, K, D) hidden states and the (V, D) output table, `chunk` positions of every row at a time.

    Each slice's logits are remade in the backward pass rather than kept (`jax.checkpoint`), so
    memory holds one slice of (B, chunk, V) logits, not all of them. The entropy is for metrics and
    carries no gradient. GRPO scales `hidden` by 1 / temperature to get TRL's log-probs of
    `logits / temperature`.
    """
    split, join = chunks(hidden.shape[1], chunk)

    @jax.checkpoint
    def one_slice(h: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
        logp = jax.nn.log_softmax(_slice_logits(h, table), axis=-1)
        chosen = jnp.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
        entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
        return chosen, jax.lax.stop_gradient(entropy)

    logp, entropy = jax.lax.map(lambda xs: one_slice(*xs), (split(hidden), split(targets)))
    return join(logp), join(entropy)
