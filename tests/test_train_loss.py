"""SFT loss and gradients against transformers' PyTorch loss and autograd.

Tolerances: relative error <= 1e-4 on the loss and <= 1e-3 on every gradient tensor
(max |ours - torch| / max |torch|), gradients mapped to HF tensor names through the converter table.
"""

import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

import jax
import jax.numpy as jnp
from reference import make_batch
from stjax.models.inputs import prepare_inputs
from stjax.models.loading import load_pretrained
from stjax.models.weights import canonical_name, hf_tensors
from stjax.train.loss import sft_loss


def loss_mask_for(batch, start: int) -> np.ndarray:
    """Targets: every real token from `start` on (a reply after the prompt), none in padding."""
    mask = batch["attention_mask"].copy()
    mask[:, :start] = 0
    return mask


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_loss_and_gradients_match_transformers(hf_dirs, arch):
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
        logits = nnx.merge(graphdef, p).forward(inputs)[:, :length]
        return sft_loss(logits, jnp.asarray(batch["input_ids"]), jnp.asarray(mask))

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
