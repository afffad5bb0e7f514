"""Qwen3-VL inputs against transformers' own rules: its video processor's frame sampling and pixel budget,
its processor's timestamped prompt, patch order and normalisation, and its model's `get_rope_index`.

transformers' video processor needs torchvision (not installed), so its resizing step is replaced by frames
given at their final size; everything after it (timestamps, pads, patches, normalisation) is transformers'.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from transformers import BatchFeature, ProcessorMixin
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_utils import VideoMetadata

from stjax.data import qwen3_vl
from stjax.data.processor import Processor
from stjax.data.tokenizer import build_tokenizer
from stjax.data.video import VideoClip


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
            image_processor=Qwen2VLImageProcessorPil(patch_size=16, merge_size=2),
            tokenizer=ours.tokenizer,
            video_processor=FramesAsGiven(),
        )
    return ours, theirs


@pytest.mark.parametrize("total,fps", [(10, 4.0), (97, 30.0), (300, 24.0), (3, 1.0), (4000, 25.0)])
def test_frame_sampling_is_the_video_processors(total, fps):
    metadata = VideoMetadata(total_num_frames=total, fps=fps)
    expected = Qwen3VLVideoProcessor().sample_frames(metadata)
    np.testing.assert_array_equal(qwen3_vl.sample_indices(total, fps), expected)


@pytest.mark.parametrize("t,h,w", [(4, 480, 640), (16, 1080, 1920), (2, 20, 300), (768, 720, 1280), (5, 33, 31)])
def test_pixel_budget_is_the_video_processors(t, h, w):
    expected = smart_resize(
        t, h, w, temporal_factor=2, factor=32, min_pixels=qwen3_vl.MIN_PIXELS, max_pixels=qwen3_vl.MAX_PIXELS
    )
    assert qwen3_vl.video_size(t, h, w) == expected


# (frames, height, width, video fps, first frame index, step): even and odd frame counts, several sizes
VIDEOS = [(4, 64, 96, 2.0, 0, 1), (5, 96, 64, 30.0, 3, 7), (9, 128, 160, 24.0, 0, 12), (16, 64, 64, 4.0, 10, 2)]


@pytest.mark.parametrize("video", VIDEOS, ids=[f"{v[0]}x{v[1]}x{v[2]}" for v in VIDEOS])
def test_encode_equals_transformers_processor_and_get_rope_index(processors, hf_dirs, video):
    ours, theirs = processors
    frames, height, width, fps, first, step = video
    rng = np.random.default_rng(frames)
    indices = first + step * np.arange(frames)
    clip = VideoClip(
        frames=rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8),
        frame_indices=indices,
        total_frames=int(indices[-1]) + 1,
        video_fps=fps,
        sample_fps=fps / step,
        second_per_grid_t=1.0,
    )
    got = ours.encode("Which way did you turn?", videos=[clip])

    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Which way did you turn?"}]}]
    prompt = ours.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    metadata = VideoMetadata(total_num_frames=clip.total_frames, fps=fps, frames_indices=indices.tolist())
    want = theirs(text=[prompt], videos=[clip.frames], video_metadata=[metadata], return_tensors="np")
    np.testing.assert_array_equal(got["input_ids"], want["input_ids"][0])
    np.testing.assert_array_equal(got["video_grid_thw"], want["video_grid_thw"])
    np.testing.assert_allclose(got["pixel_values_videos"], want["pixel_values_videos"], rtol=0, atol=1e-6)
    assert "seconds>" in ours.tokenizer.decode(got["input_ids"])

    model = hf_dirs("qwen3_vl")[1]
    positions, _ = model.model.get_rope_index(
        torch.from_numpy(want["input_ids"]),
        torch.from_numpy(want["mm_token_type_ids"]),
        video_grid_thw=torch.from_numpy(want["video_grid_thw"]),
    )
    np.testing.assert_array_equal(got["position_ids"], positions.numpy()[:, 0])
