"""Qwen2-VL: a LayerNorm vision tower with a fc1 / fc2 MLP whose every block attends within frames;
video time positions are frame-pair indices. Most of `Family`'s defaults are this family's rules."""

from __future__ import annotations

from stjax.models.config import VisionConfig, hf_patch_fields, number, patch_fields
from stjax.models.families import Family, register


class Qwen2VL(Family):
    model_type = "qwen2_vl"
    architecture = "Qwen2VLForConditionalGeneration"
    tiny_preset = "tiny-qwen2-vl"

    def vision_config(self, d: dict) -> VisionConfig:
        return VisionConfig(
            depth=d["depth"],
            hidden_size=d["embed_dim"],
            num_heads=d["num_heads"],
            intermediate_size=int(d["embed_dim"] * d.get("mlp_ratio", 4)),
            out_hidden_size=d["hidden_size"],
            hidden_act=d.get("hidden_act", "quick_gelu"),
            **patch_fields(d),
        )

    def hf_vision_config(self, v: VisionConfig) -> dict:
        return {
            "depth": v.depth,
            "embed_dim": v.hidden_size,
            "hidden_size": v.out_hidden_size,
            "hidden_act": v.hidden_act,
            "mlp_ratio": number(v.intermediate_size / v.hidden_size),
            "num_heads": v.num_heads,
            **hf_patch_fields(v, "in_chans"),
        }


register(Qwen2VL())
