"""Model configuration: one dataclass tree for every model family, read from and written to
Hugging Face `config.json` files (the family of `model_type` parses and writes its own parts, see
`stjax.models.families`).

The hub's `config.json` is flat (text fields at the top, `rope_scaling.mrope_section`); transformers
5.x writes a nested one (`text_config`, `rope_parameters`). Both are read; the flat hub layout is
written, which every transformers version loads.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stjax.models.rope import RopeSpec
from stjax.settings import ConfigError

if TYPE_CHECKING:
    from flax import nnx

    from stjax.models.families import Family

QUANTIZE_FORMATS = ("none", "nf4", "int8")
QUANTIZE_TARGETS = ("lora", "all")
PRESETS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower. `hidden_size` is the tower's width; `out_hidden_size` the merger's output."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    out_hidden_size: int
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    # Qwen2.5-VL only: window attention and the time scale of video positions.
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    tokens_per_second: float | None = None
    # Qwen3-VL only: the learned position table (a square grid, resampled to each image) and the blocks
    # whose outputs, each through its own merger, are added to the first decoder layers (DeepStack).
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merger_params(self) -> int:
        """Weights of one patch merger: its (width, width) and (width, out_hidden_size) matrices."""
        width = self.hidden_size * self.spatial_merge_size**2
        return width**2 + width * self.out_hidden_size

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (4 for the released models: 112 // 2 // 14)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    # Qwen3-VL: head_dim given apart from hidden_size / heads, RMSNorm on q and k, q/k/v and o biases by its
    # attention_bias (Qwen2: q/k/v biases, none on o), and the M-RoPE streams interleaved over the
    # frequencies (T H W T H W ...) instead of in chunks.
    explicit_head_dim: int | None = None
    qk_norm: bool = False
    attention_bias: bool = True
    o_proj_bias: bool = False
    mrope_interleaved: bool = False

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    def hf_sizes(self) -> dict[str, int]:
        """The decoder's sizes under their config.json names."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
        }


@dataclass(frozen=True)
class QwenVLConfig:
    """Architecture (from config.json) plus the run-time policy (dtypes, attention, remat)."""

    model_type: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    initializer_range: float = 0.02
    # Run-time policy: not part of the checkpoint.
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention: str = "auto"  # see stjax.models.attention.BACKENDS
    remat: str = "none"  # see stjax.models.layers.REMAT_POLICIES
    # LoRA adapters on the decoder's projections (0: off). scale = lora_alpha / lora_rank.
    lora_rank: int = 0
    lora_alpha: float = 8.0
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_dropout: float = 0.0  # on the adapters' input, in training steps that pass a dropout key
    # A frozen base stored quantized (stjax.models.quant): quantize_base nf4 or int8 ("none": in param_dtype)
    # for the linears LoRA targets (quantize_targets "lora") or for every linear of the decoder and the
    # vision tower but the output head and the patch embedding ("all", as transformers' load_in_4bit);
    # double_quant: nf4's block scales quantized too.
    quantize_base: str = "none"
    quantize_targets: str = "lora"
    double_quant: bool = False
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        _family(self.model_type)  # an unknown model_type fails here
        t, v = self.text, self.vision
        sizes = {
            **t.hf_sizes(),
            "vision depth": v.depth,
            "vision hidden_size": v.hidden_size,
            "vision num_heads": v.num_heads,
            "vision intermediate_size": v.intermediate_size,
            "vision out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "temporal_patch_size": v.temporal_patch_size,
            "spatial_merge_size": v.spatial_merge_size,
        }
        bad = [
            f"{name}={value!r}"
            for name, value in sizes.items()
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0
        ]
        if bad:
            raise ConfigError(f"{', '.join(bad)}: must be positive integers")
        checks = (("vision hidden_size", v.hidden_size, v.num_heads),)
        if t.explicit_head_dim is None:
            checks += (("hidden_size", t.hidden_size, t.num_heads),)
        for name, size, heads in checks:
            if size % heads:
                raise ConfigError(f"{name}={size} is not a multiple of its {heads} attention heads")
        if sum(self.text.mrope_section) * 2 != self.text.head_dim:
            raise ConfigError(
                f"mrope_section {self.text.mrope_section} must sum to head_dim/2 = {self.text.head_dim // 2}"
            )
        if self.text.num_heads % self.text.num_kv_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.quantize_base not in QUANTIZE_FORMATS or self.quantize_targets not in QUANTIZE_TARGETS:
            raise ConfigError(
                f"quantize_base={self.quantize_base!r} must be one of {', '.join(QUANTIZE_FORMATS)} and "
                f"quantize_targets={self.quantize_targets!r} one of {', '.join(QUANTIZE_TARGETS)}"
            )

    def quantization(self, path: tuple[str, ...]) -> str:
        """How the linear at module path `path` (("model", "layers", "q_proj"), ("visual", "blocks", ...))
        stores its kernel: `quantize_base` when it is a target, else "none"."""
        if path[-1] in ("lm_head", "patch_embed"):
            return "none"
        if self.quantize_targets == "all" or (path[:2] == ("model", "layers") and path[-1] in self.lora_targets):
            return self.quantize_base
        return "none"

    def linear_init(self, rngs: nnx.Rngs) -> dict[str, Any]:
        """The keyword arguments every `layers.Linear` of this model takes alike: its initialiser and dtypes."""
        return dict(
            std=self.initializer_range, param_dtype=self.param_dtype, compute_dtype=self.compute_dtype, rngs=rngs
        )

    @property
    def family(self) -> Family:
        """The plug-in that holds what differs by model family (`stjax.models.families`)."""
        return _family(self.model_type)

    def replace(self, **changes: Any) -> QwenVLConfig:
        return dataclasses.replace(self, **changes)

    def rope_spec(self) -> RopeSpec:
        return RopeSpec(
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            spatial_merge_size=self.vision.spatial_merge_size,
            tokens_per_second=self.family.video_tokens_per_second(self.vision),
        )

    # ----------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], **policy: Any) -> QwenVLConfig:
        model_type = d.get("model_type")
        family = _family(model_type)
        t = text_fields(d)
        try:
            text = family.text_config(d)
            vision = family.vision_config(d["vision_config"])
        except KeyError as e:
            raise ConfigError(f"{model_type} config is missing the field {e.args[0]!r}") from None
        ids = {
            k: d[k]
            for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
            if k in d
        }
        for k in ("bos_token_id", "eos_token_id"):
            value = d.get(k, t.get(k))
            if isinstance(value, int):
                ids[k] = value
        return cls(
            model_type=model_type,
            text=text,
            vision=vision,
            initializer_range=t.get("initializer_range", 0.02),
            extra=d,
            **ids,
            **policy,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The hub's flat layout (every transformers version reads it), or the family's own (`Family.hf_config`)."""
        t, v = self.text, self.vision
        vision = self.family.hf_vision_config(v)
        vision["model_type"] = self.model_type
        return self.family.hf_config(
            self,
            {
                "architectures": [self.family.architecture],
                "model_type": self.model_type,
                **t.hf_sizes(),
                "hidden_act": t.hidden_act,
                "max_position_embeddings": t.max_position_embeddings,
                "rms_norm_eps": t.rms_norm_eps,
                "rope_theta": t.rope_theta,
                "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(t.mrope_section)},
                "tie_word_embeddings": t.tie_word_embeddings,
                "initializer_range": self.initializer_range,
                "bos_token_id": self.bos_token_id,
                "eos_token_id": self.eos_token_id,
                "image_token_id": self.image_token_id,
                "video_token_id": self.video_token_id,
                "vision_start_token_id": self.vision_start_token_id,
                "vision_end_token_id": self.vision_end_token_id,
                "vision_token_id": self.extra.get("vision_token_id", 151654),
                "torch_dtype": self.param_dtype,
                "vision_config": vision,
            },
        )

    @classmethod
    def from_file(cls, path: str | Path, **policy: Any) -> QwenVLConfig:
        """Read `config.json` (or a directory holding one, or a preset name from configs/models)."""
        path = Path(path)
        if not path.exists() and (PRESETS_DIR / f"{path}.json").exists():
            path = PRESETS_DIR / f"{path}.json"
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{path} holds a {type(d).__name__}, not a mapping of config fields")
        try:
            return cls.from_hf_dict(d, **policy)
        except (ConfigError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path}: {e}") from None

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path


def text_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The decoder's fields: transformers 5.x nests them (`text_config`), the hub keeps them at the top."""
    return {**d, **d["text_config"]} if isinstance(d.get("text_config"), dict) else d


def qwen2_text_config(d: dict[str, Any]) -> TextConfig:
    """The Qwen2 decoder's fields of a config.json (raises KeyError for a missing required field)."""
    t = text_fields(d)
    rope = t.get("rope_parameters") or t.get("rope_scaling") or d.get("rope_scaling") or {}
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", t.get("rope_theta", 1e6)),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=d.get("tie_word_embeddings", t.get("tie_word_embeddings", False)),
        hidden_act=t.get("hidden_act", "silu"),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
    )


