"""bf16 parameters with fp32 master copies, as the shipped 7B configs run (`model.param_dtype:
bfloat16`, `master_dtype: float32`, `compute_dtype: bfloat16`), LoRA and full fine-tuning:
the master copy stays fp32 and keeps updates smaller than bf16 can hold, the model computes from the
master's bf16 cast, and a few steps follow an fp32 run of the same start within bf16's error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from reference import tiny_config
from test_train_step import sft_batch, stack

from stjax.models.loading import model_from_params
from stjax.models.qwen_vl import compiled_forward, init_model
from stjax.train.lora import with_lora
from stjax.train.step import Batch, OptimConfig, compiled_train_step, init_state, split_trainable

STEPS = 3


def models(kind: str):
    """(bf16 model, fp32 model with the same weights): weights drawn in bf16, then widened."""
    cfg32 = tiny_config("qwen2_5_vl", initializer_range=0.05)
    cfg16 = cfg32.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    model16 = init_model(cfg16, seed=0)
    if kind == "lora":
        model16 = with_lora(model16, rank=8, alpha=8.0, seed=1)
        model16.model.layers.q_proj.lora_b[...] = 0.05 * jax.random.normal(  # adapters already trained a bit
            jax.random.key(2), model16.model.layers.q_proj.lora_b[...].shape, jnp.bfloat16
        )
    weights = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model16, nnx.Param)))
    model32 = model_from_params(
        model16.config.replace(param_dtype="float32", compute_dtype="float32"),
        {k: np.asarray(v, np.float32) for k, v in weights.items()},
    )
    return model16, model32


def train(model, optim: OptimConfig, batch: Batch):
    graphdef, params, frozen = split_trainable(model)
    state = init_state(params, optim, master_dtype=jnp.float32)
    losses = []
    for _ in range(STEPS):
        state, metrics = compiled_train_step(graphdef, optim, state, frozen, batch)
        losses.append(float(metrics["loss"]))
    return graphdef, params, frozen, state, np.asarray(losses)


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_bf16_params_with_fp32_master(kind):
    model16, model32 = models(kind)
    _, _, inputs, loss_mask = sft_batch(model16.config)
    batch = Batch(inputs=stack(inputs), loss_mask=stack(loss_mask))
    optim = OptimConfig(learning_rate=1e-5, total_steps=STEPS, warmup_ratio=0.0)  # updates below bf16's spacing
    graphdef, start, frozen, state, losses16 = train(model16, optim, batch)
    *_, state32, losses32 = train(model32, optim, batch)

    # the master copy is fp32; the frozen weights stay bf16
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(start)} == {jnp.dtype(jnp.bfloat16)}
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(frozen))
    # it holds what bf16 cannot: most entries moved, yet most of them round back to their start in bf16
    master = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state.params)])
    begin = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(start)])
    moved = master != begin
    assert moved.mean() > 0.5
    assert (master.astype(jnp.bfloat16).astype(np.float32)[moved] == begin[moved]).mean() > 0.5

    # the model computes from the master's bf16 cast: the fp32 master and its cast give the same logits
    cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), state.params)
    logits = lambda p: np.asarray(compiled_forward(nnx.merge(graphdef, p, frozen), inputs), np.float32)
    np.testing.assert_array_equal(logits(state.params), logits(cast))

    # a few steps follow the fp32 run: losses to 1% (bf16 keeps 8 bits: 0.4% per rounding, the
    # logits sum many), and the total update's direction to cosine 0.95
    np.testing.assert_allclose(losses16, losses32, rtol=1e-2)
    update16 = master - begin
    update32 = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(state32.params)]) - begin
    cosine = update16 @ update32 / np.linalg.norm(update16) / np.linalg.norm(update32)
    assert cosine > 0.95, cosine  # measured: 0.994 (LoRA), 0.996 (full); losses 1.4e-4 and 2.8e-3 apart
