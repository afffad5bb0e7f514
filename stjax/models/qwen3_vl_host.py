"""Qwen3-VL's host-side rules (NumPy only, so data workers need no JAX): its M-RoPE position ids and the
taps that resample the learned vision position table to each image's grid.

A video's temporal patches are separate vision blocks in Qwen3-VL's prompt (a `<t seconds>` timestamp and
vision start/end tokens around each), so each block is positioned as an image of one frame, and the text
after a block resumes at start + max(h, w) (not at the block's largest position + 1). The vision tower adds
a learned (side x side) position table, bilinearly resampled (align_corners=True) to each image.
"""

from __future__ import annotations

import numpy as np

from stjax.models.rope import RopeSpec


def rope_index(
    input_ids: np.ndarray,
    spec: RopeSpec,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's M-RoPE position ids (3, B, L) and deltas (B,), as transformers' `get_rope_index`
    (`rope.get_rope_index`'s arguments; times come from the prompt's timestamps, so `second_per_grid_ts`
    is not read).

    Each run of image pads takes the next image grid and each run of video pads the next temporal
    patch of the videos (the processor writes every temporal patch as its own block). A block starting
    at `cur` with merged grid (t, h, w) gets `cur + (time, row, col)`; the text after it resumes at
    `cur + max(h, w)`. Padding positions are 0.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    merge = spec.spatial_merge_size
    images = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    videos = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw, np.int64)
    frames = np.repeat(videos, videos[:, 0], axis=0)
    frames[:, 0] = 1
    grids = {1: iter(images), 2: iter(frames)}
    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    for b in range(batch):
        real = attention_mask[b] == 1
        ids = input_ids[b][real]
        kinds = np.where(ids == spec.image_token_id, 1, np.where(ids == spec.video_token_id, 2, 0))
        starts = np.flatnonzero(np.diff(kinds, prepend=-1))
        ends = np.append(starts[1:], len(ids))
        chunks, cur = [], 0
        for kind, start, end in zip(kinds[starts], starts, ends):
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(end - start) + cur, (3, end - start)))
                cur += end - start
                continue
            t, h, w = next(grids[kind])
            h, w = h // merge, w // merge
            if end - start != t * h * w:
                raise ValueError(
                    f"a run of {end - start} {('image', 'video')[kind - 1]} pad tokens where its grid "
                    f"gives {t * h * w}: Qwen3-VL writes each temporal patch of a video as its own "
                    "vision block (stjax.data.processor.Processor for a qwen3_vl model)"
                )
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w)
        positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, b, real] = positions
        deltas[b] = (positions.max() + 1 if positions.size else 0) - len(ids)
    return position_ids, deltas


def position_embedding_taps(
    rotary_positions: np.ndarray, grid_hw: np.ndarray, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) rows of the flattened (side x side) position table and their (N, 4) float32 weights:
    the bilinear resampling (align_corners=True) of the table to each patch's image grid, as
    transformers' `get_vision_interpolation_indices_and_weights`. `rotary_positions` (N, 2) holds each
    patch's (row, col); `grid_hw` (N, 2) the (h, w) patch grid of its image."""

    def axis(index: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.maximum(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0)
        return taps, weights.astype(np.float32)

    h_taps, h_weights = axis(rotary_positions[:, 0], grid_hw[:, 0])
    w_taps, w_weights = axis(rotary_positions[:, 1], grid_hw[:, 1])
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight
