"""Qwen3-VL's media rules, as transformers' `Qwen3VLVideoProcessor` and `Qwen3VLProcessor` state them.

- Frames: `num_frames` frames spread over the video when it is set, else `fps` frames a second of the video
  (at least `min_frames`, at most `max_frames` and the video's own count), by `linspace(0, total - 1, n).round()`.
- Size: one pixel budget for the whole clip (`smart_resize` with the frame count), sides multiples of
  patch x merge (32): at least `min_pixels` (the processor's `size["shortest_edge"]`) and at most
  `total_pixels` (`size["longest_edge"]`), each frame's share capped as the processor's
  `cap_pixels_per_frame=True` does (the reference's rule, which it documents as its coming default) at
  min(`video_max_pixels`, `max_pixels`) (its `max_video_tokens` x 32 x 32), and at least 1.05 x `min_pixels`.
- Prompt: each temporal patch of a video is its own vision block, after its time as text,
  `<1.5 seconds><|vision_start|><|video_pad|>...<|vision_end|>`, the time being the mean of the times of
  the patch's first and last frame (from the frames' indices in the video and its frame rate).
- Pixels: (x / 255 - 0.5) / 0.5, patches of 16 x 16 x 2 frames.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from stjax.data.video import MediaConfig, MediaRules, VideoClip

MEAN = np.full(3, 0.5, np.float32)
STD = np.full(3, 0.5, np.float32)
FPS = 2.0
MIN_FRAMES, MAX_FRAMES = 4, 768
MIN_PIXELS, MAX_PIXELS = 128 * 32 * 32, 768 * 32 * 32  # the video processor's shortest_edge / longest_edge
FRAME_PIXELS = 768 * 32 * 32  # its max_video_tokens (768) x factor**2: a frame's most pixels


def media_config(**changes) -> MediaConfig:
    """Qwen3-VL's video processor defaults (16 x 16 patches merged 2 x 2, 2 frames a second), changed by
    `changes`."""
    return dataclasses.replace(
        MediaConfig(
            num_frames=None,
            patch_size=16,
            fps=FPS,
            min_frames=MIN_FRAMES,
            max_frames=MAX_FRAMES,
            min_pixels=MIN_PIXELS,
            max_pixels=FRAME_PIXELS,
            video_max_pixels=FRAME_PIXELS,
            total_pixels=MAX_PIXELS,
        ),
        **changes,
    )


def sample_indices(
    total_frames: int,
    video_fps: float,
    fps: float = FPS,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
    num_frames: int | None = None,
) -> np.ndarray:
    """Indices of the frames taken from a video of `total_frames` at `video_fps` (`num_frames` of them when
    given, else `fps` a second)."""
    count = num_frames
    if count is None:
        count = int(total_frames / video_fps * fps)
        count = min(max(count, min_frames), max_frames, total_frames)
    return np.linspace(0, total_frames - 1, count).round().astype(int)


def clip_pixels(num_frames: int, cfg: MediaConfig) -> int:
    """The most pixels of a clip of `num_frames` frames: each frame's share of `total_pixels`, capped at
    min(video_max_pixels, max_pixels) and at least 1.05 x min_pixels (the processor's `cap_pixels_per_frame`)."""
    frame_cap = min(cfg.video_max_pixels, cfg.max_pixels)
    return max(min(frame_cap, cfg.total_pixels // num_frames), int(cfg.min_pixels * 1.05)) * num_frames


def video_size(
    num_frames: int,
    height: int,
    width: int,
    factor: int = 32,
    temporal_factor: int = 2,
    min_pixels: int = MIN_PIXELS,
    max_pixels: float = MAX_PIXELS,
) -> tuple[int, int]:
    """The resized (height, width) of a clip's frames (transformers' Qwen3-VL `smart_resize`): the clip's
    pixels (frame count rounded to the temporal patch) within [min_pixels, max_pixels], sides multiples of
    `factor`, aspect kept."""
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


class Qwen3VLMedia(MediaRules):
    """Qwen3-VL's rules (the module docstring), named by the `qwen3_vl` model family."""

    mean, std = MEAN, STD

    def configure(self, media: MediaConfig, patch_size: int) -> MediaConfig:
        """The run's settings (frames, rate, per-frame cap, reader) over the video processor's pixel limits."""
        return dataclasses.replace(
            media, patch_size=patch_size, min_pixels=MIN_PIXELS, video_max_pixels=FRAME_PIXELS, total_pixels=MAX_PIXELS
        )

    def frame_plan(self, total_frames: int, video_fps: float, cfg: MediaConfig) -> tuple[np.ndarray, int]:
        indices = sample_indices(total_frames, video_fps, cfg.fps, cfg.min_frames, cfg.max_frames, cfg.num_frames)
        if len(indices) < cfg.temporal_patch_size:
            raise ValueError(f"{len(indices)} frame(s) sampled; at least {cfg.temporal_patch_size} are needed")
        return indices, len(indices)

    def video_size(self, height: int, width: int, frames: int, cfg: MediaConfig) -> tuple[int, int]:
        pixels = clip_pixels(frames, cfg)
        return video_size(frames, height, width, cfg.factor, cfg.temporal_patch_size, cfg.min_pixels, pixels)

    def video_text(self, clip: VideoClip, cfg: MediaConfig) -> str:
        seconds = timestamps(clip.frame_indices, clip.video_fps, cfg.temporal_patch_size)
        return video_text(seconds, "<|vision_start|>", "<|video_pad|>", "<|vision_end|>")

    def pad_grids(self, grid: np.ndarray) -> list[np.ndarray]:
        """One pad per temporal patch, each expanded by one frame's (1, h, w) grid."""
        t, h, w = (int(x) for x in grid)
        return [np.array([1, h, w])] * t

    def hf_video_processor(self, cfg: MediaConfig) -> dict:
        """transformers' `Qwen3VLVideoProcessor` fields that read video as these rules do: the clip's pixel
        bounds, each frame's share capped (`cap_pixels_per_frame`, `max_video_tokens`), `num_frames` frames when
        set, else `fps` a second (transformers takes one of the two: the other is written null)."""
        return {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "size": {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.total_pixels},
            "cap_pixels_per_frame": True,
            "max_video_tokens": min(cfg.max_pixels, cfg.video_max_pixels) / cfg.factor**2,
            "do_sample_frames": True,
            "num_frames": cfg.num_frames,
            "fps": None if cfg.num_frames is not None else cfg.fps,
            "min_frames": cfg.min_frames,
            "max_frames": cfg.max_frames,
        }
