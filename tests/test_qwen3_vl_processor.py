"""Qwen3-VL inputs against transformers' own rules: its video processor's frame sampling and pixel budget,
its processor's timestamped prompt, patch order and normalisation, and its model's `get_rope_index`, on many
cases (frame counts odd, 1 and not a multiple of the temporal patch; sizes tiny, huge, tall, wide; video rates
unlike the sampling rate; several videos and images in one prompt; left-padded batches).

transformers' video processor needs torchvision (not installed), so its resizing step is replaced by frames
given at their final size; everything after it (timestamps, pads, patches, normalisation) is transformers'.
The size its resize picks is read where it calls torchvision's resize (`resize_target`).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.image_utils import SizeDict
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from stjax.data import qwen3_vl
from stjax.data.processor import Processor
from stjax.data.tokenizer import build_tokenizer
from stjax.data.video import MediaConfig, VideoClip, read_image, read_video


class FramesAsGiven(Qwen3VLVideoProcessor):
    """transformers' Qwen3-VL video processor after its resize: its normalisation and its patchify."""

    def __call__(self, videos, video_metadata=None, **kwargs):
        pixels, grids = [], []
        for video in videos:
            x = torch.from_numpy(np.asarray(video)).permute(0, 3, 1, 2)[None].float() / 255
            x = (x - 0.5) / 0.5
            patches, t, h, w = self.patchify(x, patch_size=16, merge_size=2, temporal_patch_size=2)
            pixels.append(patches[0])
            grids.append([t, h, w])
        return BatchFeature(
            {
                "pixel_values_videos": torch.cat(pixels).numpy(),
                "video_grid_thw": np.asarray(grids),
                "video_metadata": video_metadata,
            }
        )


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    texts = ["Which way did you turn? A. left B. right", "seconds red cube blue sphere 0.5 1.0 12.5"] * 20
    path = build_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)
    ours = Processor.from_pretrained(path, media=qwen3_vl.media_config(), model_type="qwen3_vl")
    # the class check looks the video processor up in a registry that needs torchvision
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *args: None):
        theirs = Qwen3VLProcessor(
            image_processor=Qwen2VLImageProcessorPil(
                patch_size=16, merge_size=2, image_mean=(0.5,) * 3, image_std=(0.5,) * 3
            ),
            tokenizer=ours.tokenizer,
            video_processor=FramesAsGiven(),
        )
    return ours, theirs


MEDIA = qwen3_vl.Qwen3VLMedia()


def sampled(total: int, video_fps: float, fps: float, num_frames: int | None) -> np.ndarray:
    """transformers' frame indices for a video of `total` frames at `video_fps` (fps and num_frames exclude
    each other there)."""
    metadata = VideoMetadata(total_num_frames=total, fps=video_fps)
    if num_frames is None:
        return Qwen3VLVideoProcessor().sample_frames(metadata, fps=fps)
    return Qwen3VLVideoProcessor().sample_frames(metadata, num_frames=num_frames)


def resize_target(frames: int, height: int, width: int, cfg: MediaConfig) -> tuple[int, int]:
    """The (height, width) transformers' Qwen3-VL video processor resizes a clip to under cfg's limits (its
    `size`, and its per-frame cap from `max_video_tokens`), read where its resize calls torchvision's."""
    videos = torch.zeros(()).expand(1, frames, 3, height, width)  # a shape, no pixels
    stop = lambda self, image, size, resample: (size.height, size.width)
    with mock.patch.object(BaseVideoProcessor, "resize", stop):
        return Qwen3VLVideoProcessor().resize(
            videos,
            size=SizeDict(shortest_edge=cfg.min_pixels, longest_edge=cfg.total_pixels),
            resample=None,
            factor=32,
            temporal_factor=2,
            cap_pixels_per_frame=True,
            max_video_tokens=min(cfg.video_max_pixels, cfg.max_pixels) / 32**2,
        )


