"""From the loader's batches to the train step's `Batch`, placed on the mesh.

The loader (`stjax.data.loader`) yields per-process batches: text (B, L), each sample's patches
(B, P, 1176) and grids (B, V, 3) padded with zero rows. Here every sample is prepared on its own
(`prepare_vision`, the same host index work as inference) into the per-sample vision layout, all
micro-batches of a step are padded to common shapes, and each array becomes one global array whose
batch axis is split over the mesh's (data, fsdp) axes, each process contributing its own rows.

With several processes the shapes are agreed first (one small all-gather of a few integers), since
every process must build arrays of the same shape. Shapes come from buckets, so the step compiles
once per (text bucket, vision sizes, loss positions) triple, not per batch.

The loss positions: the step makes logits only at the positions that predict a target, listed per
row (`loss_positions`) and padded to a power of two (`loss_bucket`), so a reply after a long video
prompt costs the output projection only the reply's rows.
"""

from __future__ import annotations

from dataclasses import astuple

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from stjax.models.config import QwenVLConfig
from stjax.models.inputs import (
    ModelInputs,
    VisionInputs,
    VisionSizes,
    is_right_padded,
    make_groups,
    prepare_vision,
    vision_sizes,
)
from stjax.sharding import batch_sharding
from stjax.train.step import Batch


def _real_rows(grid: np.ndarray) -> np.ndarray:
    """The grid rows of one sample without the loader's (0, 0, 0) padding."""
    return grid[grid.prod(axis=1) > 0]


def _sample_grids(batch: dict[str, np.ndarray], b: int) -> tuple[np.ndarray, np.ndarray]:
    return _real_rows(batch["image_grid_thw"][b]), _real_rows(batch["video_grid_thw"][b])


def _blank_vision(sizes: VisionSizes, length: int, cfg: QwenVLConfig) -> VisionInputs:
    """The vision inputs of a text-only sample in a batch with vision: all padding."""
    v = cfg.vision
    side = v.window_merged * v.spatial_merge_size
    none = np.zeros((0,), np.int64)
    return VisionInputs(
        patches=np.zeros((sizes.rows, v.patch_dim), np.float32),
        rotary_positions=np.zeros((sizes.rows, 2), np.int32),
        frames=make_groups(none, sizes.frame_size, sizes.frame_count, sizes.rows),
        windows=make_groups(none, side * side, sizes.window_count, sizes.rows) if sizes.window_count else None,
        token_index=np.zeros((1, length), np.int32),
        token_mask=np.zeros((1, length), bool),
        **{
            name: np.zeros((sizes.rows,) + a.shape[1:], a.dtype)
            for name, a in cfg.family.patch_inputs(v, np.zeros((0, 2), np.int32), np.zeros((0, 2), np.int64)).items()
        },
    )


def loss_bucket(targets: int, length: int, smallest: int = 64) -> int | None:
    """How many positions per row get logits when no row has more than `targets` targets: the
    smallest power of two that holds them (at least `smallest`), or None (all positions) once that
    reaches the text length. A few sizes per text bucket, so a few compiled steps."""
    size = max(smallest, 1 << max(targets - 1, 0).bit_length())
    return size if size < length else None


def target_count(loss_mask: np.ndarray) -> int:
    """The most positions in a row that predict a target (a target at position 0 has none)."""
    return int(np.asarray(loss_mask)[..., 1:].sum(axis=-1).max(initial=0))


def target_positions(loss_mask: np.ndarray, targets: int | None = None) -> np.ndarray | None:
    """What `Batch.loss_positions` holds for this (..., L) loss mask: `loss_positions` padded to
    `loss_bucket`, or None (logits everywhere). `targets` sizes the bucket (default: the mask's own
    `target_count`; the trainer passes the count agreed over processes)."""
    size = loss_bucket(target_count(loss_mask) if targets is None else targets, loss_mask.shape[-1])
    return None if size is None else loss_positions(loss_mask, size)


def loss_positions(loss_mask: np.ndarray, size: int) -> np.ndarray:
    """(..., size) int32: per row, in order, the positions i that predict a target (loss_mask[..., i + 1]
    set), then the last position as padding (it predicts nothing, so it weighs 0 in the loss)."""
    predicting = loss_mask[..., 1:] != 0
    counts = predicting.sum(axis=-1, keepdims=True)
    if counts.max(initial=0) > size:
        raise ValueError(f"a row has {counts.max()} target tokens, more than the {size} loss positions")
    order = np.argsort(~predicting, axis=-1, kind="stable")[..., :size]  # predicting positions first, in order
    return np.where(np.arange(size) < counts, order, loss_mask.shape[-1] - 1).astype(np.int32)


