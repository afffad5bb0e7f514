"""Qwen3-VL (transformers' `qwen3_vl`, the dense models) as a model family.

The vision tower is Qwen2-VL's (LayerNorm, an fc1/fc2 MLP, attention within frames) with a biased patch
embedding, a learned position table resampled to each image (`qwen3_vl_host.position_embedding_taps`),
and DeepStack: the outputs of a few blocks (`deepstack_visual_indexes`), each through its own merger, are
added to the hidden states of the first decoder layers at the vision slots. The tower returns each merged
token's feature and its DeepStack features side by side in one (M, (1 + K) * hidden) array, which the
model splits (`QwenVLForConditionalGeneration.embed`). The decoder is Qwen3's (q/k RMSNorm, no q/k/v
biases, an explicit head_dim, interleaved M-RoPE), set by `TextConfig` flags. Videos are laid out one
timestamped block per temporal patch (`media_rules`, `stjax.data.qwen3_vl`); the hub config nests
`text_config` and `vision_config`, and the hub names tensors `model.language_model.*`, `model.visual.*`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stjax.models import qwen3_vl_host
from stjax.models.config import (
    ConfigError,
    QwenVLConfig,
    TextConfig,
    VisionConfig,
    hf_tower_fields,
    qwen2_text_config,
    text_fields,
    tower_fields,
)
from stjax.models.families import Family, register
from stjax.models.inputs import VisionInputs
from stjax.models.layers import scan_layers, stack_layers
from stjax.models.vision import PatchMerger, VisionBlock, VisionTower, unconstrained
from stjax.models.weights import Rule, linear_rules, norm_rules, text_rules

TEXT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "tie_word_embeddings",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)


class Qwen3VisionTower(VisionTower):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        v = cfg.vision
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.pos_embed = nnx.Param(
            init(rngs.params(), (v.num_position_embeddings, v.hidden_size), cfg.param_dtype),
            axes=("vision_positions", "vision_embed"),
        )
        indexes = v.deepstack_visual_indexes
        self.deepstack_merger = (
            stack_layers(lambda r: PatchMerger(cfg, r, postshuffle_norm=True), len(indexes), rngs) if indexes else None
        )
        # As transformers: the k-th DeepStack block in block order (each block once, however often it is listed)
        # feeds decoder layer k, through the merger listed at that block's first index.
        blocks = sorted(set(indexes))
        mergers = tuple(indexes.index(i) for i in blocks)
        self.deepstack_mergers = None if mergers == tuple(range(len(indexes))) else mergers  # None: as stacked
        # Block i's output is kept in slot deepstack_slot[i] (slot K, never read, for the other blocks).
        self.deepstack_slot = tuple(blocks.index(i) if i in blocks else len(blocks) for i in range(v.depth))
        self.deepstack_count = len(blocks)

    def __call__(self, vis: VisionInputs) -> jax.Array:
        """(N / 4, (1 + K) * out_hidden): each merged token's feature, then its K DeepStack features."""
        x = self.patch_embed(vis.patches)
        table = self.pos_embed[...].astype(x.dtype)
        x = x + jnp.sum(table[vis.pos_embed_index] * vis.pos_embed_weight[..., None].astype(x.dtype), axis=1)
        cos, sin = self.rotary(vis.rotary_positions)
        kept = jnp.zeros((self.deepstack_count + 1,) + x.shape, x.dtype)

        def step(block: VisionBlock, carry, slot: jax.Array):
            x, kept = carry
            x = block(unconstrained(x), cos, sin, vis.frames)
            return x, jax.lax.dynamic_update_index_in_dim(kept, x, slot, 0)

        x, kept = scan_layers(self.blocks, (x, kept), step, xs=jnp.asarray(self.deepstack_slot), remat=self.remat)
        if self.deepstack_merger is None:
            return self.merger(x)
        graphdef, mergers = nnx.split(self.deepstack_merger)
        if self.deepstack_mergers is not None:  # blocks listed out of order or more than once
            mergers = jax.tree.map(lambda a: a[np.asarray(self.deepstack_mergers)], mergers)
        deepstack = jax.vmap(lambda state, h: nnx.merge(graphdef, state)(h))(mergers, kept[:-1])  # (K, M, out)
        return jnp.concatenate([self.merger(x), *deepstack], axis=-1)


