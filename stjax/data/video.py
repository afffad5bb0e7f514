"""Video and image reading with the Qwen-VL sampling and resizing rules, plus the ST-R1 8-frame rule.

The numbers a model sees depend on four rules, all reproduced here so that our inputs match what the
PyTorch recipe feeds the checkpoint:

1. qwen-vl-utils picks `n` frames at `fps` (`sample_count`) spread evenly over the video
   (`round(linspace(0, total - 1, n))`).
2. The ST-R1 inference recipe then keeps exactly `num_frames` (8) of those: `int(linspace(0, n - 1, 8))`.
3. The per-frame pixel budget comes from `n` (the count *before* step 2), capped by the request's
   `max_pixels`, and `smart_resize` turns it into a size that is a multiple of 28 on each side.
4. Frames are resized bicubic with antialiasing (PIL BICUBIC on uint8 RGB).

Only the frames kept in step 2 are decoded, which gives the same pixels as decoding all `n` first.
Qwen2.5-VL's time positions also need the seconds per temporal patch: the recipe's value comes from
the rate of the `n` frames, not of the 8 kept (`MediaConfig.second_per_grid` chooses).

These are the rules of Qwen2-VL and Qwen2.5-VL (`MediaRules`); a family with its own (Qwen3-VL's,
`stjax.data.qwen3_vl`) subclasses `MediaRules`, and its model family names the subclass
(`stjax.models.families.Family.media_rules`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from PIL import Image

try:  # decord is the recipe's reader; it has no wheels for some platforms, so PyAV stands in.
    import decord
except ImportError:  # pragma: no cover - depends on the platform
    decord = None

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # transformers' OPENAI_CLIP_MEAN / _STD, Qwen-VL's normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_MEAN = np.array(CLIP_MEAN, np.float32)
IMAGE_STD = np.array(CLIP_STD, np.float32)

Backend = Literal["auto", "decord", "pyav"]
SecondPerGrid = Literal["seed", "kept_frames"]
SECOND_PER_GRID = get_args(SecondPerGrid)


class SampleError(Exception):
    """A sample that cannot be used: says which sample, which file, and why.

    Loaders catch it, skip the sample and count the reason; nothing else is caught.
    """

    def __init__(self, reason: str, *, sample_id: str | None = None, path: str | None = None):
        self.reason = reason
        self.sample_id = sample_id
        self.path = path
        where = []
        if sample_id is not None:
            where.append(f"sample {sample_id!r}")
        if path is not None:
            where.append(f"file {path}")
        super().__init__(f"{', '.join(where)}: {reason}" if where else reason)


@dataclass(frozen=True)
class MediaConfig:
    """Every knob of frame sampling and resizing. Defaults are the seed's inference recipe; a family's
    `MediaRules` reads them by its own rules (Qwen3-VL's: `stjax.data.qwen3_vl`)."""

    num_frames: int | None = 8  # ST-R1 keeps exactly this many of the sampled frames; None keeps all n
    fps: float = 1.0  # sampling rate asked of qwen-vl-utils
    min_frames: int = 4  # qwen-vl-utils FPS_MIN_FRAMES
    max_frames: int = 768  # qwen-vl-utils FPS_MAX_FRAMES
    min_pixels: int = 128 * 28 * 28  # VIDEO_MIN_PIXELS
    max_pixels: int = 360 * 420  # the request's per-frame cap
    video_max_pixels: int = 768 * 28 * 28  # VIDEO_MAX_PIXELS, the library's per-frame cap
    total_pixels: int = int(128000 * 28 * 28 * 0.9)  # VIDEO_TOTAL_PIXELS, shared by all n frames
    image_min_pixels: int = 4 * 28 * 28
    image_max_pixels: int = 16384 * 28 * 28
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    backend: Backend = "auto"  # "auto" uses decord when importable, else PyAV
    # Seconds per temporal patch, which spaces Qwen2.5-VL's time positions (see `second_per_grid_t`):
    # "seed" from the rate of the n sampled frames, as the recipe; "kept_frames" from the frames kept.
    second_per_grid: SecondPerGrid = "seed"

    def __post_init__(self):
        if self.second_per_grid not in SECOND_PER_GRID:
            raise ValueError(f"second_per_grid={self.second_per_grid!r} is not one of {', '.join(SECOND_PER_GRID)}")

    @property
    def factor(self) -> int:
        """Side lengths must be multiples of this (one merged token covers factor x factor pixels)."""
        return self.patch_size * self.merge_size


@dataclass(frozen=True)
class VideoClip:
    """Decoded, resized frames and the timing the model needs."""

    frames: np.ndarray  # (T, H, W, 3) uint8, H and W multiples of 28
    frame_indices: np.ndarray  # (T,) index of each kept frame in the source video
    total_frames: int
    video_fps: float
    sample_fps: float  # qwen-vl-utils' rate of the n sampled frames: n / total * video_fps
    second_per_grid_t: float  # seconds per temporal patch (Qwen2.5-VL time positions), see second_per_grid_t()


class MediaRules:
    """How a model family's processor samples, sizes, normalises and lays out video: Qwen2-VL's and
    Qwen2.5-VL's (qwen-vl-utils and the ST-R1 8-frame rule, above). A family with other rules subclasses
    this and its model family names the subclass (`stjax.models.families.Family.media_rules`)."""

    mean: np.ndarray = IMAGE_MEAN  # pixel normalisation, (x / 255 - mean) / std per channel
    std: np.ndarray = IMAGE_STD

    def configure(self, media: MediaConfig, patch_size: int) -> MediaConfig:
        """`media` for a model whose patches are `patch_size` wide (a family may set its own library limits)."""
        return dataclasses.replace(media, patch_size=patch_size)

    def frame_plan(self, total_frames: int, video_fps: float, cfg: MediaConfig) -> tuple[np.ndarray, int]:
        """Source indices of the frames to keep and the frame count the pixel budget is taken from."""
        return frame_plan(total_frames, video_fps, cfg)

    def video_size(self, height: int, width: int, frames: int, cfg: MediaConfig) -> tuple[int, int]:
        """Resized frame size for a clip whose budget is taken from `frames` frames (`frame_plan`'s count)."""
        return video_size(height, width, frames, cfg)

    def video_text(self, clip: VideoClip, cfg: MediaConfig) -> str | None:
        """The prompt text that replaces the chat template's `<|vision_start|><|video_pad|><|vision_end|>`
        of this clip (None: kept as it is, one vision block for the whole video)."""
        return None

    def pad_grids(self, grid: np.ndarray) -> list[np.ndarray]:
        """The (t, h, w) grid each `<|video_pad|>` of a clip with patch grid `grid` expands to, in order."""
        return [grid]

    def hf_video_processor(self, cfg: MediaConfig) -> dict:
        """The fields of transformers' video processor (an export's `video_preprocessor_config.json`) that read
        video as these rules do. Qwen2-VL's bounds each frame's pixels (stjax's bound for a short clip: the
        smaller of the request's and the library's cap) and keeps the frames it is given."""
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": cfg.min_pixels, "longest_edge": min(cfg.max_pixels, cfg.video_max_pixels)},
        }


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen-VL's target size: sides multiples of `factor`, area in [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio over 200: {height}x{width}")
    h = max(factor, round(height / factor) * factor)  # Python round: half to even, as upstream
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def sample_count(total_frames: int, video_fps: float, cfg: MediaConfig) -> int:
    """qwen-vl-utils' frame count `n` at `cfg.fps`: clamped to [min, max] and to the video, floored to even."""
    frame_factor = cfg.temporal_patch_size
    min_frames = math.ceil(cfg.min_frames / frame_factor) * frame_factor
    max_frames = math.floor(min(cfg.max_frames, total_frames) / frame_factor) * frame_factor
    n = total_frames / video_fps * cfg.fps
    n = min(max(n, min_frames), max_frames, total_frames)
    n = math.floor(n / frame_factor) * frame_factor
    if not frame_factor <= n <= total_frames:
        raise ValueError(f"video has {total_frames} frame(s); at least {frame_factor} are needed")
    return n


