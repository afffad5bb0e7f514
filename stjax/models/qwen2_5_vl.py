"""Qwen2.5-VL: an RMSNorm vision tower with a gated SiLU MLP that attends within windows of merged
tokens except in its `fullatt_block_indexes` blocks; video time positions are scaled by
tokens_per_second * second_per_grid_t."""

from __future__ import annotations

import numpy as np

from stjax.models.config import VisionConfig, hf_tower_fields, tower_fields
from stjax.models.families import Family, register
from stjax.models.rope import window_order


class Qwen2_5VL(Family):
    model_type = "qwen2_5_vl"
    architecture = "Qwen2_5_VLForConditionalGeneration"
    tiny_preset = "tiny-qwen2.5-vl"
    hf_processor_class = "Qwen2_5_VLProcessor"
    vision_norm = "rms_norm"
    gated_mlp = True

    def full_attention(self, v: VisionConfig) -> tuple[bool, ...]:
        return tuple(i in v.fullatt_block_indexes for i in range(v.depth))

    def vision_config(self, d: dict) -> VisionConfig:
        return VisionConfig(
            **tower_fields(d, hidden_act="silu", patch_size=14),
            window_size=d.get("window_size", 112),
            fullatt_block_indexes=tuple(d.get("fullatt_block_indexes", ())),
            tokens_per_second=d.get("tokens_per_second", 2),
        )

    def hf_vision_config(self, v: VisionConfig) -> dict:
        return {
            **hf_tower_fields(v, "in_chans"),
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
        }

    def video_tokens_per_second(self, v: VisionConfig) -> float | None:
        return v.tokens_per_second

    def processing_order(self, v: VisionConfig, grids: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Window order (`rope.window_order`), window lengths in patches."""
        order, window_lengths = window_order(grids, v.spatial_merge_size, v.window_merged)
        return order, window_lengths * v.spatial_merge_size**2


register(Qwen2_5VL())