# (frames in the video, its frame rate, the sampling rate, num_frames)
SAMPLING = [
    (10, 4.0, 2.0, None),
    (97, 30.0, 2.0, None),
    (300, 24.0, 2.0, None),
    (3, 1.0, 2.0, None),  # fewer frames than min_frames
    (4000, 25.0, 2.0, None),
    (2, 30.0, 2.0, None),
    (1, 30.0, 2.0, None),  # one frame: refused, as transformers' resize refuses it
    (7, 29.97, 2.0, None),
    (250, 23.976, 1.0, None),
    (90, 30.0, 0.5, None),
    (601, 60.0, 3.7, None),
    (12, 2.0, 10.0, None),  # a sampling rate above the video's
    (50000, 30.0, 2.0, None),  # more than max_frames
    (100, 10.0, 2.0, 8),  # num_frames, as the ST-R1 recipe sets it
    (5, 30.0, 2.0, 8),  # more frames asked than there are
    (1000, 25.0, 2.0, 7),
    (30, 30.0, 2.0, 1),
    (64, 8.0, 2.0, 64),
]


@pytest.mark.parametrize("total,video_fps,fps,num_frames", SAMPLING)
def test_frame_sampling_is_the_video_processors(total, video_fps, fps, num_frames):
    expected = sampled(total, video_fps, fps, num_frames)
    cfg = qwen3_vl.media_config(fps=fps, num_frames=num_frames)
    if len(expected) < 2:
        with pytest.raises(ValueError):
            smart_resize(len(expected), 64, 64, factor=32)
        with pytest.raises(ValueError, match="at least 2 are needed"):
            MEDIA.frame_plan(total, video_fps, cfg)
        return
    indices, count = MEDIA.frame_plan(total, video_fps, cfg)
    np.testing.assert_array_equal(indices, expected)
    assert count == len(expected)


@pytest.mark.parametrize("t,h,w", [(4, 480, 640), (16, 1080, 1920), (2, 20, 300), (768, 720, 1280), (5, 33, 31)])
def test_pixel_budget_is_the_video_processors(t, h, w):
    expected = smart_resize(
        t, h, w, temporal_factor=2, factor=32, min_pixels=qwen3_vl.MIN_PIXELS, max_pixels=qwen3_vl.MAX_PIXELS
    )
    assert qwen3_vl.video_size(t, h, w) == expected


HUB_LIMITS = {"min_pixels": 4096, "total_pixels": 25165824}  # other limits a checkpoint's config may set
# (frames, height, width, changes to the defaults)
SIZES = [
    (4, 480, 640, {}),
    (16, 1080, 1920, {}),
    (2, 20, 300, {}),  # a side below the factor
    (3, 10, 10, {}),  # tiny: scaled up to min_pixels
    (768, 720, 1280, {}),
    (5, 33, 31, {}),  # sides just off multiples of 32
    (7, 250, 333, {}),  # an odd frame count, not a multiple of the temporal patch
    (8, 4000, 3000, {}),  # huge
    (8, 2000, 100, {}),  # tall
    (8, 100, 2000, {}),  # wide
    (6, 35, 6000, {}),  # near the 200:1 limit
    (8, 360, 640, {"max_pixels": 360 * 420}),  # the ST-R1 recipe's per-frame cap
    (9, 1080, 1920, {"max_pixels": 32 * 32 * 16}),
    (2, 1080, 1920, {"max_pixels": 10**8}),  # a cap above the library's
    (64, 240, 320, {}),
    (8, 1080, 1920, HUB_LIMITS),
    (3, 101, 77, HUB_LIMITS),
    (200, 720, 1280, HUB_LIMITS),
]


@pytest.mark.parametrize("frames,height,width,changes", SIZES)
def test_frame_size_is_the_video_processors_resize(frames, height, width, changes):
    cfg = qwen3_vl.media_config(**changes)
    assert MEDIA.video_size(height, width, frames, cfg) == resize_target(frames, height, width, cfg)


def test_the_limits_are_the_video_processors_defaults():
    """Qwen3-VL's media settings are its video processor's defaults (with its per-frame cap on); a run's
    processor takes the pixel limits from them and keeps the run's own frames, rate and per-frame cap."""
    theirs = Qwen3VLVideoProcessor()
    run = MediaConfig(num_frames=8, fps=1.0, max_pixels=360 * 420)
    for cfg in (qwen3_vl.media_config(), MEDIA.configure(run, 16)):
        assert {"shortest_edge": cfg.min_pixels, "longest_edge": cfg.total_pixels} == dict(theirs.size)
        assert cfg.video_max_pixels == theirs.max_video_tokens * cfg.factor**2
        assert (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size) == (16, 2, 2)
        assert (cfg.min_frames, cfg.max_frames) == (theirs.min_frames, theirs.max_frames)
    defaults = qwen3_vl.media_config()
    assert (defaults.fps, defaults.num_frames) == (theirs.fps, theirs.num_frames)
    configured = MEDIA.configure(run, 16)
    assert (configured.num_frames, configured.fps, configured.max_pixels) == (8, 1.0, 360 * 420)