class Qwen3VL(Family):
    model_type = "qwen3_vl"
    architecture = "Qwen3VLForConditionalGeneration"
    tiny_preset = "tiny-qwen3-vl"
    media_rules = "stjax.data.qwen3_vl:Qwen3VLMedia"
    rope_index = staticmethod(qwen3_vl_host.rope_index)  # each temporal patch of a video a one-frame image
    hf_processor_class = "Qwen3VLProcessor"
    patch_bias = True

    def text_config(self, d: dict) -> TextConfig:
        t = text_fields(d)
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "mrope"):
            raise ConfigError(f"rope_type {kind!r}: Qwen3-VL is supported with its default rotary embedding only")
        defaults = {
            "rope_theta": rope.get("rope_theta", t.get("rope_theta", 500000.0)),
            "mrope_section": tuple(rope.get("mrope_section", (24, 20, 20))),
            "max_position_embeddings": t.get("max_position_embeddings", 128000),
        }
        # transformers' Qwen3-VL always interleaves the M-RoPE streams, and ties the output head to the
        # embeddings by the top-level tie_word_embeddings alone (text_config's is not read)
        return dataclasses.replace(
            qwen2_text_config(d),
            **defaults,
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            explicit_head_dim=t.get("head_dim", 128),
            qk_norm=True,
            attention_bias=t.get("attention_bias", False),
            o_proj_bias=t.get("attention_bias", False),
            mrope_interleaved=True,
        )

    def vision_config(self, d: dict) -> VisionConfig:
        v = VisionConfig(
            **tower_fields(d, hidden_act="gelu_pytorch_tanh", patch_size=16),
            num_position_embeddings=d.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(d.get("deepstack_visual_indexes", (8, 16, 24))),
        )
        side = int(v.num_position_embeddings**0.5)
        if side * side != v.num_position_embeddings:
            raise ConfigError(f"num_position_embeddings={v.num_position_embeddings} is not a square grid")
        if any(not 0 <= i < v.depth for i in v.deepstack_visual_indexes):
            raise ConfigError(
                f"deepstack_visual_indexes {list(v.deepstack_visual_indexes)} must be blocks "
                f"of the {v.depth}-block vision tower"
            )
        return v

    def hf_vision_config(self, v: VisionConfig) -> dict:
        return {
            **hf_tower_fields(v, "in_channels"),
            "num_position_embeddings": v.num_position_embeddings,
            "deepstack_visual_indexes": list(v.deepstack_visual_indexes),
        }

    def hf_config(self, cfg: QwenVLConfig, flat: dict) -> dict:
        """The hub's nested layout, which transformers' `Qwen3VLConfig` reads."""
        t = cfg.text
        text = {
            "model_type": "qwen3_vl_text",
            **{k: flat[k] for k in TEXT_KEYS},
            "head_dim": t.head_dim,
            "attention_bias": t.attention_bias,
            "rope_scaling": {"rope_type": "default", "mrope_section": list(t.mrope_section), "mrope_interleaved": True},
        }
        top = (
            "architectures",
            "model_type",
            "image_token_id",
            "video_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
            "tie_word_embeddings",
            "torch_dtype",
        )
        vision = {**flat["vision_config"], "model_type": "qwen3_vl_vision", "initializer_range": cfg.initializer_range}
        return {**{k: flat[k] for k in top}, "text_config": text, "vision_config": vision}

    def rules(self, cfg: QwenVLConfig) -> list[Rule]:
        block, vb = "visual.blocks.{i}", ("visual", "blocks")
        out = text_rules(cfg)
        out.append(Rule("visual.patch_embed.proj.weight", ("visual", "patch_embed", "kernel"), "patch"))
        out.append(Rule("visual.patch_embed.proj.bias", ("visual", "patch_embed", "bias"), "copy"))
        out.append(Rule("visual.pos_embed.weight", ("visual", "pos_embed"), "copy"))
        out += norm_rules(f"{block}.norm1", vb + ("norm1",), True)
        out += norm_rules(f"{block}.norm2", vb + ("norm2",), True)
        out += linear_rules(f"{block}.attn.qkv", vb + ("qkv",), True)
        out += linear_rules(f"{block}.attn.proj", vb + ("proj",), True)
        out += linear_rules(f"{block}.mlp.linear_fc1", vb + ("fc1",), True)
        out += linear_rules(f"{block}.mlp.linear_fc2", vb + ("fc2",), True)
        mergers = [("visual.merger", ("visual", "merger"))]
        if cfg.vision.deepstack_visual_indexes:
            mergers.append(("visual.deepstack_merger_list.{i}", ("visual", "deepstack_merger")))
        for hf, path in mergers:
            out += norm_rules(f"{hf}.norm", path + ("ln_q",), True)
            out += linear_rules(f"{hf}.linear_fc1", path + ("mlp_0",), True)
            out += linear_rules(f"{hf}.linear_fc2", path + ("mlp_2",), True)
        return out

    def hf_name(self, name: str) -> str:
        """The hub's names: `model.language_model.*` for the decoder, `model.visual.*` for the tower."""
        if name.startswith("model."):
            return "model.language_model." + name[len("model.") :]
        return "model." + name if name.startswith("visual.") else name

    def vision_tower(self, cfg: QwenVLConfig, rngs: nnx.Rngs) -> nnx.Module:
        return Qwen3VisionTower(cfg, rngs)

    def patch_inputs(self, v: VisionConfig, rotary_positions: np.ndarray, grid_hw: np.ndarray) -> dict:
        index, weight = qwen3_vl_host.position_embedding_taps(
            rotary_positions, grid_hw, int(v.num_position_embeddings**0.5)
        )
        return {"pos_embed_index": index, "pos_embed_weight": weight}

    def vision_flops_per_patch(self, cfg: QwenVLConfig, group_size: int) -> float:
        """The default tower's count plus the DeepStack mergers (each once per merged token)."""
        v = cfg.vision
        deepstack = len(set(v.deepstack_visual_indexes)) * v.merger_params / v.spatial_merge_size**2
        return super().vision_flops_per_patch(cfg, group_size) + 6 * deepstack


register(Qwen3VL())
