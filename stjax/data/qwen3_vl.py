"""Qwen3-VL's media rules, as transformers' `Qwen3VLVideoProcessor` and `Qwen3VLProcessor` state them.

- Frames: `fps` frames a second of the video (2 by default), at least `min_frames`, at most `max_frames`
  and the video's own count, spread by `linspace(0, total - 1, n).round()`.
- Size: one pixel budget for the whole clip (`smart_resize` with the frame count), sides multiples of
  patch x merge (32).
- Prompt: each temporal patch of a video is its own vision block, after its time as text,
  `<1.5 seconds><|vision_start|><|video_pad|>...<|vision_end|>`, the time being the mean of the times of
  the patch's first and last frame (from the frames' indices in the video and its frame rate).
- Pixels: (x / 255 - 0.5) / 0.5, patches of 16 x 16 x 2 frames.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from stjax.data.video import MediaConfig

MEAN = np.full(3, 0.5, np.float32)
STD = np.full(3, 0.5, np.float32)
FPS = 2.0
MIN_FRAMES, MAX_FRAMES = 4, 768
MIN_PIXELS, MAX_PIXELS = 128 * 32 * 32, 768 * 32 * 32  # the video processor's shortest_edge / longest_edge


def media_config(**changes) -> MediaConfig:
    """The MediaConfig of Qwen3-VL's patches (16 x 16, merged 2 x 2)."""
    return replace(
        MediaConfig(
            patch_size=16,
            fps=FPS,
            min_frames=MIN_FRAMES,
            max_frames=MAX_FRAMES,
            min_pixels=MIN_PIXELS,
            max_pixels=MAX_PIXELS,
        ),
        **changes,
    )


def sample_indices(
    total_frames: int, video_fps: float, fps: float = FPS, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES
) -> np.ndarray:
    """Indices of the frames taken from a video of `total_frames` at `video_fps`."""
    count = int(total_frames / video_fps * fps)
    count = min(max(count, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int)


def video_size(
    num_frames: int,
    height: int,
    width: int,
    factor: int = 32,
    temporal_factor: int = 2,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """The resized (height, width) of a clip's frames: the clip's pixels (frame count rounded to the
    temporal patch) within [min_pixels, max_pixels], sides multiples of `factor`, aspect kept."""
    if num_frames < temporal_factor:
        raise ValueError(f"{num_frames} frame(s): at least {temporal_factor} are needed")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {height}x{width}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    t = round(num_frames / temporal_factor) * temporal_factor
    if t * h * w > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif t * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def timestamps(frame_indices: np.ndarray, video_fps: float, temporal_patch_size: int = 2) -> list[float]:
    """Seconds of each temporal patch: the mean of its first and last frame's times (the last frame
    repeated to fill the final patch, as the frames are)."""
    indices = [int(i) for i in frame_indices]
    indices += [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / video_fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def video_text(seconds: list[float], start: str, pad: str, end: str) -> str:
    """A video's text, one pad per temporal patch (each pad is expanded to the patch's merged tokens)."""
    return "".join(f"<{t:.1f} seconds>{start}{pad}{end}" for t in seconds)
