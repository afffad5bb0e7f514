"""Qwen3-VL's host-side rules (NumPy only): its config.json, its M-RoPE position ids and the taps that
resample the learned vision position table to each image's grid.

Qwen3-VL differs from Qwen2.5-VL on the host in three ways: the hub config nests `text_config` and
`vision_config`; a video's frames are separate vision blocks in the prompt (a `<t seconds>` timestamp and
vision start/end tokens around each temporal patch), so each block is positioned as an image of one frame
and the text after a block resumes at start + max(h, w) (not at the block's largest position + 1); and
the vision tower adds a learned (side x side) position table, bilinearly resampled (align_corners=True).
"""

from __future__ import annotations

from typing import Any

import numpy as np

MODEL_TYPE = "qwen3_vl"


def config_from_hf_dict(cls, d: dict[str, Any], **policy: Any):
    """A `QwenVLConfig` from Qwen3-VL's nested config.json (`text_config`, `vision_config`)."""
    from stjax.models.config import ConfigError, text_config, token_ids, vision_config

    t, v = d.get("text_config"), d.get("vision_config")
    if not isinstance(t, dict) or not isinstance(v, dict):
        raise ConfigError("qwen3_vl config needs the mappings text_config and vision_config")
    try:
        # transformers' Qwen3-VL always interleaves the M-RoPE streams
        text = text_config(d, t, rope_theta=500000.0, mrope_section=(24, 20, 20), max_position_embeddings=128000,
                           explicit_head_dim=t.get("head_dim", 128), qk_norm=True,
                           attention_bias=t.get("attention_bias", False), mrope_interleaved=True)
        vision = vision_config(v, hidden_act="gelu_pytorch_tanh", patch_size=16,
                               num_position_embeddings=v.get("num_position_embeddings", 2304),
                               deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))))
    except KeyError as e:
        raise ConfigError(f"qwen3_vl config is missing the field {e.args[0]!r}") from None
    side = int(vision.num_position_embeddings ** 0.5)
    if side * side != vision.num_position_embeddings:
        raise ConfigError(f"num_position_embeddings={vision.num_position_embeddings} is not a square grid")
    if any(not 0 <= i < vision.depth for i in vision.deepstack_visual_indexes):
        raise ConfigError(f"deepstack_visual_indexes {list(vision.deepstack_visual_indexes)} must be blocks "
                          f"of the {vision.depth}-block vision tower")
    if len(vision.deepstack_visual_indexes) > text.num_layers:
        raise ConfigError("more deepstack_visual_indexes than decoder layers")
    return cls(model_type=MODEL_TYPE, text=text, vision=vision,
               initializer_range=t.get("initializer_range", 0.02), extra=d, **token_ids(d, t), **policy)


def config_to_hf_dict(cfg) -> dict[str, Any]:
    """Qwen3-VL's hub layout (nested), which transformers' `Qwen3VLConfig` reads."""
    from stjax.models.config import text_hf_dict

    t, v = cfg.text, cfg.vision
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "model_type": MODEL_TYPE,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id,
        "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id,
        "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": cfg.param_dtype,
        "text_config": {
            "model_type": "qwen3_vl_text",
            **text_hf_dict(t),
            "head_dim": t.head_dim,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section),
                             "mrope_interleaved": True},
            "attention_bias": t.attention_bias,
            "initializer_range": cfg.initializer_range,
            "bos_token_id": cfg.bos_token_id,
            "eos_token_id": cfg.eos_token_id,
        },
        "vision_config": {
            "model_type": "qwen3_vl_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "hidden_act": v.hidden_act,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_channels": v.in_channels,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
            "initializer_range": cfg.initializer_range,
        },
    }


