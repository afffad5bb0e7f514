"""Loader batches -> train-step inputs: the per-sample vision layout computes, for every sample of
a padded batch, the logits of that sample alone through the inference path (itself checked against
transformers in test_model_parity), also when the batch is split over a mesh."""

import jax
import numpy as np
import pytest
from flax import nnx
from reference import make_batch, tiny_config

from stjax.data.loader import LoaderConfig, pad_batch
from stjax.models.qwen_vl import _forward, init_model
from stjax.sharding import make_mesh, shard_model
from stjax.train.batch import global_batch, host_batch

# Different video sizes and frame counts, an image beside a video, and a text-only sample.
PROMPTS = [[3, ("video", 2, 8, 8), 4], [2, ("image", 1, 4, 4), ("video", 3, 4, 8), 5], [9], [4, ("video", 1, 8, 4), 1]]


def loader_items(cfg, prompts, seed=0):
    """Per-sample processor-style dicts (what the loader pads), from the reference batch builder."""
    items = []
    for k, prompt in enumerate(prompts):
        one = make_batch(cfg, [prompt], seed=seed + k, fps=2.0)
        dim = cfg.vision.patch_dim
        empty = np.zeros((0, dim), np.float32)
        items.append(
            {
                "input_ids": one["input_ids"][0],
                "attention_mask": one["attention_mask"][0],
                "loss_mask": np.ones_like(one["input_ids"][0]),
                "position_ids": one["position_ids"][:, 0],
                "pixel_values_videos": one.get("pixel_values_videos", empty),
                "video_grid_thw": one.get("video_grid_thw", np.zeros((0, 3), np.int64)),
                "second_per_grid_ts": one.get("second_per_grid_ts", np.zeros((0,), np.float32)),
                "pixel_values": one.get("pixel_values", empty),
                "image_grid_thw": one.get("image_grid_thw", np.zeros((0, 3), np.int64)),
            }
        )
    return items


LOADER = LoaderConfig(
    batch_size=4,
    token_buckets=(64, 128),
    patch_buckets=(0, 256, 512),
    image_patch_buckets=(0, 64),
    videos_per_sample=1,
    images_per_sample=1,
)


def logits_alone(model, item):
    kw = {
        k: item[k]
        for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")
        if len(item[k])
    }
    return np.asarray(model(item["input_ids"][None], **kw))[0]


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_each_sample_of_a_loader_batch_gets_its_own_logits(arch):
    cfg = tiny_config(arch)
    model = init_model(cfg, seed=4)
    items = loader_items(cfg, PROMPTS)
    batch = host_batch(cfg, [pad_batch(items, LOADER, pad_id=0)])
    assert batch.inputs.vision.patches.ndim == 4  # (accum, B, rows, patch_dim)
    inputs = jax.tree.map(lambda x: x[0], batch.inputs)
    graphdef, state = nnx.split(model)
    logits = np.asarray(_forward(graphdef, state, inputs))
    for b, item in enumerate(items):
        ref = logits_alone(model, item)
        n = len(ref)
        np.testing.assert_allclose(logits[b, :n], ref, atol=1e-4 * np.abs(ref).max())
    # The check can fail: give sample 0 the features of sample 3's video.
    swapped = inputs.vision.replace(patches=inputs.vision.patches[np.array([3, 1, 2, 0])])
    wrong = np.asarray(_forward(graphdef, state, inputs.replace(vision=swapped)))
    ref = logits_alone(model, items[0])
    assert np.abs(wrong[0, : len(ref)] - ref).max() > 1e-2 * np.abs(ref).max()


def test_micro_batches_share_one_shape():
    cfg = tiny_config("qwen2_5_vl")
    items = loader_items(cfg, PROMPTS)
    batch = host_batch(
        cfg,
        [
            pad_batch(items[:2], LOADER.__class__(**{**LOADER.__dict__, "batch_size": 2}), 0),
            pad_batch(items[2:], LOADER.__class__(**{**LOADER.__dict__, "batch_size": 2}), 0),
        ],
    )
    assert batch.loss_mask.shape[:2] == (2, 2)
    assert batch.inputs.position_ids.shape[:3] == (2, 3, 2)
    assert batch.inputs.vision.windows.index.shape[:2] == (2, 2)


def test_a_batch_split_over_the_mesh_gives_the_same_logits():
    cfg = tiny_config("qwen2_vl")
    model = init_model(cfg, seed=5)
    batch = host_batch(cfg, [pad_batch(loader_items(cfg, PROMPTS), LOADER, pad_id=0)])
    graphdef, state = nnx.split(model)
    single = np.asarray(_forward(graphdef, state, jax.tree.map(lambda x: x[0], batch.inputs)))
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    placed = global_batch(batch, mesh)
    patches = placed.inputs.vision.patches
    assert patches.addressable_shards[0].data.shape[1] == 1  # 4 samples over data x fsdp = 4
    graphdef, state = nnx.split(shard_model(model, mesh))
    sharded = np.asarray(_forward(graphdef, state, jax.tree.map(lambda x: x[0], placed.inputs)))
    np.testing.assert_allclose(sharded, single, atol=1e-5 * np.abs(single).max())


def test_a_step_on_the_loss_positions_equals_a_step_on_every_position():
    """Replies of 3 tokens in rows of 256: `host_batch` lists each row's predicting positions
    (padded to 64), and the step that makes logits there alone gives the loss and gradient norm (to
    1e-6 relative) and the update (to 1e-4 of the learning rate) of the step with logits everywhere."""
    from stjax.train.step import OptimConfig, compiled_train_step, init_state, split_trainable

    cfg = tiny_config("qwen2_5_vl")
    items = loader_items(cfg, PROMPTS)
    for item in items:
        real = np.flatnonzero(item["attention_mask"])
        item["loss_mask"] = np.zeros_like(item["loss_mask"])
        item["loss_mask"][real[-3:]] = 1
    batch = host_batch(cfg, [pad_batch(items, LOADER.__class__(**{**LOADER.__dict__, "token_buckets": (256,)}), 0)])
    assert batch.loss_positions.shape == (1, 4, 64) and batch.loss_mask.shape == (1, 4, 256)
    everywhere = batch.replace(loss_positions=None)
    # a large Adam eps keeps the update linear in the gradient (see test_train_step's accumulation test)
    optim = OptimConfig(learning_rate=1e-3, total_steps=10, warmup_ratio=0.0, adam_epsilon=1e-3)
    graphdef, params, frozen = split_trainable(init_model(cfg, seed=6))
    a, ma = compiled_train_step(graphdef, optim, init_state(params, optim), frozen, batch)
    b, mb = compiled_train_step(graphdef, optim, init_state(params, optim), frozen, everywhere)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(ma[key]), float(mb[key]), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-4 * optim.learning_rate)
