"""Video sampling, sizing and resizing against an independent transcription of the rules.

The reference below is written from the rules in shared/notes (qwen-vl-utils + the ST-R1 8-frame
change) without using stjax.data.video, so a shared mistake would need to be made twice.
"""

from __future__ import annotations

import math
from fractions import Fraction

import av
import numpy as np
import pytest
from transformers.video_utils import VideoMetadata

from stjax.data.video import MediaConfig, SampleError, read_image, read_video

BACKENDS = ["decord", "pyav"]


# ----------------------------------------------------------------------------- reference rules


def ref_nframes(total: int, video_fps: float, fps: float, min_frames=4, max_frames=768) -> int:
    lo = -(-min_frames // 2) * 2  # ceil to even
    hi = (min(max_frames, total) // 2) * 2  # floor to even
    n = total / video_fps * fps
    n = min(max(n, lo), hi, total)
    return int(n // 2) * 2


def ref_indices(total: int, video_fps: float, fps: float, keep: int | None) -> tuple[list[int], int]:
    n = ref_nframes(total, video_fps, fps)
    decoded = [int(np.round(i * (total - 1) / (n - 1))) if n > 1 else 0 for i in range(n)]
    if keep is None:
        return decoded, n
    return [decoded[int(j * (n - 1) / (keep - 1))] for j in range(keep)], n


def ref_smart_resize(h: int, w: int, min_px: float, max_px: float, f: int = 28) -> tuple[int, int]:
    hb, wb = max(f, round(h / f) * f), max(f, round(w / f) * f)
    if hb * wb > max_px:
        b = math.sqrt(h * w / max_px)
        hb, wb = max(f, math.floor(h / b / f) * f), max(f, math.floor(w / b / f) * f)
    elif hb * wb < min_px:
        b = math.sqrt(min_px / (h * w))
        hb, wb = math.ceil(h * b / f) * f, math.ceil(w * b / f) * f
    return hb, wb


def ref_size(h: int, w: int, n: int, request_max: int, total_pixels: float) -> tuple[int, int]:
    vmin, vmax = 128 * 28 * 28, 768 * 28 * 28
    budget = max(min(vmax, total_pixels / n * 2), int(vmin * 1.05))
    return ref_smart_resize(h, w, vmin, min(request_max, budget))


def keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1, (a + 2) * x**3 - (a + 3) * x**2 + 1, np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0)
    )


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: Keys cubic stretched by the scale when shrinking (antialias), window
    clipped at the borders and renormalised, as PIL does."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * scale
        j = np.arange(n_in)
        wgt = keys_cubic((j + 0.5 - centre) / stretch)
        wgt[np.abs(j + 0.5 - centre) >= 2 * stretch] = 0
        m[i] = wgt / wgt.sum()
    return m


def ref_resize(frame: np.ndarray, h: int, w: int) -> np.ndarray:
    """float64 separable bicubic-antialias resize of (H, W, 3), clipped to [0, 255] like PIL's output."""
    x = frame.astype(np.float64)
    x = np.tensordot(resize_matrix(frame.shape[0], h), x, axes=(1, 0))  # rows
    x = np.tensordot(resize_matrix(frame.shape[1], w), x, axes=(1, 1)).transpose(1, 0, 2)  # columns
    return np.clip(x, 0, 255)


# ----------------------------------------------------------------------------- test videos


def pattern(i: int, h: int, w: int) -> np.ndarray:
    """Frame-dependent RGB: smooth waves plus a moving hard-edged box. Levels stay in [28, 228] so the
    bicubic overshoot at the box edges is never clipped (PIL clips between its two passes)."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = 128 + 100 * np.sin(xx / 9 + i / 3)
    g = 128 + 100 * np.cos(yy / 7 - i / 5)
    box = (np.abs(xx - (w // 3 + 2 * i) % w) < w // 6) & (np.abs(yy - h // 2) < h // 5)
    b = np.where(box, 215, 40)
    return np.stack([r, g, b], -1).astype(np.uint8)


def write_video(path, total: int, fps, w: int, h: int, faststart: bool = False) -> str:
    with av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {}) as c:
        s = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        s.options = {"crf": "12", "preset": "ultrafast", "threads": "1"}
        for i in range(total):
            c.mux(s.encode(av.VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24")))
        c.mux(s.encode())
    return str(path)


def decode_all(path: str) -> np.ndarray:
    with av.open(path) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


# (frames, fps, width, height, config): lengths, rates, sizes and aspect ratios, short videos
TABLE = [
    (30, 10, 224, 160, MediaConfig()),  # 3 s -> n = 4 (the minimum) -> 8 frames repeat
    (100, 5, 160, 96, MediaConfig()),  # 20 s -> n = 20; small -> scaled up to min_pixels
    (25, 2.5, 96, 96, MediaConfig()),  # fractional fps, 10 s -> n = 10
    (3, 1, 64, 64, MediaConfig()),  # 3 frames -> n = 2 -> 8 frames from 2
    (10, 0.5, 120, 80, MediaConfig()),  # asks for more frames than exist -> n = total
    (48, 24, 640, 360, MediaConfig()),  # 16:9, downscaled by the 360*420 cap
    (24, 12, 90, 300, MediaConfig()),  # portrait
    (40, 8, 448, 56, MediaConfig()),  # 8:1 strip
    (60, 6, 200, 120, MediaConfig(fps=2.0, num_frames=None)),  # plain qwen-vl-utils, no 8-frame rule
    (
        60,
        6,
        320,
        240,
        MediaConfig(fps=2.0, max_pixels=10**7, total_pixels=20 * 28 * 28 * 20),
    ),  # tiny total budget: the 1.05*min floor binds
    (100, 10, 64, 48, MediaConfig()),  # 10 s -> n = 10 -> 8 kept unevenly (0, 11, 22, 33, 55, 66, 77, 99)
]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return [write_video(d / f"v{i}.mp4", n, fps, w, h) for i, (n, fps, w, h, _) in enumerate(TABLE)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_sizes_grid_match_reference(videos, backend):
    from stjax.data.processor import vision_patches

    for path, (total, fps, w, h, cfg) in zip(videos, TABLE):
        cfg = MediaConfig(**{**vars(cfg), "backend": backend})
        clip = read_video(path, cfg)
        want_idx, n = ref_indices(total, fps, cfg.fps, cfg.num_frames)
        want_h, want_w = ref_size(h, w, n, cfg.max_pixels, cfg.total_pixels)
        assert clip.frame_indices.tolist() == want_idx, (path, total, fps)
        assert clip.frames.shape == (len(want_idx), want_h, want_w, 3), (path, w, h)
        assert clip.sample_fps == pytest.approx(n / total * fps)
        assert clip.second_per_grid_t == pytest.approx(2 / (n / total * fps))
        _, grid = vision_patches(clip.frames, cfg)
        assert grid.tolist() == [math.ceil(len(want_idx) / 2), want_h // 14, want_w // 14]


@pytest.mark.parametrize("rule", ["seed", "kept_frames"])
def test_second_per_grid_t_follows_the_chosen_rule(videos, rule):
    """seed: 2 / the rate of the n sampled frames; kept_frames: 2 / transformers' `VideoMetadata.sampled_fps`
    of the kept frames."""
    for path, (total, fps, _, _, cfg) in zip(videos, TABLE):
        clip = read_video(path, MediaConfig(**{**vars(cfg), "second_per_grid": rule}))
        kept, n = ref_indices(total, fps, cfg.fps, cfg.num_frames)
        kept_fps = VideoMetadata(total_num_frames=total, fps=fps, frames_indices=kept).sampled_fps
        want = 2 / (n / total * fps) if rule == "seed" else 2 / kept_fps
        assert clip.second_per_grid_t == pytest.approx(want, rel=1e-9), (path, total, fps)
    # 100 frames at 10 fps, fps=1: n = 10 sampled at 0, 11, ..., 99 (1 per second), 8 of them kept
    # over the same 10 s: 0.8 frames per second, 2.5 s per temporal patch (by hand).
    (path,) = [p for p, (total, fps, *_) in zip(videos, TABLE) if (total, fps) == (100, 10)]
    want = {"seed": 2.0, "kept_frames": 2.5}[rule]
    assert read_video(path, MediaConfig(second_per_grid=rule)).second_per_grid_t == pytest.approx(want)


def test_second_per_grid_rejects_unknown_rules():
    with pytest.raises(ValueError, match="second_per_grid='frames' is not one of seed, kept_frames"):
        MediaConfig(second_per_grid="frames")


def test_pixels_match_float64_bicubic_reference(videos):
    """Decoded + resized frames within 2/255 of the float64 reference applied to PyAV's decode of the
    same frames (PIL rounds to uint8 between its two passes, hence not exact)."""
    for k in (0, 1, 5, 6):
        path, cfg = videos[k], TABLE[k][-1]
        clip = read_video(path, cfg)
        source = decode_all(path)
        for frame, idx in list(zip(clip.frames, clip.frame_indices))[::3]:
            ref = ref_resize(source[idx], *frame.shape[:2])
            assert np.abs(frame / 255 - ref / 255).max() <= 2 / 255, (path, idx)


def test_backends_agree(videos):
    """decord and PyAV give the same frames (same FFmpeg decode and RGB conversion here)."""
    for path, (*_, cfg) in zip(videos[:3], TABLE[:3]):
        a = read_video(path, MediaConfig(**{**vars(cfg), "backend": "decord"}))
        b = read_video(path, MediaConfig(**{**vars(cfg), "backend": "pyav"}))
        assert np.abs(a.frames.astype(int) - b.frames.astype(int)).max() <= 2


def test_image_smart_resize_and_pixels(tmp_path):
    from PIL import Image

    img = pattern(0, 50, 300)
    Image.fromarray(img).save(tmp_path / "a.png")
    cfg = MediaConfig()
    out = read_image(str(tmp_path / "a.png"), cfg)
    h, w = ref_smart_resize(50, 300, cfg.image_min_pixels, cfg.image_max_pixels)
    assert out.shape == (h, w, 3) and (h, w) == (56, 308)
    assert np.abs(out / 255 - ref_resize(img, h, w) / 255).max() <= 2 / 255


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_videos_raise_sample_error_naming_the_file(tmp_path, backend):
    cfg = MediaConfig(backend=backend)
    good = write_video(tmp_path / "good.mp4", 30, 10, 64, 64)
    fast = write_video(tmp_path / "fast.mp4", 30, 10, 64, 64, faststart=True)
    data, fast_data = open(good, "rb").read(), open(fast, "rb").read()
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])  # index (moov) at the end: lost
    (tmp_path / "cut_fast.mp4").write_bytes(fast_data[: len(fast_data) // 2])  # index kept, frames lost
    one = write_video(tmp_path / "one.mp4", 1, 10, 64, 64)
    cases = {
        str(tmp_path / "missing.mp4"): ("not found",),
        str(tmp_path / "empty.mp4"): ("empty",),
        str(tmp_path / "cut.mp4"): ("cannot open",),
        # decord reads ahead when opening; PyAV notices when it reaches the missing frames
        str(tmp_path / "cut_fast.mp4"): ("cannot open", "cannot decode frames"),
        one: ("too few frames",),
    }
    for path, reason in cases.items():
        with pytest.raises(SampleError) as err:
            read_video(path, cfg, sample_id="s1")
        assert path in str(err.value) and "s1" in str(err.value), err.value
        assert any(r in err.value.reason for r in reason), err.value