def test_a_clip_shorter_than_a_temporal_patch_is_refused_as_transformers_refuses_it():
    with pytest.raises(ValueError, match="must be larger than temporal_factor"):
        resize_target(1, 64, 64, qwen3_vl.media_config())
    with pytest.raises(ValueError, match="at least 2 are needed"):
        MEDIA.video_size(64, 64, 1, qwen3_vl.media_config())


# (frame indices, the video's frame rate): rates unlike the sampling rate, odd counts, one frame, late frames
STAMPS = [
    ([0, 1, 2, 3], 2.0),
    ([3, 10, 17, 24, 31], 30.0),
    (list(range(0, 97, 12)), 24.0),
    ([0], 30.0),
    ([0, 15], 29.97),
    (np.linspace(0, 3999, 7).round().astype(int).tolist(), 25.0),
    ([5, 5, 6], 23.976),
    ([0, 44, 89, 133, 178, 222, 267], 44.1),
    ([100000, 100030, 100061], 7.0),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 0.75),
]


@pytest.mark.parametrize("indices,fps", STAMPS)
def test_timestamps_text_is_the_processors(processors, indices, fps):
    ours, theirs = processors
    clip = VideoClip(
        frames=np.zeros((len(indices), 64, 96, 3), np.uint8),
        frame_indices=np.asarray(indices),
        total_frames=int(max(indices)) + 1,
        video_fps=fps,
        sample_fps=fps / 3,  # not the rate timestamps are read at
        second_per_grid_t=1.0,
    )
    metadata = VideoMetadata(total_num_frames=clip.total_frames, fps=fps, frames_indices=list(indices))
    grid = np.array([[(len(indices) + 1) // 2, 4, 6]])
    want = theirs.replace_video_token({"video_grid_thw": grid, "video_metadata": [metadata]}, 0)
    got = ours.rules.video_text(clip, ours.media).replace("<|video_pad|>", "<|video_pad|>" * 6)
    assert got == want


def make_clip(spec: tuple, rng: np.random.Generator) -> VideoClip:
    """A clip of `frames` random frames at (height, width): source frames first, first + step, ... of a
    video at `fps`."""
    frames, height, width, fps, first, step = spec
    indices = first + step * np.arange(frames)
    return VideoClip(
        frames=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        frame_indices=indices,
        total_frames=int(indices[-1]) + 1,
        video_fps=fps,
        sample_fps=fps / step,
        second_per_grid_t=1.0,
    )


def hf_encode(processors, clips: list[VideoClip], images: list[np.ndarray], text: str) -> dict:
    """transformers' Qwen3-VL processor on the same content (videos, then images, then the text)."""
    ours, theirs = processors
    content = [{"type": "video"} for _ in clips] + [{"type": "image"} for _ in images]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    prompt = ours.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = [
        VideoMetadata(total_num_frames=c.total_frames, fps=c.video_fps, frames_indices=c.frame_indices.tolist())
        for c in clips
    ]
    media = {"videos": [c.frames for c in clips], "video_metadata": metadata} if clips else {}
    return theirs(text=[prompt], images=images or None, **media, return_tensors="np")


def hf_positions(hf_dirs, want: dict, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' `Qwen3VLModel.get_rope_index` on its processor's arrays."""
    grid = lambda k: torch.from_numpy(want[k]) if k in want else None
    positions, deltas = hf_dirs("qwen3_vl")[1].model.get_rope_index(
        torch.from_numpy(want["input_ids"]),
        torch.from_numpy(want["mm_token_type_ids"]),
        image_grid_thw=grid("image_grid_thw"),
        video_grid_thw=grid("video_grid_thw"),
        attention_mask=None if attention_mask is None else torch.from_numpy(attention_mask),
    )
    return positions.numpy(), deltas.numpy()[:, 0]


# (frames, height, width, video fps, first frame index, step): frame counts even, odd and 1, several sizes
VIDEOS = [
    (4, 64, 96, 2.0, 0, 1),
    (5, 96, 64, 30.0, 3, 7),
    (9, 128, 160, 24.0, 0, 12),
    (16, 64, 64, 4.0, 10, 2),
    (1, 64, 64, 30.0, 0, 1),
    (2, 32, 32, 29.97, 7, 15),
    (3, 32, 320, 23.976, 0, 11),
    (7, 320, 32, 60.0, 2, 30),
]


@pytest.mark.parametrize("video", VIDEOS, ids=[f"{v[0]}x{v[1]}x{v[2]}@{v[3]}" for v in VIDEOS])
def test_encode_equals_transformers_processor_and_get_rope_index(processors, hf_dirs, video):
    ours, _ = processors
    clip = make_clip(video, np.random.default_rng(video[0]))
    got = ours.encode("Which way did you turn?", videos=[clip])
    want = hf_encode(processors, [clip], [], "Which way did you turn?")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
    np.testing.assert_array_equal(got["mm_token_type_ids"], want["mm_token_type_ids"][0])
    np.testing.assert_array_equal(got["video_grid_thw"], want["video_grid_thw"])
    np.testing.assert_allclose(got["pixel_values_videos"], want["pixel_values_videos"], rtol=0, atol=1e-6)
    assert "seconds>" in ours.tokenizer.decode(got["input_ids"])
    positions, _ = hf_positions(hf_dirs, want)
    np.testing.assert_array_equal(got["position_ids"], positions[:, 0])


# prompts of several videos and images: (videos as in VIDEOS, images as (height, width))
MIXED = {
    "two_videos": ([(4, 64, 96, 2.0, 0, 1), (3, 32, 64, 30.0, 5, 15)], []),
    "video_and_image": ([(5, 64, 64, 24.0, 0, 12)], [(64, 96)]),
    "images_only": ([], [(64, 64), (96, 128)]),
    "three_videos_two_images": (
        [(2, 64, 64, 10.0, 0, 5), (1, 32, 96, 25.0, 40, 1), (6, 96, 32, 3.0, 1, 2)],
        [(64, 128), (160, 64)],
    ),
}


def encode_mixed(processors, name: str) -> tuple[dict, dict]:
    """Our arrays and transformers' for the prompt MIXED[name]."""
    ours, _ = processors
    rng = np.random.default_rng(len(name))
    videos, sizes = MIXED[name]
    clips = [make_clip(v, rng) for v in videos]
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    text = f"What happens in {name}?"
    return ours.encode(text, videos=clips, images=images), hf_encode(processors, clips, images, text)


@pytest.mark.parametrize("name", MIXED)
def test_mixed_prompts_equal_transformers_processor_and_get_rope_index(processors, hf_dirs, name):
    got, want = encode_mixed(processors, name)
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
    np.testing.assert_array_equal(got["mm_token_type_ids"], want["mm_token_type_ids"][0])
    for key in ("pixel_values", "pixel_values_videos"):
        if key in want:  # float32 patches: the same normalisation, to 1e-6
            np.testing.assert_allclose(got[key], want[key], rtol=0, atol=1e-6)
        else:
            assert got[key].shape[0] == 0
    for key in ("image_grid_thw", "video_grid_thw"):
        np.testing.assert_array_equal(got[key], want.get(key, np.zeros((0, 3))))
    positions, _ = hf_positions(hf_dirs, want)
    np.testing.assert_array_equal(got["position_ids"], positions[:, 0])


def test_left_padded_batch_positions_equal_get_rope_index(processors, hf_dirs):
    """A left-padded batch of mixed rows and a text-only row: the family's positions and rope deltas are
    transformers' (padding positions are 0 in both)."""
    ours, _ = processors
    rows = [encode_mixed(processors, name)[0] for name in MIXED]
    rows.append(ours.encode("Only text here."))
    length = max(len(r["input_ids"]) + 3 for r in rows)  # every row padded, the longest by 3
    batch = {key: np.zeros((len(rows), length), np.int64) for key in ("input_ids", "mm_token_type_ids")}
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        batch["input_ids"][b, length - n :] = r["input_ids"]
        batch["mm_token_type_ids"][b, length - n :] = r["mm_token_type_ids"]
        mask[b, length - n :] = 1
    for key in ("image_grid_thw", "video_grid_thw"):
        batch[key] = np.concatenate([r[key] for r in rows])
    got, got_deltas = ours.family.rope_index(
        batch["input_ids"], ours.rope_spec, batch["image_grid_thw"], batch["video_grid_thw"], None, mask
    )
    want, want_deltas = hf_positions(hf_dirs, batch, mask)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_deltas, want_deltas)
    for b, r in enumerate(rows):  # each row's own positions, right-aligned
        np.testing.assert_array_equal(got[:, b, length - len(r["input_ids"]) :], r["position_ids"])


# (frames in the file, its frame rate, width, height, the run's settings)
RUNS = [
    (40, 10, 100, 70, {"num_frames": None, "fps": 2.0}),  # a video rate unlike the sampling rate
    (25, 5, 64, 48, {"num_frames": 5}),  # the run's num_frames: 5 frames spread over the video
    (9, 3, 200, 120, {"num_frames": None, "fps": 1.0, "max_pixels": 32 * 32 * 8}),  # fewer than min_frames
    (31, 6, 90, 160, {"num_frames": 8, "max_pixels": 360 * 420}),  # the ST-R1 recipe's settings
]


@pytest.mark.parametrize("total,video_fps,width,height,settings", RUNS)
def test_a_qwen3_run_reads_and_writes_videos_by_its_family_rules(
    processors, tmp_path, total, video_fps, width, height, settings
):
    """`Processor.for_model` (the trainer's, the evaluator's and the sampler's processor) of a Qwen3-VL
    model samples, sizes and timestamps a video file as transformers' Qwen3-VL processors do."""
    from reference import tiny_config
    from test_data_video import write_video

    path = write_video(tmp_path / "clip.mp4", total, video_fps, width, height)
    tokenizer = processors[0].tokenizer.name_or_path
    processor = Processor.for_model(tokenizer, tiny_config("qwen3_vl"), MediaConfig(**settings))
    assert processor.media.patch_size == 16
    clip = read_video(path, processor.media, rules=processor.rules)
    expected = sampled(total, video_fps, processor.media.fps, settings.get("num_frames", 8))
    np.testing.assert_array_equal(clip.frame_indices, expected)
    assert clip.frames.shape[1:3] == resize_target(len(expected), height, width, processor.media)
    got = processor.encode("Which way?", videos=[clip])
    want = hf_encode(processors, [clip], [], "Which way?")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])

    qwen2 = Processor.for_model(tokenizer, tiny_config("qwen2_vl"), MediaConfig(**settings))
    assert type(qwen2.rules) is not type(processor.rules)  # the other family keeps its own rules


@pytest.mark.parametrize("height,width", [(37, 53), (480, 641), (1000, 90), (90, 1000), (20, 20), (3000, 2000)])
def test_images_of_odd_sizes_are_the_image_processors(processors, tmp_path, height, width):
    """An image file read at Qwen3-VL's factor (32) and normalisation: the size, patches and grid of the image
    processor transformers' Qwen3-VL processor holds, at its pixel limits (float32, to 1e-6)."""
    from PIL import Image

    image_processor = processors[1].image_processor
    pixels = np.random.default_rng(height).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    size = image_processor.size
    cfg = qwen3_vl.media_config(image_min_pixels=size.shortest_edge, image_max_pixels=size.longest_edge)
    image = read_image(str(tmp_path / "image.png"), cfg)
    got = processors[0].encode("What is it?", images=[image])
    want = image_processor(images=[pixels], return_tensors="np")
    np.testing.assert_array_equal(got["image_grid_thw"], want["image_grid_thw"])
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], rtol=0, atol=1e-6)


def test_a_one_frame_video_file(processors, tmp_path):
    """Sampled by rate, a one-frame video is one frame, which transformers' Qwen3-VL resize refuses: a run
    records the sample in one line naming the file. Asked for 8 frames, it is that frame 8 times, as there."""
    from reference import tiny_config
    from test_data_video import write_video

    from stjax.data.video import SampleError

    path = write_video(tmp_path / "still.mp4", 1, 30, 64, 64)
    tokenizer, model = processors[0].tokenizer.name_or_path, tiny_config("qwen3_vl")
    by_rate = Processor.for_model(tokenizer, model, MediaConfig(num_frames=None, fps=2.0))
    with pytest.raises(SampleError, match=r"file .*still.mp4: too few frames: 1 frame\(s\) sampled; at least 2"):
        read_video(path, by_rate.media, rules=by_rate.rules)
    eight = Processor.for_model(tokenizer, model, MediaConfig(num_frames=8))
    clip = read_video(path, eight.media, rules=eight.rules)
    np.testing.assert_array_equal(clip.frame_indices, sampled(1, 30.0, 2.0, 8))
    assert clip.frames.shape[1:3] == resize_target(8, 64, 64, eight.media)
