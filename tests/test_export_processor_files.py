"""An export's processor files, per model family, against transformers' own tables and classes: the processor
its auto-mapping builds for the model_type, the image processor class it maps the family to, each file's keys
those transformers' classes write, and the settings stjax trained with read back by transformers' loaders.
(transformers' Qwen2-VL video processor module imports torchvision, which is not installed: its file is read
as JSON; AutoProcessor as a whole needs it too, see tests/test_own_data.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest

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
        export_hf(model, root / f"{arch}-hf", tokenizer, files=export_files(processor, tokenizer, "sft", "sft"))
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
    # transformers' own normalisation for the family (its video processor's defaults: CLIP's, Qwen3-VL's 0.5)
    if model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as Reference
    else:
        Reference = Qwen2VLImageProcessorPil
    theirs = [Reference().image_mean, Reference().image_std]
    np.testing.assert_allclose([image.image_mean, image.image_std], theirs, rtol=1e-7)
    np.testing.assert_allclose([video_file["image_mean"], video_file["image_std"]], theirs, rtol=1e-7)
    np.testing.assert_allclose(processor.mean_std, theirs, rtol=1e-7)  # what stjax normalised with


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
    0.5 / 0.5, the clip's pixel bounds; its own frame sampling and resize target on that file are those of
    stjax's Qwen3-VL rules (`processor.rules`) at the same settings, with the run's num_frames and, for a
    processor that samples by rate (no num_frames), its fps."""
    import dataclasses
    from unittest import mock

    import torch
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor
    from transformers.video_utils import VideoMetadata

    export, processor = exports["qwen3_vl"]
    video_file = json.loads((export / "video_preprocessor_config.json").read_text())
    known = set(Qwen3VLVideoProcessor().to_dict()) | set(Qwen3VLVideoProcessor.valid_kwargs.__annotations__)
    assert set(video_file) - {"processor_class"} <= known  # its own keys (those unset by default among them)
    video = Qwen3VLVideoProcessor.from_pretrained(export)
    media = processor.media
    assert video.to_dict()["video_processor_type"] == video_file["video_processor_type"] == "Qwen3VLVideoProcessor"
    assert (video.patch_size, video.merge_size, video.temporal_patch_size) == (16, 2, 2)
    assert (media.patch_size, media.merge_size, media.temporal_patch_size) == (16, 2, 2)
    np.testing.assert_allclose(
        [video.image_mean, video.image_std],
        [Qwen3VLVideoProcessor().image_mean, Qwen3VLVideoProcessor().image_std],
        rtol=1e-7,
    )
    assert video.size == {"shortest_edge": media.min_pixels, "longest_edge": media.total_pixels}
    assert (video.do_sample_frames, video.num_frames, video.fps) == (True, media.num_frames, None)
    by_rate = dataclasses.replace(media, num_frames=None, fps=2.0)
    fields = processor.rules.hf_video_processor(by_rate)
    stop = lambda self, image, size, resample: (size.height, size.width)  # where torchvision would resize
    for theirs, settings in ((video, media), (Qwen3VLVideoProcessor(**fields), by_rate)):
        kwargs = theirs._merge_and_standardize_kwargs()  # what its preprocess hands its steps
        for total, rate, height, width in ((50, 5.0, 480, 640), (9, 30.0, 100, 2000), (3000, 25.0, 1080, 1920)):
            metadata = VideoMetadata(total_num_frames=total, fps=rate)
            frames = theirs.sample_frames(metadata, num_frames=kwargs["num_frames"], fps=kwargs["fps"])
            ours, count = processor.rules.frame_plan(total, rate, settings)
            np.testing.assert_array_equal(frames, ours)
            with mock.patch.object(BaseVideoProcessor, "resize", stop):
                size = theirs.resize(
                    torch.zeros(()).expand(1, count, 3, height, width),
                    size=kwargs["size"],
                    resample=None,
                    factor=32,
                    temporal_factor=2,
                    cap_pixels_per_frame=kwargs["cap_pixels_per_frame"],
                    max_video_tokens=kwargs["max_video_tokens"],
                )
            assert size == processor.rules.video_size(height, width, count, settings)