def rope_index(input_ids: np.ndarray, image_token_id: int, video_token_id: int, merge: int,
               image_grid_thw: np.ndarray | None, video_grid_thw: np.ndarray | None,
               attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's M-RoPE position ids (3, B, L) and deltas (B,), as transformers' `get_rope_index`.

    Each run of image pads takes the next image grid and each run of video pads the next temporal
    patch of the videos (the processor writes every temporal patch as its own block). A block starting
    at `cur` with merged grid (t, h, w) gets `cur + (time, row, col)`; the text after it resumes at
    `cur + max(h, w)`. Padding positions are 0.
    """
    batch, length = input_ids.shape
    images = np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw, np.int64)
    videos = np.zeros((0, 3), np.int64) if video_grid_thw is None else np.asarray(video_grid_thw, np.int64)
    frames = np.repeat(videos, videos[:, 0], axis=0)
    frames[:, 0] = 1
    grids = {1: iter(images), 2: iter(frames)}
    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch,), np.int64)
    for b in range(batch):
        real = attention_mask[b] == 1
        ids = input_ids[b][real]
        kinds = np.where(ids == image_token_id, 1, np.where(ids == video_token_id, 2, 0))
        starts = np.flatnonzero(np.diff(kinds, prepend=-1))
        ends = np.append(starts[1:], len(ids))
        chunks, cur = [], 0
        for kind, start, end in zip(kinds[starts], starts, ends):
            if kind == 0:
                chunks.append(np.broadcast_to(np.arange(end - start) + cur, (3, end - start)))
                cur += end - start
                continue
            t, h, w = next(grids[kind])
            h, w = h // merge, w // merge
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            chunks.append(np.stack([tt, hh, ww]).reshape(3, -1) + cur)
            cur += max(h, w)
        positions = np.concatenate(chunks, axis=1) if chunks else np.zeros((3, 0), np.int64)
        position_ids[:, b, real] = positions
        deltas[b] = (positions.max() + 1 if positions.size else 0) - len(ids)
    return position_ids, deltas


def position_embedding_taps(rotary_positions: np.ndarray, grid_hw: np.ndarray, side: int
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) rows of the flattened (side x side) position table and their (N, 4) float32 weights:
    the bilinear resampling (align_corners=True) of the table to each patch's image grid, as
    transformers' `get_vision_interpolation_indices_and_weights`. `rotary_positions` (N, 2) holds each
    patch's (row, col); `grid_hw` (N, 2) the (h, w) patch grid of its image."""

    def axis(index: np.ndarray, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
        weights = np.maximum(1 - np.abs(src[:, None] - floor[:, None] - np.arange(2, dtype=np.float32)), 0)
        return taps, weights.astype(np.float32)

    h_taps, h_weights = axis(rotary_positions[:, 0], grid_hw[:, 0])
    w_taps, w_weights = axis(rotary_positions[:, 1], grid_hw[:, 1])
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weight = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return index.astype(np.int32), weight


def weight_rules(cfg) -> list:
    """Every tensor of a Qwen3-VL checkpoint (on-disk names as `stjax.models.weights.canonical_name` gives
    them: `model.*` for the decoder, `visual.*` for the tower), in HF order."""
    from stjax.models.weights import Rule, decoder_rules, linear_rules, norm_rules

    out = decoder_rules(cfg)
    block, vb = "visual.blocks.{i}", ("visual", "blocks")
    out.append(Rule("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch"))
    out.append(Rule("visual.patch_embed.proj.bias", ("visual", "patch_embed", "bias"), "copy"))
    out.append(Rule("visual.pos_embed.weight", ("visual", "pos_embed"), "copy"))
    out += norm_rules(f"{block}.norm1", vb + ("norm1",), True)
    out += norm_rules(f"{block}.norm2", vb + ("norm2",), True)
    out += linear_rules(f"{block}.attn.qkv", vb + ("qkv",), True)
    out += linear_rules(f"{block}.attn.proj", vb + ("proj",), True)
    out += linear_rules(f"{block}.mlp.linear_fc1", vb + ("fc1",), True)
    out += linear_rules(f"{block}.mlp.linear_fc2", vb + ("fc2",), True)
    for hf, path in (("visual.merger", ("visual", "merger")),
                     ("visual.deepstack_merger_list.{i}", ("visual", "deepstack_merger"))):
        out += norm_rules(f"{hf}.norm", path + ("ln_q",), True)
        out += linear_rules(f"{hf}.linear_fc1", path + ("mlp_0",), True)
        out += linear_rules(f"{hf}.linear_fc2", path + ("mlp_2",), True)
    return out


def disk_name(name: str) -> str:
    """The name a Qwen3-VL checkpoint on the hub gives a tensor (`model.language_model.*`, `model.visual.*`)."""
    if name.startswith("model."):
        return "model.language_model." + name[len("model."):]
    return "model." + name if name.startswith("visual.") else name
