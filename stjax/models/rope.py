"""Host-side (NumPy) position bookkeeping for Qwen2-VL / Qwen2.5-VL.

Everything here depends on the token ids and the vision grids only, so it runs on the host (in data
workers or before a jitted call) and hands the device plain integer arrays of static shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RopeSpec:
    """The config values the M-RoPE rule needs (see `QwenVLConfig.rope_spec`)."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    spatial_merge_size: int = 2
    # Qwen2.5-VL scales video time positions by tokens_per_second * second_per_grid_t;
    # None selects the Qwen2-VL rule (time position = frame-pair index).
    tokens_per_second: float | None = None


def _vision_positions(t: int, h: int, w: int, time_ids: np.ndarray, start: int) -> np.ndarray:
    """(3, t*h*w) positions of one vision block whose merged grid is (t, h, w)."""
    tt = np.repeat(time_ids, h * w)
    hh = np.tile(np.repeat(np.arange(h), w), t)
    ww = np.tile(np.arange(w), t * h)
    return np.stack([tt, hh, ww]).astype(np.int64) + start


def get_rope_index(
    input_ids: np.ndarray,
    spec: RopeSpec,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """M-RoPE position ids (3, B, L) and rope deltas (B,) by the original Qwen rule (Qwen2-VL's and Qwen2.5-VL's;
    a family with another rule supplies it, `stjax.models.families.Family.rope_index`).

    Text advances all three streams by one per token. A vision block starting at `cur` gets
    `cur + (time, row, col)` over its merged grid, and the text after it restarts at the maximum
    position so far + 1 (transformers 4.49 / vLLM; transformers 5.x differs when time runs past
    the spatial size). Padding positions (attention_mask == 0) are set to 1, as in transformers.
    `rope_delta = max(position) + 1 - L` lets decoding continue with `index + rope_delta`.
    """
    input_ids = np.asarray(input_ids)
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
    images = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw)
    videos = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw)
    merge = spec.spatial_merge_size
    position_ids = np.ones((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    image_i = video_i = 0
    for b in range(batch):
        ids = input_ids[b][mask[b] == 1]
        chunks: list[np.ndarray] = []
        next_pos = 0
        i = 0
        while i < len(ids):
            tok = ids[i]
            if tok != spec.image_token_id and tok != spec.video_token_id:
                # A run of text tokens up to the next vision pad (or the end).
                j = i
                while j < len(ids) and ids[j] != spec.image_token_id and ids[j] != spec.video_token_id:
                    j += 1
                chunks.append(np.broadcast_to(np.arange(j - i) + next_pos, (3, j - i)))
                next_pos += j - i
                i = j
                continue
            if tok == spec.image_token_id:
                t, h, w = (int(x) for x in images[image_i])
                image_i += 1
                time_ids = np.zeros(t, np.int64)
            else:
                t, h, w = (int(x) for x in videos[video_i])
                if spec.tokens_per_second is None:
                    time_ids = np.arange(t)
                else:
                    seconds = 1.0 if second_per_grid_ts is None else second_per_grid_ts[video_i]
                    # transformers computes this in float32 and truncates with .long().
                    scale = np.float32(seconds) * np.float32(spec.tokens_per_second)
                    time_ids = (np.arange(t, dtype=np.float32) * scale).astype(np.int64)
                video_i += 1
            h, w = h // merge, w // merge
            block = _vision_positions(t, h, w, time_ids, next_pos)
            chunks.append(block)
            next_pos = int(block.max()) + 1
            i += t * h * w
        positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b] == 1] = positions
        deltas[b] = (positions.max() + 1 if positions.size else 0) - length
    return position_ids, deltas


def vision_rotary_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
    """(num_patches, 2) (row, col) of every patch, in the processor's merge-block order.

    Rows and columns are whole-image patch coordinates; they repeat for every temporal slice
    (the vision rotary embedding has no time component).
    """
    out = []
    for t, h, w in np.asarray(grid_thw).tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(block).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], -1), (t, 1)))
    return np.concatenate(out).astype(np.int32) if out else np.zeros((0, 2), np.int32)


def window_order(grid_thw: np.ndarray, merge: int, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL window permutation, in merged-token units, and the length of each window.

    `window` is the window side in merged tokens (window_size // merge // patch). Each frame's
    (h, w) merged grid is padded at the bottom/right to whole windows (transformers pads by
    `window - l % window`, a full empty window when divisible; empty windows are dropped either
    way), windows are read row-major, tokens row-major inside a window. Windows never span frames.
    Returns (order, window_lengths): order[k] is the original merged-token index at position k.
    """
    order, lengths = [], []
    offset = 0
    for t, h, w in np.asarray(grid_thw).tolist():
        gh, gw = h // merge, w // merge
        nh, nw = -(-gh // window), -(-gw // window)
        index = np.full((t, nh * window, nw * window), -1, np.int64)
        index[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw) + offset
        windows = index.reshape(t, nh, window, nw, window).transpose(0, 1, 3, 2, 4)
        windows = windows.reshape(t * nh * nw, window * window)
        for win in windows:
            kept = win[win >= 0]
            if kept.size:
                order.append(kept)
                lengths.append(kept.size)
        offset += t * gh * gw
    if not order:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    return np.concatenate(order), np.asarray(lengths, np.int64)
