"""Host-side preparation of model inputs (NumPy only).

`prepare_inputs` turns the transformers-style arguments (input_ids, pixel_values, grid_thw, ...)
into a `ModelInputs` pytree of static-shape integer and float arrays: M-RoPE position ids, patches
in processing order, the group tables for frame and window attention, and where each vision
feature goes in the text. All sizes are rounded up to buckets so that new video sizes reuse a
few compiled programs:

    bucket(n) = the smallest 2^k * (1 + j/8), j = 0..7, that is >= n    (at most 12.5% padding)

applied to the text length, the patch count, the number of frames and windows, and the frame
group size (patches per frame). Window groups are exactly (window side * merge)^2 patches.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from stjax.models.config import QwenVLConfig
from stjax.models.rope import vision_rotary_positions


class InputError(ValueError):
    """Model inputs that disagree with each other or with the config."""


def bucket(n: int, minimum: int = 8) -> int:
    """Smallest 2^k * (1 + j/8) that is >= max(n, minimum): eight sizes per octave."""
    n = max(int(n), minimum)
    step = 1 << max(n.bit_length() - 4, 0)  # an eighth of the power of two below n
    return -(-n // step) * step


@struct.dataclass
class VisionGroups:
    """Fixed-size attention groups over the patch sequence.

    index (G, T): patch row of each group slot (slots past `lengths` are padding).
    lengths (G,): real slots per group. inverse (N,): for each patch row its flat slot g*T + s,
    or G*T for bucket-padding rows that belong to no group.
    """

    index: np.ndarray
    lengths: np.ndarray
    inverse: np.ndarray


@struct.dataclass
class VisionInputs:
    """The vision pass of a batch, in one of two layouts.

    Flat (below): the patches of all prompts in one sequence, one vision pass; `token_index` points
    into the merged features of the whole batch (inference: `prepare_inputs`).
    Per sample: every field has a leading batch axis and `token_index` points into the sample's own
    features, so a data-parallel step keeps each sample's vision work on its own shard (training:
    `stjax.train.batch`).
    """

    patches: np.ndarray  # (N, C*T*P*P) in the family's processing order (window order for Qwen2.5-VL)
    rotary_positions: np.ndarray  # (N, 2) patch (row, col)
    frames: VisionGroups  # one group per temporal slice
    windows: VisionGroups | None  # attention windows (Qwen2.5-VL), None for a family without them
    token_index: np.ndarray  # (B, L) merged-feature row feeding each text slot
    token_mask: np.ndarray  # (B, L) True where the text slot is an image or video pad
    # Qwen3-VL (`Family.patch_inputs`): each patch's 4 rows of the learned position table and their bilinear
    # weights (N, 4).
    pos_embed_index: np.ndarray | None = None
    pos_embed_weight: np.ndarray | None = None


@struct.dataclass
class ModelInputs:
    input_ids: np.ndarray  # (B, L)
    attention_mask: np.ndarray  # (B, L), 1 real, 0 padding
    position_ids: np.ndarray  # (3, B, L)
    vision: VisionInputs | None = None
    # Static: every row's real tokens come first and its padding after (see `is_right_padded`).
    # Causal attention then needs no padding mask, which lets cuDNN run without a bias.
    right_padded: bool = struct.field(pytree_node=False, default=False)


def is_right_padded(attention_mask: np.ndarray) -> bool:
    """True when each row of the (B, L) mask is ones then zeros (no padding before a real token)."""
    mask = np.asarray(attention_mask)
    return bool(np.all(mask == (np.arange(mask.shape[-1]) < mask.sum(-1, keepdims=True))))


def cast_floats(inputs: ModelInputs, dtype) -> ModelInputs:
    """Pixels (the only float inputs) in the model's compute dtype; integer arrays unchanged."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, inputs)