def patch_fields(d: dict[str, Any], patch_size: int = 14) -> dict[str, int]:
    """The patch and merge sizes of a config.json's `vision_config`, named alike by every family (`patch_size`:
    the family's default)."""
    return {
        "patch_size": d.get("patch_size", patch_size),
        "temporal_patch_size": d.get("temporal_patch_size", 2),
        "spatial_merge_size": d.get("spatial_merge_size", 2),
        "in_channels": d.get("in_channels", d.get("in_chans", 3)),
    }


def hf_patch_fields(v: VisionConfig, channels: str) -> dict[str, int]:
    """The inverse of `patch_fields`; `channels` is the family's name for the input channels."""
    return {
        channels: v.in_channels,
        "patch_size": v.patch_size,
        "spatial_merge_size": v.spatial_merge_size,
        "temporal_patch_size": v.temporal_patch_size,
    }


def tower_fields(d: dict[str, Any], hidden_act: str, patch_size: int) -> dict[str, Any]:
    """The tower's sizes of a `vision_config` in the layout Qwen2.5-VL and later share (Qwen2-VL's names its
    width embed_dim and its MLP by mlp_ratio), with the patch and merge sizes; the family's defaults given."""
    return {
        "depth": d["depth"],
        "hidden_size": d["hidden_size"],
        "num_heads": d["num_heads"],
        "intermediate_size": d["intermediate_size"],
        "out_hidden_size": d["out_hidden_size"],
        "hidden_act": d.get("hidden_act", hidden_act),
        **patch_fields(d, patch_size),
    }


def hf_tower_fields(v: VisionConfig, channels: str) -> dict[str, Any]:
    """The inverse of `tower_fields`."""
    return {
        "depth": v.depth,
        "hidden_size": v.hidden_size,
        "hidden_act": v.hidden_act,
        "intermediate_size": v.intermediate_size,
        "num_heads": v.num_heads,
        "out_hidden_size": v.out_hidden_size,
        **hf_patch_fields(v, channels),
    }


def _family(model_type: str) -> Family:
    # Imported here: the families import this module (they build its dataclasses).
    from stjax.models.families import family

    return family(model_type)


def number(x: float) -> int | float:
    """An int where the value is integral (strict config validators want int mlp_ratio)."""
    return int(x) if float(x).is_integer() else x


def presets() -> list[str]:
    """Names of the model presets in configs/models."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))
