"""A train state saved on one mesh restores, unchanged, onto another mesh shape; a checkpoint of
another layout is refused with its path in the message."""

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import make_batch, tiny_config

from stjax.models.inputs import prepare_inputs
from stjax.models.qwen_vl import init_model
from stjax.sharding import make_mesh, shard_model
from stjax.train.checkpoint import Checkpointer, abstract_like
from stjax.train.loop import placed_state
from stjax.train.step import Batch, OptimConfig, compiled_train_step, split_trainable


def test_a_checkpoint_saved_on_fsdp8_restores_on_fsdp2_tensor2(tmp_path):
    cfg = tiny_config("qwen2_vl")
    model = init_model(cfg, seed=0)
    optim = OptimConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0)

    wide = make_mesh({"fsdp": 8})
    graphdef, trainable, frozen = split_trainable(shard_model(model, wide))
    state = placed_state(trainable, optim, seed=3, mesh=wide)
    inputs = prepare_inputs(cfg, **make_batch(cfg, [[5, ("video", 2, 4, 4), 3]] * 8, seed=1))
    batch = jax.tree.map(lambda x: x[None], Batch(inputs=inputs, loss_mask=np.ones_like(inputs.input_ids)))
    state, _ = compiled_train_step(graphdef, optim, state, frozen, batch)  # non-trivial moments
    saved = jax.tree.map(np.asarray, state)
    checkpoints = Checkpointer(tmp_path, every=1, keep=2)
    checkpoints.save(1, state, None)
    checkpoints.wait()

    square = make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    _, other, _ = split_trainable(shard_model(init_model(cfg, seed=9), square))
    target = placed_state(other, optim, seed=0, mesh=square)
    restored = checkpoints.restore(1, abstract_like(target), None)
    checkpoints.close()

    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(np.asarray(a), b)
    kernel = restored.params["model"]["layers"]["q_proj"]["kernel"][...]
    assert kernel.sharding.mesh.shape == {"data": 1, "fsdp": 2, "tensor": 2}
    layers, hidden, heads = kernel.shape
    assert kernel.addressable_shards[0].data.shape == (layers, hidden // 2, heads // 2)
    mu = restored.opt_state[0].mu["model"]["layers"]["q_proj"]["kernel"][...]
    assert mu.addressable_shards[0].data.shape == (layers, hidden // 2, heads // 2)  # moments follow


# orbax leaves the coroutine of a refused read unawaited; it is collected (and reported) here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_restoring_a_checkpoint_of_another_layout_names_the_checkpoint(tmp_path):
    """A state tree with another structure (a different LoRA or optimizer layout) or another shape
    (another model size) is refused with the checkpoint's path in the message."""
    checkpoints = Checkpointer(tmp_path / "ck", every=1, keep=1)
    checkpoints.save(3, {"a": jnp.ones((3,)), "b": {"c": jnp.zeros((2, 2))}}, None)
    checkpoints.wait()
    for other in (
        {"a": jnp.ones((3,)), "b": {"d": jnp.zeros((2, 2))}},
        {"a": jnp.ones((4,)), "b": {"c": jnp.zeros((2, 2))}},
    ):
        with pytest.raises(ValueError, match=f"checkpoint {tmp_path / 'ck' / '3'} does not match"):
            checkpoints.restore(3, abstract_like(other), None)
    checkpoints.close()
    gc.collect()
