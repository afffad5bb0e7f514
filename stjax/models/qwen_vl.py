"""Qwen2-VL / Qwen2.5-VL for conditional generation: vision tower + decoder + LM head.

Two entry points:
- `model(input_ids, attention_mask=..., pixel_values_videos=..., video_grid_thw=..., ...)`, the
  transformers call convention, for interactive use: it prepares the inputs on the host, runs a
  compiled forward (cached per shape bucket; the weights are arguments) and returns the logits.
- `model.forward(inputs)`, traceable, for use inside the training step and the sampler, which
  receive `ModelInputs` already prepared by the data pipeline.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stjax.models.config import QwenVLConfig
from stjax.models.inputs import ModelInputs, cast_floats, prepare_inputs
from stjax.models.layers import Linear
from stjax.models.text import KVCache
from stjax.sharding import batch_mesh_axes, constrain_batch


class QwenVLForConditionalGeneration(nnx.Module):
    def __init__(self, config: QwenVLConfig, rngs: nnx.Rngs):
        self.config = config
        self.visual = config.family.vision_tower(config, rngs)
        self.model = config.family.text_model(config, rngs)
        t = config.text
        self.lm_head = (
            None
            if t.tie_word_embeddings
            else Linear(t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, **config.linear_init(rngs))
        )

    def vision_slots(self, inputs: ModelInputs, dtype) -> jax.Array:
        """The vision tower's output row feeding each text slot (B, L, width); meaningful at the image and
        video pads only."""
        vis = inputs.vision
        if vis.patches.ndim == 3:  # per-sample layout: one vision pass per batch row, rows split like the batch
            axes = batch_mesh_axes(vis.patches.shape[0])
            features = jax.vmap(self.visual, spmd_axis_name=axes or None)(vis).astype(dtype)  # (B, M, width)
            features = constrain_batch(features)
            return jnp.take_along_axis(features, vis.token_index[..., None], axis=1)
        return self.visual(vis).astype(dtype)[vis.token_index]

    def embed(self, inputs: ModelInputs) -> tuple[jax.Array, jax.Array | None]:
        """Token embeddings with the vision features in the image / video pad slots, and the DeepStack
        features (K, B, L, hidden), zero outside the pad slots, for a tower that has K DeepStack blocks
        (Qwen3-VL: its rows are each merged token's feature then its K DeepStack features side by side);
        None without vision or DeepStack."""
        x = self.model.embed(inputs.input_ids)
        if inputs.vision is None:
            return x, None
        b, l, hidden = x.shape
        mask = inputs.vision.token_mask[..., None]
        slots = self.vision_slots(inputs, x.dtype)
        x = jnp.where(mask, slots[..., :hidden], x)
        if slots.shape[-1] == hidden:
            return x, None
        deepstack = jnp.where(mask, slots[..., hidden:], 0)
        return x, jnp.moveaxis(deepstack.reshape(b, l, -1, hidden), 2, 0)

    def hidden_states(self, inputs: ModelInputs, dropout_key: jax.Array | None = None) -> jax.Array:
        """Final-norm hidden states (B, L, hidden) of the decoder (`dropout_key`: LoRA dropout on)."""
        x, deepstack = self.embed(inputs)
        return self.model(
            x,
            inputs.position_ids,
            inputs.attention_mask,
            dropout_key,
            right_padded=inputs.right_padded,
            deepstack=deepstack,
        )

    def prefill(
        self, inputs: ModelInputs, cache: KVCache, dropout_key: jax.Array | None = None, offset: int | None = None
    ) -> tuple[jax.Array, KVCache]:
        """The prompts' hidden states and the cache after them (see `TextModel.extend`)."""
        x, deepstack = self.embed(inputs)
        return self.model.extend(
            x, inputs.position_ids, inputs.attention_mask, cache, dropout_key, offset=offset, deepstack=deepstack
        )

    def output_table(self) -> jax.Array:
        """The output projection as a (vocab, hidden) table in the compute dtype: the tied embedding
        or lm_head's kernel transposed (also what losses that make logits a slice at a time use)."""
        if self.lm_head is None:
            return self.model.embed_tokens[...].astype(self.config.compute_dtype)
        return self.lm_head.kernel[...].astype(self.config.compute_dtype).T

    def logits(self, hidden: jax.Array) -> jax.Array:
        return constrain_batch(jnp.einsum("bld,vd->blv", hidden, self.output_table()).astype(jnp.float32))

    def forward(self, inputs: ModelInputs, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (B, L, vocab) in float32."""
        return self.logits(self.hidden_states(inputs, dropout_key))

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        pixel_values=None,
        image_grid_thw=None,
        pixel_values_videos=None,
        video_grid_thw=None,
        second_per_grid_ts=None,
        position_ids=None,
    ) -> jax.Array:
        """transformers-style forward on host arrays; returns float32 logits (B, L, vocab)."""
        to_np = lambda x: None if x is None else np.asarray(x)
        input_ids = np.asarray(input_ids)
        length = input_ids.shape[-1]
        inputs = prepare_inputs(
            self.config,
            input_ids,
            to_np(attention_mask),
            to_np(pixel_values),
            to_np(image_grid_thw),
            to_np(pixel_values_videos),
            to_np(video_grid_thw),
            to_np(second_per_grid_ts),
            to_np(position_ids),
        )
        return compiled_forward(self, inputs)[:, :length]


def compiled_forward(model: QwenVLForConditionalGeneration, inputs: ModelInputs) -> jax.Array:
    """`model.forward` through one compiled program per (architecture, shape bucket).

    The weights are traced arguments, so new weights never recompile; sharded weights and inputs
    (see `stjax.sharding`) give a sharded computation.
    """
    inputs = cast_floats(inputs, model.config.compute_dtype)
    graphdef, state = nnx.split(model)
    return _forward(graphdef, state, inputs)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef: nnx.GraphDef, state: nnx.State, inputs: ModelInputs) -> jax.Array:
    return nnx.merge(graphdef, state).forward(inputs)


def init_model(config: QwenVLConfig, seed: int = 0) -> QwenVLForConditionalGeneration:
    """A randomly initialised model (tests, demos, training from scratch)."""
    return QwenVLForConditionalGeneration(config, nnx.Rngs(seed))


def abstract_model(config: QwenVLConfig) -> QwenVLForConditionalGeneration:
    """The model with shapes and dtypes only (no memory), to be filled from a checkpoint."""
    return nnx.eval_shape(lambda: QwenVLForConditionalGeneration(config, nnx.Rngs(0)))
