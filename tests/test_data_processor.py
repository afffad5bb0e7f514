"""Processor: normalisation, patch order, prompt templates, pad expansion, loss masks, positions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stjax.data.formats import Sample, read_st_r1_jsonl
from stjax.data.processor import IMAGE_MEAN, IMAGE_STD, Processor, normalize, patchify, user_text, vision_patches
from stjax.data.tokenizer import build_tokenizer
from stjax.data.video import MediaConfig, VideoClip

RELEASE = Path(__file__).resolve().parents[1].parent / "shared/data/st-r1/st_r1_mcq_630.jsonl"
SEED_TAIL = (
    "\n\nInstructions: Please select the most appropriate answer from the options above and return only the "
    "option number (e.g. A, B, C or D).Output the thinking process in <think> </think> and final answer in "
    "<answer> </answer> tags, i.e., <think> reasoning process here </think><answer> answer here </answer>."
)


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    texts = ["Based on this video, which way did you turn? Options: A. left, B. right", "red cube blue sphere"] * 20
    path = build_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=400)
    return Processor.from_pretrained(path)


def clip(frames: int, h: int, w: int, seed: int = 0) -> VideoClip:
    rng = np.random.default_rng(seed)
    return VideoClip(
        frames=rng.integers(0, 256, (frames, h, w, 3), dtype=np.uint8),
        frame_indices=np.arange(frames),
        total_frames=frames,
        video_fps=4.0,
        sample_fps=0.5,
        second_per_grid_t=4.0,
    )


def test_normalize_is_clip_mean_std_in_float32():
    frames = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 3), dtype=np.uint8)
    out, grid = vision_patches(frames, MediaConfig())
    ref = (frames.astype(np.float64) / 255 - IMAGE_MEAN.astype(np.float64)) / IMAGE_STD.astype(np.float64)
    want, _ = patchify(ref.transpose(0, 3, 1, 2), MediaConfig())
    assert out.dtype == np.float32 and out.shape == (4, 1176) and grid.tolist() == [1, 2, 2]
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-6)
    # channel c occupies columns [c*392, (c+1)*392) of every patch vector
    np.testing.assert_allclose(
        normalize(np.full((1, 1176), 255, np.uint8)).reshape(3, 392)[:, 0], (1 - IMAGE_MEAN) / IMAGE_STD, rtol=1e-6
    )


@pytest.mark.parametrize("t,h,w", [(8, 56, 84), (3, 28, 56), (1, 84, 28), (2, 112, 112)])
def test_patchify_matches_direct_merge_block_loop(t, h, w):
    """Patch k is (C, 2, 14, 14) taken at (time pair, merged row, merged col, row in block, col in block)."""
    cfg = MediaConfig()
    x = np.random.default_rng(1).standard_normal((t, 3, h, w)).astype(np.float32)
    patches, grid = patchify(x, cfg)
    padded = np.concatenate([x, x[-1:]]) if t % 2 else x  # odd T repeats the last frame
    expected = []
    for ti in range(len(padded) // 2):
        for mr in range(h // 28):
            for mc in range(w // 28):
                for r in range(2):
                    for c in range(2):
                        y0, x0 = (2 * mr + r) * 14, (2 * mc + c) * 14
                        block = padded[2 * ti : 2 * ti + 2, :, y0 : y0 + 14, x0 : x0 + 14]  # (T=2, C, 14, 14)
                        expected.append(block.transpose(1, 0, 2, 3).reshape(-1))
    assert grid.tolist() == [len(padded) // 2, h // 14, w // 14]
    np.testing.assert_array_equal(patches, np.stack(expected))


def test_seed_prompt_renders_exactly(processor):
    sample = Sample(
        "s", "v.mp4", "Based on this video, which way?", ["A. left", "B. right"], "A", "direction", "forward"
    )
    expected_user = "Based on this video, which way?Options:A. left\nB. right" + SEED_TAIL
    assert user_text(sample, "seed_mcq") == expected_user
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|video_pad|><|vision_end|>" + expected_user + "<|im_end|>\n<|im_start|>assistant\n"
    )
    out = processor.encode(expected_user, videos=[clip(8, 56, 56)])
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = out["input_ids"].tolist()
    first = ids.index(pad)
    assert ids.count(pad) == 4 * 4 * 4 // 4  # grid (4, 4, 4)
    collapsed = [x for i, x in enumerate(ids) if x != pad or i == first]
    assert processor.tokenizer.decode(collapsed) == expected
    assert collapsed == processor.tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_grpo_and_sft_prompts():
    sample = Sample("s", "v.mp4", "Which way?", ["A. left", "B. right"], "B", "direction", "forward")
    problem = "Which way? Options: A. left, B. right" + SEED_TAIL.split("Output")[0]
    assert user_text(sample, "sft") == problem
    assert user_text(sample, "grpo") == (
        problem + " Please answer in English. Output the thinking process in <think> </think> and final answer "
        "in <answer> </answer> tags, i.e., <think> reasoning process here </think><answer> answer here </answer>. "
    )


@pytest.mark.parametrize("t,h,w", [(8, 280, 392), (8, 336, 336), (3, 56, 84), (2, 28 * 10, 28 * 4), (8, 112, 504)])
def test_video_pads_equal_merged_tokens(processor, t, h, w):
    out = processor.encode("Q", videos=[clip(t, h, w)])
    gt, gh, gw = (t + 1) // 2, h // 14, w // 14
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert out["video_grid_thw"].tolist() == [[gt, gh, gw]]
    assert int((out["input_ids"] == pad).sum()) == gt * gh * gw // 4
    assert out["pixel_values_videos"].shape == (gt * gh * gw, 1176)
    assert out["second_per_grid_ts"].tolist() == [4.0]


def test_image_repeats_to_two_frames_and_expands(processor):
    image = np.random.default_rng(3).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    out = processor.encode("Q", images=[image])
    assert out["image_grid_thw"].tolist() == [[1, 4, 6]]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((out["input_ids"] == pad).sum()) == 6
    # Both temporal halves of every patch vector are the same image.
    halves = out["pixel_values"].reshape(24, 3, 2, 14 * 14)
    np.testing.assert_array_equal(halves[:, :, 0], halves[:, :, 1])


def test_loss_masks_and_positions(processor):
    target = "<think>go left</think> <answer>A</answer>"
    video = clip(4, 56, 84)
    out = processor.encode("Which way?", videos=[video], target=target)
    ids, mask = out["input_ids"], out["loss_mask"]
    tok = processor.tokenizer
    # assistant rule: exactly the reply and its closing <|im_end|>\n, at the end
    assert tok.decode(ids[mask == 1]) == target + "<|im_end|>\n"
    assert mask[-int(mask.sum()) :].all()
    # release rule: everything but vision pads (no padding inside one sample)
    release = Processor(tok, loss_rule="release").encode("Which way?", videos=[video], target=target)["loss_mask"]
    pad = tok.convert_tokens_to_ids("<|video_pad|>")
    np.testing.assert_array_equal(release, (ids != pad).astype(np.int32))
    # M-RoPE: text counts up on all streams; the video block is start + (t, row, col); text resumes at max + 1
    pos = out["position_ids"]
    first = int(np.argmax(ids == pad))
    n = int((ids == pad).sum())
    np.testing.assert_array_equal(pos[:, :first], np.tile(np.arange(first), (3, 1)))
    t_ids, rows, cols = np.meshgrid(np.arange(2), np.arange(2), np.arange(3), indexing="ij")
    block = np.stack([t_ids.ravel(), rows.ravel(), cols.ravel()]) + first
    np.testing.assert_array_equal(pos[:, first : first + n], block)
    after = pos[:, first + n :]
    np.testing.assert_array_equal(after, np.tile(np.arange(after.shape[1]) + block.max() + 1, (3, 1)))


@pytest.mark.skipif(not RELEASE.exists(), reason=f"released rows not found at {RELEASE} (shared/ folder absent)")
def test_release_rows_render(processor):
    result = read_st_r1_jsonl(RELEASE)
    assert len(result.samples) == 630 and not result.skipped
    pad = processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")
    video = clip(2, 28 * 2, 28 * 2)
    for sample in result.samples:
        for template in ("seed_mcq", "grpo", "sft"):
            text = user_text(sample, template)
            if template != "seed_mcq":
                assert text.startswith(sample.problem)
            out = processor.encode(text, videos=[video], target=sample.solution if template == "sft" else None)
            assert int((out["input_ids"] == pad).sum()) == 1 * 4 * 4 // 4  # grid (1, 4, 4)
            assert out["position_ids"].shape == (3, len(out["input_ids"]))


def test_mm_token_type_ids_are_transformers(processor):
    """The modality ids transformers' processor returns (ProcessorMixin.create_mm_token_type_ids, run on the
    same ids with the tokenizer's image and video pad tokens), for a prompt with a video and an image."""
    from types import SimpleNamespace

    from transformers.processing_utils import ProcessorMixin

    arrays = processor.encode("which way?", videos=[clip(4, 56, 56)], images=[np.zeros((28, 56, 3), np.uint8)])
    pads = SimpleNamespace(
        image_token_ids=[processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")],
        video_token_ids=[processor.tokenizer.convert_tokens_to_ids("<|video_pad|>")],
        audio_token_ids=[],
    )
    expected = ProcessorMixin.create_mm_token_type_ids(pads, [arrays["input_ids"].tolist()])[0]
    assert arrays["mm_token_type_ids"].tolist() == expected and set(expected) == {0, 1, 2}


def test_an_export_gets_processor_files_its_tokenizer_lacks_and_the_training_recipe(processor, tmp_path):
    import json
    import shutil

    from stjax.train.loop import export_files

    tokenizer = Path(processor.tokenizer.name_or_path)
    files = export_files(processor, tokenizer, "sft", "sft")
    assert set(files) == {
        "stjax_training.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
        "chat_template.jinja",
    }
    assert json.loads(files["stjax_training.json"]) == {
        "stage": "sft",
        "template": "problem",
        "num_frames": 8,
        "fps": 1.0,
        "max_pixels": 360 * 420,
        "second_per_grid": "seed",
    }
    own = tmp_path / "model"  # a real model's directory: its own processor files are copied, not replaced
    shutil.copytree(tokenizer, own)
    (own / "preprocessor_config.json").write_text("{}")
    (own / "chat_template.json").write_text("{}")
    kept = set(export_files(processor, own, "grpo", "grpo"))
    assert kept == {"stjax_training.json", "video_preprocessor_config.json"}


def test_an_exports_processor_files_carry_the_normalisation_it_was_trained_with(processor):
    """Qwen3-VL's layout normalises pixels by 0.5 / 0.5, the others by CLIP's mean and std: the exported
    processor files say what training used, so transformers' processor makes the same pixels."""
    import dataclasses
    import json

    from stjax.train.loop import export_files

    tokenizer = Path(processor.tokenizer.name_or_path)
    for model_type, mean in (("qwen2_vl", processor.mean_std[0]), ("qwen3_vl", [0.5] * 3)):
        changed = dataclasses.replace(processor, model_type=model_type)
        files = export_files(changed, tokenizer, "sft", "sft")
        for name in ("preprocessor_config.json", "video_preprocessor_config.json"):
            np.testing.assert_allclose(json.loads(files[name])["image_mean"], mean, rtol=1e-7)
