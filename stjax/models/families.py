"""Model families as plug-ins, registered by transformers' `model_type`.

Everything that differs between Qwen2-VL, Qwen2.5-VL and later families lives in one file per family,
`stjax/models/<model_type>.py`, which subclasses `Family` and calls `register`. Shared code asks the
model config's family (`cfg.family`, or `family(model_type)`) and never branches on a family's name.

What a family provides (the defaults below are the Qwen2-VL way; override what differs):
- identity: `model_type`, `architecture` (config.json's `architectures`), `tiny_preset` (its tiny
  random model in configs/models, the embedded default and the tests' model).
- config: `vision_config(d)` parses config.json's `vision_config` into a `VisionConfig` (a subclass
  may add the family's own fields) and `hf_vision_config(v)` writes it back; `text_config(d)` parses
  the decoder's fields (a family whose decoder differs sets flags `TextConfig` carries and `text.py`
  honours, such as q/k norms or interleaved M-RoPE sections); `hf_config(cfg, flat)` lays the whole
  config.json out (default the hub's flat layout).
- modules: `vision_tower(cfg, rngs)`, an nnx.Module `(VisionInputs) -> merged features` (default the
  tower of `vision.py`, shaped by the facts `vision_norm`, `gated_mlp`, `patch_bias` and `full_attention`);
  `text_model(cfg, rngs)`, the decoder (default `text.TextModel`).
- weights: `rules(cfg)`, the table between Hugging Face tensor names and stjax parameter paths
  (default the decoder's rules plus those of the default tower, see `weights.py`); `hf_name(name)`,
  the name an export writes for a table name (default the same).
- positions: `rope_index(input_ids, spec, ...)`, M-RoPE position ids (default `rope.get_rope_index`, the
  Qwen2 rule);
  `video_tokens_per_second(v)`, the time scale of video positions (None: the frame-pair index);
  `processing_order(v, grids)`, the order of the vision pass and its attention windows (default none);
  `patch_inputs(v, rotary_positions, grid_hw)`, extra per-patch arrays of `VisionInputs` (default none).
- inputs: `media_rules`, "module:Class" of the processor's `stjax.data.video.MediaRules` (frame sampling,
  pixel budget, normalisation, a video's prompt text); named, not imported: data/ builds on models/.
- metrics: `vision_flops_per_patch(cfg, group_size)`, for MFU (default: the default tower's count).
- exports: `hf_processor_class`, transformers' processor an export names (its video processor's fields follow
  the family's media rules: `stjax.data.video.MediaRules.hf_video_processor`).

A new family is one file here, its name in `BUILTIN`, and its presets in configs/models.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod

import numpy as np
from flax import nnx

from stjax.models.config import ConfigError, QwenVLConfig, TextConfig, VisionConfig, qwen2_text_config
from stjax.models.rope import get_rope_index
from stjax.models.text import TextModel
from stjax.models.vision import VisionTower
from stjax.models.weights import Rule, text_rules, vision_rules

# The families that ship with stjax, each the module stjax/models/<model_type>.py, imported on first use.
BUILTIN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_REGISTRY: dict[str, Family] = {}


class Family(ABC):
    """One model family: its rules where shared code needs them (see the module docstring)."""

    model_type: str
    architecture: str
    tiny_preset: str
    vision_norm = "layer_norm"  # or "rms_norm": the vision blocks' and merger's norms (LayerNorm has a bias)
    gated_mlp = False  # vision MLP: fc1, act, fc2 (False) or down(act(gate) * up) (True)
    patch_bias = False  # whether the patch embedding has a bias
    media_rules = "stjax.data.video:MediaRules"  # see the module docstring
    # M-RoPE position ids (3, B, L) and rope deltas (B,) of a batch: a NumPy function with
    # `rope.get_rope_index`'s arguments (input_ids, spec, image_grid_thw, video_grid_thw, second_per_grid_ts,
    # attention_mask), which the processor runs in the data workers
    rope_index = staticmethod(get_rope_index)
    hf_processor_class = "Qwen2VLProcessor"  # the processor transformers builds for an export

    def full_attention(self, v: VisionConfig) -> tuple[bool, ...]:
        """Per vision block: True attends over a whole frame, False within the `processing_order` windows."""
        return (True,) * v.depth

    @abstractmethod
    def vision_config(self, d: dict) -> VisionConfig:
        """config.json's `vision_config` (raises KeyError for a missing required field)."""

    @abstractmethod
    def hf_vision_config(self, v: VisionConfig) -> dict:
        """The inverse of `vision_config`, in the hub's layout."""

    def text_config(self, d: dict) -> TextConfig:
        return qwen2_text_config(d)

    def hf_config(self, cfg: QwenVLConfig, flat: dict) -> dict:
        """config.json of `cfg`, given its fields in the hub's flat layout."""
        return flat

    def vision_tower(self, cfg: QwenVLConfig, rngs: nnx.Rngs) -> nnx.Module:
        return VisionTower(cfg, rngs)

    def text_model(self, cfg: QwenVLConfig, rngs: nnx.Rngs) -> nnx.Module:
        return TextModel(cfg, rngs)

    def rules(self, cfg: QwenVLConfig) -> list[Rule]:
        return text_rules(cfg) + vision_rules(cfg)

    def hf_name(self, name: str) -> str:
        """The tensor name an export writes for the table name `name` (see `weights.canonical_name`)."""
        return name

    def video_tokens_per_second(self, v: VisionConfig) -> float | None:
        return None

    def processing_order(self, v: VisionConfig, grids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Merged-token order of the vision pass and the length in patches of each attention window
        (None: no windows, every block attends within frames)."""
        return np.arange(int(grids.prod(axis=1).sum()) // v.spatial_merge_size**2), None

    def patch_inputs(self, v: VisionConfig, rotary_positions: np.ndarray, grid_hw: np.ndarray) -> dict:
        """Extra `VisionInputs` fields for patches at these (row, col) of images of these (h, w) grids."""
        return {}

    def vision_flops_per_patch(self, cfg: QwenVLConfig, group_size: int) -> float:
        """Training FLOPs per patch of the default tower (the convention of `stjax.train.metrics`), for
        attention groups of `group_size` patches (the patches of one frame).

        A windowed block attends over min(window, group_size) patches (windows at a frame's edge are
        smaller, so this is an upper bound), a full-attention block over the whole group. The merger
        runs once per spatial_merge_size**2 patches, so its parameters count divided by that.
        """
        v = cfg.vision
        mlp = (3 if self.gated_mlp else 2) * v.hidden_size * v.intermediate_size  # gated (3) or fc1, fc2
        block = 4 * v.hidden_size**2 + mlp  # qkv (3 d^2) and proj (d^2)
        params = v.patch_dim * v.hidden_size + v.depth * block + v.merger_params // v.spatial_merge_size**2
        window = min((v.window_merged * v.spatial_merge_size) ** 2, group_size)
        keys = sum(group_size if full else window for full in self.full_attention(v))
        return float(6 * params + 12 * keys * v.hidden_size)


def register(family: Family) -> Family:
    """Make `family` the one `family(family.model_type)` returns."""
    _REGISTRY[family.model_type] = family
    return family


def model_types() -> tuple[str, ...]:
    """Every registered model_type, the built-in ones first."""
    for name in BUILTIN:
        importlib.import_module(f"stjax.models.{name}")
    return BUILTIN + tuple(name for name in _REGISTRY if name not in BUILTIN)


def family(model_type: str) -> Family:
    """The family registered for `model_type` (transformers' name, as in config.json)."""
    known = model_types()
    if model_type not in _REGISTRY:
        raise ConfigError(f"unknown model_type {model_type!r}; supported: {', '.join(known)}")
    return _REGISTRY[model_type]