def frame_plan(total_frames: int, video_fps: float, cfg: MediaConfig) -> tuple[np.ndarray, int]:
    """Source indices of the frames to keep, and `n`, the count qwen-vl-utils would decode.

    When n < num_frames the 8-frame rule repeats frames, as the recipe does.
    """
    n = sample_count(total_frames, video_fps, cfg)
    sampled = np.round(np.linspace(0, total_frames - 1, n)).astype(np.int64)  # np.round: half to even
    if cfg.num_frames is None:
        return sampled, n
    keep = np.linspace(0, n - 1, cfg.num_frames).astype(np.int64)  # truncation, as in the recipe
    return sampled[keep], n


def video_size(height: int, width: int, n: int, cfg: MediaConfig) -> tuple[int, int]:
    """Resized frame size: the qwen-vl-utils budget for n frames, capped by the request's max_pixels."""
    budget = max(min(cfg.video_max_pixels, cfg.total_pixels / n * cfg.temporal_patch_size), int(cfg.min_pixels * 1.05))
    budget = min(cfg.max_pixels, budget)
    return smart_resize(height, width, cfg.factor, cfg.min_pixels, budget)


def second_per_grid_t(kept: int, sampled: int, total_frames: int, video_fps: float, cfg: MediaConfig) -> float:
    """Seconds per temporal patch; Qwen2.5-VL's time position of grid t is floor(t * tokens_per_second * this).

    temporal_patch_size / a frame rate: "seed", the rate of the `sampled` frames qwen-vl-utils took,
    which is what the recipe's processor is told even after the 8-frame rule kept fewer;
    "kept_frames", the rate of the `kept` frames over the video (transformers' `VideoMetadata.sampled_fps`),
    so positions follow the frames' real times.
    """
    frames = kept if cfg.second_per_grid == "kept_frames" else sampled
    return cfg.temporal_patch_size * total_frames / (frames * video_fps)


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic, antialiased resize of (T, H, W, 3) uint8 frames (PIL keeps the result in uint8)."""
    if frames.shape[1:3] == (height, width):
        return frames
    out = np.empty((len(frames), height, width, 3), np.uint8)
    for i, frame in enumerate(frames):
        out[i] = np.asarray(Image.fromarray(frame).resize((width, height), Image.Resampling.BICUBIC))
    return out


def _pick_backend(backend: Backend) -> str:
    if backend == "auto":
        return "decord" if decord is not None else "pyav"
    if backend == "decord" and decord is None:
        raise ImportError("decord is not installed; use backend='pyav'")
    return backend


class _Reader:
    """One opened video: frame count, rate and random access to frames, for either backend."""

    def __init__(self, path: str, backend: str):
        self.path = path
        self.backend = backend
        if backend == "decord":
            self._vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
            self.total_frames = len(self._vr)
            self.video_fps = float(self._vr.get_avg_fps())
        else:
            import av

            with av.open(path) as container:
                stream = container.streams.video[0]
                rate = stream.average_rate or stream.guessed_rate
                self.video_fps = float(rate) if rate else 0.0
                # Some containers do not store a frame count; counting packets needs no decoding.
                self.total_frames = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if self.total_frames <= 0 or self.video_fps <= 0:
            raise ValueError(f"no frames or no frame rate (frames={self.total_frames}, fps={self.video_fps})")

    def get(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), H, W, 3) uint8 RGB frames; indices may repeat."""
        if self.backend == "decord":
            return self._vr.get_batch(indices.tolist()).asnumpy()
        import av

        wanted = set(indices.tolist())
        last = int(indices.max())
        found: dict[int, np.ndarray] = {}
        with av.open(self.path) as container:
            container.streams.video[0].thread_count = 1
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    found[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
        missing = wanted - found.keys()
        if missing:
            raise ValueError(
                f"the header announces {self.total_frames} frames but frame {min(missing)} could not be decoded"
            )
        return np.stack([found[i] for i in indices.tolist()])


def read_video(
    path: str, cfg: MediaConfig = MediaConfig(), sample_id: str | None = None, rules: MediaRules | None = None
) -> VideoClip:
    """Decode, sample and resize one video by a family's `rules` (default Qwen2-VL's). Any failure becomes a
    SampleError naming the file."""
    rules = rules or MediaRules()
    if not os.path.isfile(path):
        raise SampleError("video file not found", sample_id=sample_id, path=path)
    if os.path.getsize(path) == 0:
        raise SampleError("video file is empty (0 bytes)", sample_id=sample_id, path=path)
    backend = _pick_backend(cfg.backend)
    try:
        reader = _Reader(path, backend)
    except Exception as e:  # decoders raise many types (RuntimeError, DECORDError, av.error.*)
        raise SampleError(f"cannot open video ({backend}): {e}", sample_id=sample_id, path=path) from e
    try:
        indices, n = rules.frame_plan(reader.total_frames, reader.video_fps, cfg)
    except ValueError as e:
        raise SampleError(f"too few frames: {e}", sample_id=sample_id, path=path) from e
    try:
        frames = reader.get(indices)
    except Exception as e:
        raise SampleError(f"cannot decode frames ({backend}, truncated?): {e}", sample_id=sample_id, path=path) from e
    try:
        height, width = rules.video_size(frames.shape[1], frames.shape[2], n, cfg)
        frames = resize_frames(frames, height, width)
    except Exception as e:  # an aspect ratio over 200, ...
        raise SampleError(f"cannot resize frames: {e}", sample_id=sample_id, path=path) from e
    sample_fps = n / reader.total_frames * reader.video_fps
    return VideoClip(
        frames=frames,
        frame_indices=indices,
        total_frames=reader.total_frames,
        video_fps=reader.video_fps,
        sample_fps=sample_fps,
        second_per_grid_t=second_per_grid_t(len(indices), n, reader.total_frames, reader.video_fps, cfg),
    )


def read_image(path: str, cfg: MediaConfig = MediaConfig(), sample_id: str | None = None) -> np.ndarray:
    """Load an image as (H, W, 3) uint8 RGB resized by smart_resize within the image pixel limits."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            height, width = smart_resize(im.height, im.width, cfg.factor, cfg.image_min_pixels, cfg.image_max_pixels)
            return np.asarray(im.resize((width, height), Image.Resampling.BICUBIC))
    except FileNotFoundError as e:
        raise SampleError("image file not found", sample_id=sample_id, path=path) from e
    except Exception as e:
        raise SampleError(f"cannot read image: {e}", sample_id=sample_id, path=path) from e
