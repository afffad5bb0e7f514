"""SFT loss and gradients against transformers' PyTorch loss and autograd, for the full-logits loss
and the chunked one (logits a slice of tokens at a time, gradients made in the same pass).

Tolerances: relative error <= 1e-4 on the loss and <= 1e-3 on every gradient tensor
(max |ours - torch| / max |torch|), gradients mapped to HF tensor names through the converter table.
Chunked vs full logits (fp32): loss to 1e-6 relative, gradients to 1e-5 of their largest entry; the
same for logits made only at the positions that predict a target (`loss_positions`).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util
from reference import make_batch

from stjax.models.inputs import prepare_inputs
from stjax.models.loading import load_pretrained
from stjax.models.weights import canonical_name, hf_tensors
from stjax.train.batch import loss_bucket, loss_positions, target_positions
from stjax.train.loss import chunked_sft_loss, sft_loss


def loss_mask_for(batch, start: int) -> np.ndarray:
    """Targets: every real token from `start` on (a reply after the prompt), none in padding."""
    mask = batch["attention_mask"].copy()
    mask[:, :start] = 0
    return mask


@pytest.mark.parametrize(
    "arch,chunk,targets_only",
    [("qwen2_vl", 0, False), ("qwen2_5_vl", 0, False), ("qwen2_5_vl", 7, False), ("qwen2_vl", 4, True)],
)
def test_loss_and_gradients_match_transformers(hf_dirs, arch, chunk, targets_only):
    path, ref = hf_dirs(arch)
    model, cfg = load_pretrained(path)
    batch = make_batch(cfg, [[3, ("video", 2, 8, 8), 12], [2, ("video", 2, 4, 8), 6, ("image", 1, 4, 4), 9]])
    mask = loss_mask_for(batch, start=batch["input_ids"].shape[1] - 10)

    # transformers: labels are the input ids, -100 where no loss is taken; mean over target tokens
    labels = np.where(mask == 1, batch["input_ids"], -100)
    kwargs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items() if k != "second_per_grid_ts"}
    ref.zero_grad()
    ref_loss = ref(**kwargs, labels=torch.from_numpy(labels)).loss
    ref_loss.backward()
    ref_grads = {canonical_name(n): p.grad.numpy() for n, p in ref.named_parameters()}

    inputs = prepare_inputs(cfg, **batch)
    length = batch["input_ids"].shape[1]
    graphdef, params = nnx.split(model, nnx.Param)

    def loss_fn(p):
        model = nnx.merge(graphdef, p)
        ids, loss_mask = jnp.asarray(batch["input_ids"]), jnp.asarray(mask)
        if chunk:  # slices of at most `chunk` tokens; with targets_only, of the 10 predicting positions alone
            hidden = model.hidden_states(inputs)[:, :length]
            positions = jnp.asarray(loss_positions(mask, 12)) if targets_only else None
            return chunked_sft_loss(hidden, model.output_table(), ids, loss_mask, chunk=chunk, positions=positions)
        return sft_loss(model.forward(inputs)[:, :length], ids, loss_mask)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    assert abs(float(loss) - ref_loss.item()) / abs(ref_loss.item()) <= 1e-4
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(grads)).items()}
    ours = dict(hf_tensors(cfg, flat))
    assert ours.keys() == ref_grads.keys()
    for name, g in ref_grads.items():
        err = np.abs(ours[name] - g).max() / max(np.abs(g).max(), 1e-12)
        assert err <= 1e-3, (name, err)


def test_sequence_average_weights_each_sequence_equally():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 6, 11)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 11, (2, 6)))
    mask = jnp.asarray([[0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]])
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    nll = -np.take_along_axis(logp[:, :-1], np.asarray(ids)[:, 1:, None], -1)[..., 0]
    m = np.asarray(mask)[:, 1:]
    by_token = (nll * m).sum() / m.sum()
    by_sequence = np.mean([(nll[b] * m[b]).sum() / m[b].sum() for b in range(2)])
    np.testing.assert_allclose(float(sft_loss(logits, ids, mask, "token")), by_token, rtol=1e-6)
    np.testing.assert_allclose(float(sft_loss(logits, ids, mask, "sequence")), by_sequence, rtol=1e-6)
    assert abs(by_token - by_sequence) > 1e-3  # the two rules really differ here


@pytest.mark.parametrize("average", ["token", "sequence"])
@pytest.mark.parametrize("chunk,targets_only", [(2, False), (3, False), (7, False), (2, True), (7, True)])
def test_chunked_loss_equals_full_logits_loss(average, chunk, targets_only):
    """Value and gradients (hidden states and table) of the chunked loss equal those of the loss on
    full logits; rows of 7 positions make 4 slices of 2 (1 padding position), 3 of 3 (2), or one.
    With targets_only, logits are made at the 5 and 4 predicting positions of the rows (padded to 6)."""
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 8)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(13, 8)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 13, (2, 7)))
    mask = jnp.asarray([[0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1, 0]])

    def full(h, t):
        return sft_loss(jnp.einsum("bld,vd->blv", h, t), ids, mask, average)

    positions = jnp.asarray(loss_positions(np.asarray(mask), 6)) if targets_only else None

    def chunked(h, t):
        return chunked_sft_loss(h, t, ids, mask, average, chunk, positions)

    (want, want_grads), (got, got_grads) = (
        jax.value_and_grad(f, argnums=(0, 1))(hidden, table) for f in (full, chunked)
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(chunked)(hidden, table)), float(want), rtol=1e-6)  # no gradient asked
    for g, w in zip(got_grads, want_grads):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * np.abs(np.asarray(w)).max()
    scaled = jax.grad(lambda h, t: 3.0 * chunked(h, t))(hidden, table)  # the cotangent scales the gradient
    np.testing.assert_allclose(np.asarray(scaled), 3 * np.asarray(got_grads[0]), rtol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_train_loss_fn_chunked_equals_full_logits(tied):
    """`step.loss_fn` with `loss_chunk` gives the full-logits loss and gradients for tied embeddings
    (the table is the embedding) and an untied lm_head (its kernel transposed)."""
    from reference import tiny_config

    from stjax.models.qwen_vl import init_model
    from stjax.train.step import loss_fn

    cfg = tiny_config("qwen2_5_vl")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
    model = init_model(cfg)
    batch = make_batch(cfg, [[3, ("image", 1, 4, 4), 9], [12]])
    inputs = prepare_inputs(cfg, **batch)
    mask = jnp.asarray(loss_mask_for(batch, start=4))
    graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
    want, want_grads = jax.value_and_grad(loss_fn, argnums=1)(graphdef, params, frozen, inputs, mask, "token")
    got, got_grads = jax.value_and_grad(loss_fn, argnums=1)(
        graphdef, params, frozen, inputs, mask, "token", loss_chunk=5
    )
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert np.abs(np.asarray(g) - np.asarray(w)).max() <= 1e-5 * max(np.abs(np.asarray(w)).max(), 1e-12)


def test_loss_positions_list_the_predicting_positions():
    """Against a loop over each row: position i is listed when token i + 1 is a target, in order,
    then the last position (weight 0) fills the row; a row without targets is all padding."""
    rng = np.random.default_rng(3)
    mask = (rng.random((5, 40)) < 0.3).astype(np.int32)
    mask[3] = 0
    mask[4, 1:] = 1  # every position but the last predicts a target
    size = 39
    got = loss_positions(mask, size)
    for row, listed in zip(mask, got):
        want = [i for i in range(len(row) - 1) if row[i + 1]]
        assert listed.tolist() == want + [len(row) - 1] * (size - len(want))
    with pytest.raises(ValueError, match="39 target tokens, more than the 38 loss positions"):
        loss_positions(mask, 38)
    # What a batch holds: none for rows shorter than the smallest bucket, else the bucket's positions.
    assert target_positions(mask) is None
    long = np.pad(mask, ((0, 0), (0, 160)))
    np.testing.assert_array_equal(target_positions(long), loss_positions(long, 64))
    np.testing.assert_array_equal(target_positions(long, targets=100), loss_positions(long, 128))


def test_loss_bucket_is_a_power_of_two_that_holds_the_targets():
    length = 3000
    sizes = set()
    for targets in range(0, length + 1):
        size = loss_bucket(targets, length)
        if size is None:  # all positions: no power of two (>= 64) below the length holds them
            assert targets > 2048
            continue
        assert size >= max(targets, 64) and size & (size - 1) == 0 and (size == 64 or size // 2 < targets)
        sizes.add(size)
    assert sorted(sizes) == [64, 128, 256, 512, 1024, 2048]  # six compiled steps at most for this length
