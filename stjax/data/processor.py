"""Turn a sample (video + question) into the arrays a Qwen2-VL / Qwen2.5-VL model takes.

Mirrors the Hugging Face processor: pixels normalised and cut into (C, 2, 14, 14) patch vectors in
merge-block order, the prompt rendered with the tokenizer's own chat template, each vision pad token
expanded to one token per merged patch, M-RoPE positions from the model family's `rope_index`. What differs by
family (frame sampling, pixel budget, normalisation, how a video is written in the prompt) comes from the
`stjax.data.video.MediaRules` its family names.
Outputs use the Hugging Face names, and hold every array transformers' processor returns
(`mm_token_type_ids` included), so one batch feeds either model. `hf_processor_files` writes the files that
let `AutoProcessor.from_pretrained` load a model directory stjax made, and `training_recipe` the prompt and
media settings a model was trained with, which the evaluator then uses.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from stjax.data.formats import MCQ_INSTRUCTION, Sample, release_problem
from stjax.data.video import IMAGE_MEAN, IMAGE_STD, MediaConfig, MediaRules, SampleError, VideoClip, read_video
from stjax.models import families
from stjax.models.families import Family
from stjax.models.rope import RopeSpec

# transformers' modality ids (ProcessorMixin.create_mm_token_type_ids): what its M-RoPE reads the prompt's layout from
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2
TRAINING_RECIPE = "stjax_training.json"  # in an export: the prompt template and media settings it was trained with

Template = Literal["seed_mcq", "grpo", "sft", "problem"]
LossRule = Literal["assistant", "release"]

THINK_INSTRUCTION = (
    "Output the thinking process in <think> </think> and final answer in <answer> </answer> tags, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>."
)


def user_text(sample: Sample, template: Template) -> str:
    """The user turn's text for each recipe.

    seed_mcq: the seed README's inference prompt (no space before "Options:" or "Output").
    grpo: the GRPO script's prompt, built on the release's `problem` text.
    sft: the cold-start prompt, the `problem` text alone (the target carries the reasoning).
    problem: the same text as a prompt alone, without a target (GRPO on a model that only ever saw
    the cold start's prompt, such as the tiny embedded one).
    """
    if template == "seed_mcq":
        return sample.question + "Options:" + "\n".join(sample.options) + MCQ_INSTRUCTION + THINK_INSTRUCTION
    problem = sample.problem or release_problem(sample.question, sample.options)
    if template == "grpo":
        return problem + " Please answer in English. " + THINK_INSTRUCTION + " "
    if template in ("sft", "problem"):
        return problem
    raise ValueError(f"unknown template {template!r}")


def normalize(patches: np.ndarray, mean: np.ndarray = IMAGE_MEAN, std: np.ndarray = IMAGE_STD) -> np.ndarray:
    """uint8 patch vectors (N, 3*rest) -> float32 (x/255 - mean)/std per channel, as the HF processor.

    Works on patch vectors (channel-major, see `patchify`) rather than frames: the same numbers, and the
    in-place float32 ops over long rows are about 3x faster than broadcasting over a last axis of 3.
    """
    x = patches.reshape(len(patches), 3, -1).astype(np.float32)
    x *= np.float32(1 / 255)
    x -= mean[:, None]
    x /= std[:, None]
    return x.reshape(patches.shape)


def vision_patches(
    frames: np.ndarray, cfg: MediaConfig, mean: np.ndarray = IMAGE_MEAN, std: np.ndarray = IMAGE_STD
) -> tuple[np.ndarray, np.ndarray]:
    """(T, H, W, 3) uint8 frames -> normalised float32 patch vectors and grid_thw."""
    patches, grid = patchify(frames.transpose(0, 3, 1, 2), cfg)
    return normalize(patches, mean, std), grid


def patchify(x: np.ndarray, cfg: MediaConfig) -> tuple[np.ndarray, np.ndarray]:
    """(T, C, H, W) -> ((num_patches, C*tp*P*P), grid_thw (3,)) in the HF processor's patch order.

    Order: temporal slice, merged row, merged column, then the merge x merge patches inside the block
    row-major; each vector is laid out (C, tp, P, P). T is padded to a multiple of tp by repeating the
    last frame (an image, T=1, becomes two copies of itself).
    """
    tp, p, m = cfg.temporal_patch_size, cfg.patch_size, cfg.merge_size
    if len(x) % tp:
        x = np.concatenate([x, np.repeat(x[-1:], tp - len(x) % tp, axis=0)])
    t, c, h, w = x.shape
    gt, gh, gw = t // tp, h // p, w // p
    x = x.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> (gt, gh/m, gw/m, m, m, c, tp, p, p)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * tp * p * p), np.array([gt, gh, gw], np.int64)


@dataclass
class Processor:
    """Tokenizer + media settings + the M-RoPE spec; one call per sample gives unpadded arrays.

    `loss_rule` chooses which tokens are SFT targets: "assistant" marks only the assistant reply
    (its text and closing <|im_end|>\\n); "release" marks every token except padding and the
    image/video pad tokens, as the public SFT script did.

    `model_type` names the model family whose media rules (`rules`) and position ids the processor follows;
    `media` must suit those rules (`for_model` makes both agree).
    """

    tokenizer: object  # a transformers tokenizer with the Qwen special tokens and a chat template
    media: MediaConfig = MediaConfig()
    tokens_per_second: float | None = None  # None: Qwen2-VL time positions; 2: Qwen2.5-VL
    loss_rule: LossRule = "assistant"
    model_type: str = "qwen2_vl"

    @classmethod
    def from_pretrained(cls, tokenizer_dir: str | Path, **kwargs) -> Processor:
        """Load the tokenizer from local files only (never downloads)."""
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True), **kwargs)

    @classmethod
    def for_model(cls, tokenizer_dir: str | Path, model_cfg, media: MediaConfig | None = None, **kwargs) -> Processor:
        """The processor of a model config (`stjax.models.config.QwenVLConfig`): its family's media rules
        over `media`'s settings, its patch size and its time positions."""
        processor = cls.from_pretrained(
            tokenizer_dir,
            tokens_per_second=model_cfg.rope_spec().tokens_per_second,
            model_type=model_cfg.model_type,
            **kwargs,
        )
        processor.media = processor.rules.configure(media or MediaConfig(), model_cfg.vision.patch_size)
        return processor

    @property
    def family(self) -> Family:
        return families.family(self.model_type)

    @functools.cached_property
    def rules(self) -> MediaRules:
        """The media rules the family names (by name: data/ builds on models/, not the reverse)."""
        module, _, name = self.family.media_rules.partition(":")
        return getattr(importlib.import_module(module), name)()

    def _id(self, token: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(token)

    @property
    def rope_spec(self) -> RopeSpec:
        return RopeSpec(
            image_token_id=self._id("<|image_pad|>"),
            video_token_id=self._id("<|video_pad|>"),
            vision_start_token_id=self._id("<|vision_start|>"),
            spatial_merge_size=self.media.merge_size,
            tokens_per_second=self.tokens_per_second,
        )

    def encode(
        self,
        text: str,
        videos: list[VideoClip] = (),
        images: list[np.ndarray] = (),
        target: str | None = None,
    ) -> dict[str, np.ndarray]:
        """Arrays for one user turn (videos first, then images, then text) and an optional reply.

        Without a target the sequence ends with the assistant header, ready for generation.
        """
        content = [{"type": "video"} for _ in videos] + [{"type": "image"} for _ in images]
        messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt = self._video_texts(prompt, videos)
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assistant = [0] * len(ids)
        if target is not None:
            # Tokenised apart from the prompt so the prompt's tokens never depend on the reply.
            reply = self.tokenizer(target + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
            ids, assistant = ids + reply, assistant + [1] * len(reply)

        mean_std = self.mean_std
        video_patches = [vision_patches(v.frames, self.media, *mean_std) for v in videos]
        image_patches = [vision_patches(im[None], self.media, *mean_std) for im in images]
        merge_area = self.media.merge_size**2
        pad_grids = [pad for _, grid in video_patches for pad in self.rules.pad_grids(grid)]
        ids, assistant = self._expand(ids, assistant, "<|video_pad|>", pad_grids, merge_area)
        ids, assistant = self._expand(ids, assistant, "<|image_pad|>", [g for _, g in image_patches], merge_area)

        input_ids = np.asarray(ids, np.int64)
        video_grid = np.array([g for _, g in video_patches], np.int64).reshape(-1, 3)
        image_grid = np.array([g for _, g in image_patches], np.int64).reshape(-1, 3)
        seconds = np.array([v.second_per_grid_t for v in videos], np.float32)
        position_ids, _ = self.family.rope_index(input_ids[None], self.rope_spec, image_grid, video_grid, seconds)
        if self.loss_rule == "assistant":
            loss_mask = np.asarray(assistant, np.int32)
        else:
            skip = [self._id("<|endoftext|>"), self._id("<|image_pad|>"), self._id("<|video_pad|>")]
            loss_mask = (~np.isin(input_ids, skip)).astype(np.int32)
        empty = np.zeros((0, 3 * self.media.temporal_patch_size * self.media.patch_size**2), np.float32)
        mm_types = np.select(
            [input_ids == self._id("<|image_pad|>"), input_ids == self._id("<|video_pad|>")],
            [IMAGE_TYPE, VIDEO_TYPE],
            TEXT_TYPE,
        )
        return {
            "input_ids": input_ids,
            "attention_mask": np.ones_like(input_ids, np.int32),
            "mm_token_type_ids": mm_types.astype(np.int32),
            "position_ids": position_ids[:, 0],  # (3, L)
            "pixel_values_videos": np.concatenate([p for p, _ in video_patches]) if videos else empty,
            "video_grid_thw": video_grid,
            "second_per_grid_ts": seconds,
            "pixel_values": np.concatenate([p for p, _ in image_patches]) if images else empty,
            "image_grid_thw": image_grid,
            "loss_mask": loss_mask,
        }

    def _video_texts(self, prompt: str, videos: list[VideoClip]) -> str:
        """The chat template's `<|vision_start|><|video_pad|><|vision_end|>` of each video replaced by the
        family's text for it (`MediaRules.video_text`; Qwen3-VL's timestamped blocks), before tokenising."""
        texts = [self.rules.video_text(v, self.media) for v in videos]
        if all(t is None for t in texts):
            return prompt
        wrapper = "<|vision_start|><|video_pad|><|vision_end|>"
        parts = prompt.split(wrapper)
        if len(parts) - 1 != len(videos):
            raise ValueError(f"prompt has {len(parts) - 1} video blocks but {len(videos)} videos were given")
        return parts[0] + "".join((wrapper if t is None else t) + p for t, p in zip(texts, parts[1:]))

    def _expand(
        self, ids: list[int], mask: list[int], token: str, grids: list[np.ndarray], merge_area: int
    ) -> tuple[list[int], list[int]]:
        """Replace the k-th `token` by t*h*w/merge_area copies of itself, for the k-th grid."""
        token_id = self._id(token)
        places = [i for i, x in enumerate(ids) if x == token_id]
        if len(places) != len(grids):
            raise ValueError(f"prompt has {len(places)} {token} but {len(grids)} items were given")
        out_ids: list[int] = []
        out_mask: list[int] = []
        start = 0
        for place, grid in zip(places, grids):
            count = int(np.prod(grid)) // merge_area
            out_ids += ids[start:place] + [token_id] * count
            out_mask += mask[start:place] + [0] * count
            start = place + 1
        return out_ids + ids[start:], out_mask + mask[start:]

    @property
    def mean_std(self) -> tuple:
        """The pixel normalisation of the family's media rules (Qwen3-VL's 0.5 / 0.5, else CLIP's)."""
        return self.rules.mean, self.rules.std

    def __call__(self, sample: Sample, template: Template = "sft") -> dict[str, np.ndarray]:
        """Read the sample's video and encode it with the named prompt template.

        For "sft" the target is the sample's solution (a SampleError when it has none).
        """
        target = None
        if template == "sft":
            if sample.solution is None:
                raise SampleError("no solution to train on (sft template)", sample_id=sample.id, path=sample.video)
            target = sample.solution
        clip = read_video(sample.video, self.media, sample_id=sample.id, rules=self.rules)
        return self.encode(user_text(sample, template), videos=[clip], target=target)


def hf_processor_files(processor: Processor) -> dict[str, str]:
    """transformers' processor files for a model directory stjax made, as `processor` reads and normalises media:
    the image and video processors' configs (the family names its processor; its media rules give the video
    processor's frame and pixel fields, `MediaRules.hf_video_processor`) and the chat template."""
    media, (mean, std) = processor.media, processor.mean_std
    common = {
        "patch_size": media.patch_size,
        "temporal_patch_size": media.temporal_patch_size,
        "merge_size": media.merge_size,
        "image_mean": [float(x) for x in np.ravel(mean)],
        "image_std": [float(x) for x in np.ravel(std)],
        "processor_class": processor.family.hf_processor_class,
    }
    image = {
        "image_processor_type": "Qwen2VLImageProcessor",  # every Qwen-VL family's, in transformers 5
        **common,
        "size": {"shortest_edge": media.image_min_pixels, "longest_edge": media.image_max_pixels},
    }
    video = {**common, **processor.rules.hf_video_processor(media)}
    return {
        "preprocessor_config.json": json.dumps(image, indent=2) + "\n",
        "video_preprocessor_config.json": json.dumps(video, indent=2) + "\n",
        "chat_template.jinja": processor.tokenizer.chat_template,
    }


# The settings an export records, which the evaluator takes unless told otherwise.
RECIPE_MEDIA = ("num_frames", "fps", "max_pixels", "second_per_grid")


def training_recipe(stage: str, template: Template, media: MediaConfig) -> dict:
    """What a model was trained with, as the evaluator's options: the prompt template it answers (sft's
    prompt is problem's, without the target) and the media settings."""
    return {
        "stage": stage,
        "template": "problem" if template == "sft" else template,
        **{k: getattr(media, k) for k in RECIPE_MEDIA},
    }


def read_training_recipe(model_dir: str | Path) -> dict | None:
    """The training recipe a stjax export records, or None (a model stjax did not train)."""
    path = Path(model_dir) / TRAINING_RECIPE
    return json.loads(path.read_text()) if path.is_file() else None
