"""An export's processor files, per model family, against transformers' own tables and classes: the processor
its auto-mapping builds for the model_type, the image processor class it maps the family to, each file's keys
those transformers' classes write, and the settings stjax trained with read back by transformers' loaders.
(transformers' Qwen2-VL video processor module imports torchvision, which is not installed: its file is read
as JSON; AutoProcessor as a whole needs it too, see tests/test_own_data.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

from stjax.data import qwen3_vl
from stjax.data.processor import Processor
from stjax.data.tokenizer import build_tokenizer, tiny_model_dir
from stjax.data.video import MediaConfig
from stjax.models.loading import load_pretrained
from stjax.train.loop import export_files, export_hf

MEDIA = MediaConfig(max_pixels=12544)  # the tiny configs' frames (112 x 112)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each family's tiny model exported as a run exports it: {model_type: (export dir, stjax Processor)}."""
    root = tmp_path_factory.mktemp("exports")
    tokenizer = build_tokenizer(["Which way did you turn? A. left B. right", "red cube"] * 20, root / "tok", 400)
    out = {}
    for arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        model, cfg = load_pretrained(tiny_model_dir(tokenizer, root / arch, arch, seed=0))
        processor = Processor.for_model(tokenizer, cfg, MEDIA)
        export_hf(
            model, root / f"{arch}-hf", tokenizer, files=export_files(processor, cfg.family, tokenizer, "sft", "sft")
        )
        out[arch] = root / f"{arch}-hf", processor
    return out


@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_an_export_names_the_processors_transformers_maps_its_model_type_to(exports, model_type):
    from transformers import AutoConfig, AutoImageProcessor
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    export, processor = exports[model_type]
    assert AutoConfig.from_pretrained(export).model_type == model_type
    image_file = json.loads((export / "preprocessor_config.json").read_text())
    video_file = json.loads((export / "video_preprocessor_config.json").read_text())
    assert image_file["processor_class"] == video_file["processor_class"] == PROCESSOR_MAPPING_NAMES[model_type]
    assert image_file["image_processor_type"] == IMAGE_PROCESSOR_MAPPING_NAMES[model_type]["torchvision"]
    assert set(image_file) - {"processor_class"} <= set(Qwen2VLImageProcessorPil().to_dict())  # no legacy keys

    image = AutoImageProcessor.from_pretrained(export)
    vision = processor.media
    assert (image.patch_size, image.merge_size, image.temporal_patch_size) == (
        vision.patch_size,
        vision.merge_size,
        vision.temporal_patch_size,
    )
    assert image.size == {"shortest_edge": vision.image_min_pixels, "longest_edge": vision.image_max_pixels}
    for loaded in (image.image_mean, image.image_std, video_file["image_mean"], video_file["image_std"]):
        assert len(loaded) == 3
    np.testing.assert_allclose([image.image_mean, image.image_std], processor.mean_std, rtol=1e-7)
    np.testing.assert_allclose([video_file["image_mean"], video_file["image_std"]], processor.mean_std, rtol=1e-7)


def test_a_qwen2_exports_video_processor_bounds_each_frame_as_stjax_read_it(exports):
    """Qwen2-VL's video processor resizes each frame by transformers' smart_resize within `size`: the export's
    bounds give the frame size stjax read the video at (8 frames of 224 x 224 under max_pixels 12544)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize  # the video processor's rule

    from stjax.data.video import video_size

    export, processor = exports["qwen2_vl"]
    video_file = json.loads((export / "video_preprocessor_config.json").read_text())
    assert video_file["video_processor_type"] == "Qwen2VLVideoProcessor"
    size = video_file["size"]
    theirs = smart_resize(224, 224, factor=28, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    assert theirs == video_size(224, 224, 8, processor.media) == (112, 112)


def test_a_qwen3_exports_video_processor_is_transformers_qwen3_vl_one_with_stjax_settings(exports):
    """transformers' Qwen3VLVideoProcessor loads the Qwen3-VL export's file: its class, its keys, patches of 16,
    0.5 / 0.5, the clip's pixel budget and the frame rate; its own frame sampling on that file gives the frames
    stjax's Qwen3-VL rule takes (`stjax.data.qwen3_vl.sample_indices`) at the same settings."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_utils import VideoMetadata

    export, processor = exports["qwen3_vl"]
    video_file = json.loads((export / "video_preprocessor_config.json").read_text())
    assert set(video_file) - {"processor_class"} <= set(Qwen3VLVideoProcessor().to_dict())
    video = Qwen3VLVideoProcessor.from_pretrained(export)
    media = processor.media
    assert video.to_dict()["video_processor_type"] == video_file["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert (
        (video.patch_size, video.merge_size, video.temporal_patch_size)
        == (16, 2, 2)
        == (
            media.patch_size,
            media.merge_size,
            media.temporal_patch_size,
        )
    )
    np.testing.assert_allclose([video.image_mean, video.image_std], [qwen3_vl.MEAN, qwen3_vl.STD], rtol=1e-7)
    assert video.size == {"shortest_edge": media.min_pixels, "longest_edge": media.max_pixels}
    assert (video.do_sample_frames, video.fps, video.num_frames) == (True, media.fps, None)
    for total, rate in ((50, 5.0), (9, 30.0), (3000, 25.0)):
        theirs = video.sample_frames(VideoMetadata(total_num_frames=total, fps=rate))
        ours = qwen3_vl.sample_indices(total, rate, media.fps, media.min_frames, media.max_frames)
        np.testing.assert_array_equal(theirs, ours)