def make_groups(lengths: np.ndarray, size: int, count: int, rows: int) -> VisionGroups:
    """Groups for consecutive segments of the given lengths, padded to (count, size)."""
    lengths = np.asarray(lengths, np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    slots = np.arange(size)
    index = np.zeros((count, size), np.int32)
    index[: len(lengths)] = np.where(slots < lengths[:, None], starts[:, None] + slots, 0)
    padded_lengths = np.zeros((count,), np.int32)
    padded_lengths[: len(lengths)] = lengths
    inverse = np.full((rows,), count * size, np.int32)
    segment = np.repeat(np.arange(len(lengths)), lengths)
    inverse[: len(segment)] = segment * size + (np.arange(len(segment)) - starts[segment])
    return VisionGroups(index=index, lengths=padded_lengths, inverse=inverse)


def _as_grid(grid: np.ndarray | None) -> np.ndarray:
    return np.zeros((0, 3), np.int64) if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class VisionSizes:
    """The static shapes of a `VisionInputs`: patch rows, frame groups (count x size), window groups."""

    rows: int
    frame_count: int
    frame_size: int
    window_count: int  # 0 for a family without attention windows (Qwen2-VL)

    def max(self, other: VisionSizes) -> VisionSizes:
        return VisionSizes(*np.maximum(astuple(self), astuple(other)).tolist())


def vision_sizes(cfg: QwenVLConfig, grids: np.ndarray) -> VisionSizes:
    """The bucketed shapes `prepare_vision` gives these grids (a batch takes the maximum of its rows)."""
    grids = _as_grid(grids)
    return _sizes(grids, cfg.family.processing_order(cfg.vision, grids)[1])


def _sizes(grids: np.ndarray, window_lengths: np.ndarray | None) -> VisionSizes:
    frame_lengths = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
    return VisionSizes(
        rows=bucket(int(grids.prod(axis=1).sum()), minimum=64),
        frame_count=bucket(len(frame_lengths), 4),
        frame_size=bucket(frame_lengths.max()),
        window_count=0 if window_lengths is None else bucket(len(window_lengths), 4),
    )


def prepare_vision(
    cfg: QwenVLConfig,
    input_ids: np.ndarray,
    pixel_values: np.ndarray | None,
    image_grid_thw: np.ndarray | None,
    pixel_values_videos: np.ndarray | None,
    video_grid_thw: np.ndarray | None,
    sizes: VisionSizes | None = None,
) -> VisionInputs | None:
    """Patches of all images then all videos, in one padded pass of the vision tower.

    `sizes` (at least `vision_sizes` of the grids) pads to given shapes, so that the samples of a
    batch, prepared one by one, stack.
    """
    v = cfg.vision
    merge_unit = v.spatial_merge_size**2
    grids = np.concatenate([_as_grid(image_grid_thw), _as_grid(video_grid_thw)])
    if len(grids) == 0:
        return None
    pixels = [np.asarray(p) for p in (pixel_values, pixel_values_videos) if p is not None]
    pixels = np.concatenate(pixels) if pixels else np.zeros((0, v.patch_dim), np.float32)
    patches_per_item = grids.prod(axis=1)
    if pixels.shape != (patches_per_item.sum(), v.patch_dim):
        raise InputError(
            f"pixel values have shape {pixels.shape} but the grids {grids.tolist()} need "
            f"({patches_per_item.sum()}, {v.patch_dim})"
        )
    counts = {
        name: int((input_ids == tok).sum())
        for name, tok in (("image", cfg.image_token_id), ("video", cfg.video_token_id))
    }
    need = {
        "image": int(_as_grid(image_grid_thw).prod(axis=1).sum()) // merge_unit,
        "video": int(_as_grid(video_grid_thw).prod(axis=1).sum()) // merge_unit,
    }
    for name in ("image", "video"):
        if counts[name] != need[name]:
            raise InputError(
                f"the prompt has {counts[name]} {name} pad tokens but the {name} grids give "
                f"{need[name]} features (t*h*w/{merge_unit} per item)"
            )
    order, window_lengths = cfg.family.processing_order(cfg.vision, grids)
    least = _sizes(grids, window_lengths)
    sizes = least if sizes is None else sizes
    if sizes.max(least) != sizes:
        raise InputError(f"vision sizes {sizes} are smaller than these grids need ({least})")

    patch_order = (order[:, None] * merge_unit + np.arange(merge_unit)).reshape(-1)
    rows = sizes.rows
    patches = np.zeros((rows, v.patch_dim), pixels.dtype)
    patches[: len(patch_order)] = pixels[patch_order]
    rotary = np.zeros((rows, 2), np.int32)
    rotary[: len(patch_order)] = vision_rotary_positions(grids, v.spatial_merge_size)[patch_order]
    grid_hw = np.repeat(grids[:, 1:], patches_per_item, axis=0)[patch_order]
    extra = {
        name: np.pad(a, [(0, rows - len(a))] + [(0, 0)] * (a.ndim - 1))
        for name, a in cfg.family.patch_inputs(v, rotary[: len(patch_order)], grid_hw).items()
    }

    frame_lengths = np.repeat(grids[:, 1] * grids[:, 2], grids[:, 0])
    frames = make_groups(frame_lengths, sizes.frame_size, sizes.frame_count, rows)
    windows = None
    if window_lengths is not None:
        side = v.window_merged * v.spatial_merge_size
        windows = make_groups(window_lengths, side * side, sizes.window_count, rows)

    # Feature k (original order) sits at processed row position[k]; pads take features in order.
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    token_mask = (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)
    token_index = np.zeros(input_ids.shape, np.int32)
    token_index[input_ids == cfg.image_token_id] = position[: need["image"]]
    token_index[input_ids == cfg.video_token_id] = position[need["image"] :]
    return VisionInputs(
        patches=patches,
        rotary_positions=rotary,
        frames=frames,
        windows=windows,
        token_index=token_index,
        token_mask=token_mask,
        **extra,
    )


def prepare_inputs(
    cfg: QwenVLConfig,
    input_ids: np.ndarray,
    attention_mask: np.ndarray | None = None,
    pixel_values: np.ndarray | None = None,
    image_grid_thw: np.ndarray | None = None,
    pixel_values_videos: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    position_ids: np.ndarray | None = None,
    length: int | None = None,
) -> ModelInputs:
    """Everything the jitted forward needs, as NumPy arrays of bucketed static shape.

    The text is right-padded (attention_mask 0) to `length`, or to bucket(L) when not given;
    padding never changes the outputs at real positions. `right_padded` records whether all
    padding, the caller's included, comes after the real tokens.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim == 1:
        input_ids = input_ids[None]
    batch, seq = input_ids.shape
    mask = np.ones((batch, seq), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    mask = mask.reshape(batch, seq)
    if position_ids is None:
        position_ids, _ = cfg.family.rope_index(
            input_ids, cfg.rope_spec(), image_grid_thw, video_grid_thw, second_per_grid_ts, mask
        )
    position_ids = np.asarray(position_ids).reshape(3, batch, seq)
    ids = np.where(mask == 1, input_ids, -1)  # padding never counts as a vision pad
    vision = prepare_vision(cfg, ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)

    target = bucket(seq) if length is None else length
    if target < seq:
        raise InputError(f"sequence of length {seq} does not fit the requested length {target}")
    pad = target - seq
    if vision is not None:
        vision = vision.replace(
            token_index=np.pad(vision.token_index, ((0, 0), (0, pad))),
            token_mask=np.pad(vision.token_mask, ((0, 0), (0, pad))),
        )
    mask = np.pad(mask, ((0, 0), (0, pad)))
    return ModelInputs(
        input_ids=np.pad(input_ids, ((0, 0), (0, pad))).astype(np.int32),
        attention_mask=mask,
        position_ids=np.pad(position_ids, ((0, 0), (0, 0), (0, pad))).astype(np.int32),
        vision=vision,
        right_padded=is_right_padded(mask),
    )
