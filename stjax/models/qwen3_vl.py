"""Qwen3-VL (transformers' `qwen3_vl`, the dense models): Qwen2-VL's vision blocks (LayerNorm, an
fc1/fc2 MLP, attention within frames) with a biased patch embedding and a learned position table
resampled to each image, and DeepStack: the outputs of a few vision blocks (`deepstack_visual_indexes`),
each through its own merger, are added to the hidden states of the first decoder layers at the vision
slots. The decoder is Qwen3's (q/k RMSNorm, no q/k/v biases, interleaved M-RoPE), set by the config.

The tower returns each merged token's feature and its DeepStack features side by side in one
(M, (1 + K) * hidden) array, so the shared code that places vision features into text slots serves
both; `embed_deepstack` splits them again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from stjax.models.config import QwenVLConfig
from stjax.models.inputs import ModelInputs, VisionInputs
from stjax.models.layers import Linear, scan_layers, stack_layers
from stjax.models.qwen_vl import QwenVLForConditionalGeneration
from stjax.models.text import KVCache
from stjax.models.vision import PatchMerger, VisionBlock, VisionTower, unconstrained


class Qwen3VisionTower(VisionTower):
    def __init__(self, cfg: QwenVLConfig, rngs: nnx.Rngs):
        super().__init__(cfg, rngs)
        v = cfg.vision
        kw = dict(std=cfg.initializer_range, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype, rngs=rngs)
        self.patch_embed = Linear(v.patch_dim, v.hidden_size, ("vision_patch", "vision_embed"), bias=True, **kw)
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.pos_embed = nnx.Param(init(rngs.params(), (v.num_position_embeddings, v.hidden_size), cfg.param_dtype),
                                   axes=("vision_positions", "vision_embed"))
        indexes = v.deepstack_visual_indexes
        self.deepstack_merger = stack_layers(lambda r: PatchMerger(cfg, r, postshuffle_norm=True), len(indexes), rngs)
        # Block i's output is kept in slot deepstack_slot[i] (slot K, never read, for the other blocks).
        self.deepstack_slot = tuple(indexes.index(i) if i in indexes else len(indexes) for i in range(v.depth))
        self.deepstack_count = len(indexes)

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
        graphdef, mergers = nnx.split(self.deepstack_merger)
        deepstack = jax.vmap(lambda state, h: nnx.merge(graphdef, state)(h))(mergers, kept[:-1])  # (K, M, out)
        return jnp.concatenate([self.merger(x), *deepstack], axis=-1)


class Qwen3VLForConditionalGeneration(QwenVLForConditionalGeneration):
    def __init__(self, config: QwenVLConfig, rngs: nnx.Rngs):
        super().__init__(config, rngs)
        self.visual = Qwen3VisionTower(config, rngs)

    def embed_deepstack(self, inputs: ModelInputs) -> tuple[jax.Array, jax.Array | None]:
        """Token embeddings with the vision features in the pad slots, and the DeepStack features
        (K, B, L, hidden), zero outside the pad slots (None without vision)."""
        x = self.model.embed(inputs.input_ids)
        if inputs.vision is None:
            return x, None
        b, l, hidden = x.shape
        slots = jnp.where(inputs.vision.token_mask[..., None], self.vision_slots(inputs, x.dtype), 0)
        x = jnp.where(inputs.vision.token_mask[..., None], slots[..., :hidden], x)
        return x, jnp.moveaxis(slots[..., hidden:].reshape(b, l, -1, hidden), 2, 0)

    def embed(self, inputs: ModelInputs) -> jax.Array:
        return self.embed_deepstack(inputs)[0]

    def hidden_states(self, inputs: ModelInputs, dropout_key: jax.Array | None = None) -> jax.Array:
        x, deepstack = self.embed_deepstack(inputs)
        return self.model(x, inputs.position_ids, inputs.attention_mask, dropout_key,
                          right_padded=inputs.right_padded, deepstack=deepstack)

    def prefill(self, inputs: ModelInputs, cache: KVCache, dropout_key: jax.Array | None = None,
                offset: int | None = None) -> tuple[jax.Array, KVCache]:
        x, deepstack = self.embed_deepstack(inputs)
        return self.model.extend(x, inputs.position_ids, inputs.attention_mask, cache, dropout_key, offset=offset,
                                 deepstack=deepstack)
