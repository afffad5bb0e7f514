"""The one table between Hugging Face tensor names and stjax parameter paths.

HF stores one tensor per layer (`model.layers.3.self_attn.q_proj.weight`, torch Linear layout
(out, in)); stjax stacks layers on a leading axis (`model/layers/q_proj/kernel`, (L, in, out)).
Every transform here is a transpose or a reshape, so a round trip is bit-exact.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from stjax.models.config import QwenVLConfig

# In-memory names of transformers >= 4.52 -> the on-disk (hub) names this table uses.
_IN_MEMORY = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))


def canonical_name(name: str) -> str:
    """Map an in-memory transformers name to the on-disk layout (identity for on-disk names)."""
    for pattern, repl in _IN_MEMORY:
        name = pattern.sub(repl, name)
    return name


@dataclass(frozen=True)
class Rule:
    """`hf` may contain `{i}` (the layer index); then the stjax parameter is stacked over layers."""

    hf: str
    path: tuple[str, ...]
    kind: str  # "copy" | "linear" (transpose) | "patch" (conv3d weight <-> (patch_dim, D))

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def linear_rules(hf: str, path: tuple[str, ...], bias: bool) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", path + ("kernel",), "linear")]
    return rules + [Rule(f"{hf}.bias", path + ("bias",), "copy")] if bias else rules


def norm_rules(hf: str, path: tuple[str, ...], bias: bool) -> list[Rule]:
    rules = [Rule(f"{hf}.weight", path + ("scale",), "copy")]
    return rules + [Rule(f"{hf}.bias", path + ("bias",), "copy")] if bias else rules


def rules(cfg: QwenVLConfig) -> list[Rule]:
    """Every tensor of the checkpoint, in HF order (the model family's table)."""
    return cfg.family.rules(cfg)


def text_rules(cfg: QwenVLConfig) -> list[Rule]:
    """The decoder and the output head: q/k/v biases where `attention_bias`, o's where `o_proj_bias`, q/k norms
    where `qk_norm`."""
    t, layer, lm = cfg.text, "model.layers.{i}", ("model", "layers")
    out = [Rule("model.embed_tokens.weight", ("model", "embed_tokens"), "copy")]
    out += norm_rules(f"{layer}.input_layernorm", lm + ("input_layernorm",), False)
    out += norm_rules(f"{layer}.post_attention_layernorm", lm + ("post_attention_layernorm",), False)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        bias = t.o_proj_bias if name == "o_proj" else t.attention_bias
        out += linear_rules(f"{layer}.self_attn.{name}", lm + (name,), bias)
    if t.qk_norm:
        out += norm_rules(f"{layer}.self_attn.q_norm", lm + ("q_norm",), False)
        out += norm_rules(f"{layer}.self_attn.k_norm", lm + ("k_norm",), False)
    for name in ("gate_proj", "up_proj", "down_proj"):
        out += linear_rules(f"{layer}.mlp.{name}", lm + (name,), False)
    out += norm_rules("model.norm", ("model", "norm"), False)
    if not cfg.text.tie_word_embeddings:
        out += linear_rules("lm_head", ("lm_head",), False)
    return out


def vision_rules(cfg: QwenVLConfig) -> list[Rule]:
    """The vision tower of `stjax.models.vision`, whose norms and MLP the family chooses."""
    family = cfg.family
    block, vb = "visual.blocks.{i}", ("visual", "blocks")
    layer_norm = family.vision_norm == "layer_norm"  # LayerNorm has a bias, RMSNorm none
    out = [Rule("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch")]
    out += norm_rules(f"{block}.norm1", vb + ("norm1",), layer_norm)
    out += norm_rules(f"{block}.norm2", vb + ("norm2",), layer_norm)
    out += linear_rules(f"{block}.attn.qkv", vb + ("qkv",), True)
    out += linear_rules(f"{block}.attn.proj", vb + ("proj",), True)
    mlp = ("gate_proj", "up_proj", "down_proj") if family.gated_mlp else ("fc1", "fc2")
    for name in mlp:
        out += linear_rules(f"{block}.mlp.{name}", vb + (name,), True)
    out += norm_rules("visual.merger.ln_q", ("visual", "merger", "ln_q"), layer_norm)
    out += linear_rules("visual.merger.mlp.0", ("visual", "merger", "mlp_0"), True)
    out += linear_rules("visual.merger.mlp.2", ("visual", "merger", "mlp_2"), True)
    return out


def num_layers(cfg: QwenVLConfig, rule: Rule) -> int:
    if rule.path[:2] == ("visual", "deepstack_merger"):  # Qwen3-VL: one merger per DeepStack block
        return len(cfg.vision.deepstack_visual_indexes)
    return cfg.vision.depth if rule.path[0] == "visual" else cfg.text.num_layers


def hf_names(cfg: QwenVLConfig) -> list[str]:
    """All on-disk tensor names of a checkpoint of this config."""
    return [r.hf.format(i=i) for r in rules(cfg) for i in (range(num_layers(cfg, r)) if r.stacked else [0])]


def to_stjax(rule: Rule, tensor: np.ndarray) -> np.ndarray:
    """One HF tensor -> its stjax layout (one layer's slice for stacked parameters)."""
    if rule.kind == "linear":
        return tensor.T
    if rule.kind == "patch":
        return tensor.reshape(tensor.shape[0], -1).T
    return tensor


def to_hf(rule: Rule, array: np.ndarray, cfg: QwenVLConfig) -> np.ndarray:
    """Inverse of `to_stjax`."""
    if rule.kind == "linear":
        return array.T
    if rule.kind == "patch":
        v = cfg.vision
        return array.T.reshape(v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return array


def hf_tensors(cfg: QwenVLConfig, params: dict[tuple[str, ...], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor) for every tensor, from flat stjax params; one tensor at a time."""
    for rule in rules(cfg):
        array = params[rule.path]
        if rule.stacked:
            for i in range(array.shape[0]):
                yield rule.hf.format(i=i), np.ascontiguousarray(to_hf(rule, array[i], cfg))
        else:
            yield rule.hf, np.ascontiguousarray(to_hf(rule, array, cfg))