def step_shapes(cfg: QwenVLConfig, micro_batches: list[dict[str, np.ndarray]]) -> tuple[int, int, VisionSizes | None]:
    """Text length, most targets in a row, and vision sizes that fit every sample of the step (this
    process only)."""
    length = max(mb["input_ids"].shape[1] for mb in micro_batches)
    targets = max(target_count(mb["loss_mask"]) for mb in micro_batches)
    sizes = None
    for mb in micro_batches:
        for b in range(len(mb["input_ids"])):
            grids = np.concatenate(_sample_grids(mb, b))
            if len(grids):
                need = vision_sizes(cfg, grids)
                sizes = need if sizes is None else sizes.max(need)
    return length, targets, sizes


def agree_shapes(length: int, targets: int, sizes: VisionSizes | None) -> tuple[int, int, VisionSizes | None]:
    """The largest shapes over all processes (a no-op with one process)."""
    if jax.process_count() == 1:
        return length, targets, sizes
    mine = np.array([length, targets, *(astuple(sizes) if sizes else (0, 0, 0, 0))], np.int64)
    every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(mine)).max(axis=0)
    return int(every[0]), int(every[1]), (VisionSizes(*every[2:].tolist()) if every[2] > 0 else None)


def micro_batch_inputs(
    cfg: QwenVLConfig, batch: dict[str, np.ndarray], length: int, sizes: VisionSizes | None
) -> tuple[ModelInputs, np.ndarray]:
    """One loader batch as `ModelInputs` (per-sample vision layout) and its loss mask, padded to
    `length` tokens and `sizes`."""
    pad = length - batch["input_ids"].shape[1]
    text = lambda x, value=0: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)], constant_values=value)
    input_ids, attention_mask = text(batch["input_ids"]), text(batch["attention_mask"])
    vision = None
    if sizes is not None:
        rows = []
        for b in range(len(input_ids)):
            image_grid, video_grid = _sample_grids(batch, b)
            if len(image_grid) + len(video_grid) == 0:
                rows.append(_blank_vision(sizes, length, cfg))
                continue
            ids = np.where(attention_mask[b] == 1, input_ids[b], -1)[None]
            rows.append(
                prepare_vision(
                    cfg,
                    ids,
                    batch["pixel_values"][b, : int(image_grid.prod(axis=1).sum())],
                    image_grid,
                    batch["pixel_values_videos"][b, : int(video_grid.prod(axis=1).sum())],
                    video_grid,
                    sizes,
                )
            )
        vision = jax.tree.map(lambda *x: np.stack(x), *rows)
        vision = vision.replace(token_index=vision.token_index[:, 0], token_mask=vision.token_mask[:, 0])
    inputs = ModelInputs(
        input_ids=input_ids.astype(np.int32),
        attention_mask=attention_mask.astype(np.int32),
        position_ids=text(batch["position_ids"], 1).astype(np.int32),
        vision=vision,
        right_padded=is_right_padded(attention_mask),
    )
    return inputs, text(batch["loss_mask"]).astype(np.int32)


def host_batch(cfg: QwenVLConfig, micro_batches: list[dict[str, np.ndarray]]) -> Batch:
    """This process's share of one step: the micro-batches stacked on a leading axis."""
    length, targets, sizes = agree_shapes(*step_shapes(cfg, micro_batches))
    parts = [micro_batch_inputs(cfg, mb, length, sizes) for mb in micro_batches]
    stack = lambda *x: np.stack(x)
    loss_mask = np.stack([p[1] for p in parts])
    return Batch(
        inputs=jax.tree.map(stack, *[p[0] for p in parts]),
        loss_mask=loss_mask,
        loss_positions=target_positions(loss_mask, targets),
    )


def place_rows(x: np.ndarray, mesh: Mesh, batch_axis: int = 0) -> jax.Array:
    """One global array from each process's rows: `batch_axis` over (data, fsdp)."""
    shape = list(x.shape)
    shape[batch_axis] *= jax.process_count()
    return jax.make_array_from_process_local_data(batch_sharding(mesh, shape, batch_axis), x, tuple(shape))


def global_inputs(inputs: ModelInputs, mesh: Mesh, batch_axis: int = 0) -> ModelInputs:
    """`ModelInputs` of this process's rows as global arrays (position_ids' batch axis is the next one)."""
    placed = jax.tree.map(lambda x: place_rows(x, mesh, batch_axis), inputs.replace(position_ids=None))
    return placed.replace(position_ids=place_rows(inputs.position_ids, mesh, batch_axis + 1))


def global_batch(batch, mesh: Mesh):
    """One global array per leaf, batch axis over (data, fsdp); each process gives its own rows.

    Leaves are (accum, B, ...) except position_ids (accum, 3, B, L)."""
    rest = jax.tree.map(lambda x: place_rows(x, mesh, 1), batch.replace(inputs=None))
    return rest.replace(inputs=global_inputs(batch.inputs, mesh, batch_axis=1))


def local_rows(x: jax.Array, count: int) -> np.ndarray:
    """This process's `count` rows of a global array whose axis 0 stacks the processes' rows in
    process order (as `place_rows` made them), however the program left it sharded (a jitted
    program may return it replicated): gathered, then sliced."""
    full = np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))
    start = jax.process_index() * count
    return full[start : start + count]
