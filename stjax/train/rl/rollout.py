"""GRPO's rollout: the actor's current weights placed for decoding, G completions per prompt.

The rollout decodes on its own mesh (`grpo.rollout_mesh`, default the training mesh): an actor
trained under FSDP would gather its weights at every decoding step, so the weights are resharded
once per step onto a mesh laid out for decoding (e.g. tensor=-1). It also scores completions
without a gradient (the old policy's and the reference's log-probs), where the update batch lies:
on the training mesh.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from stjax.models.inputs import ModelInputs
from stjax.sampling.sampler import SamplingConfig, next_positions, sample
from stjax.sharding import model_shardings, on_mesh
from stjax.train.batch import agree_shapes, global_inputs, local_rows, micro_batch_inputs, place_rows, step_shapes
from stjax.train.config import GRPOSection
from stjax.train.rl.learner import GRPOBatch, LossSettings, logps_function
from stjax.train.step import TrainState


def left_padded(batch: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """The loader's right-padded text rows padded to `length`, each row's text moved to the right
    end (the sampler's prompt layout)."""
    out = dict(batch)
    shifts = length - batch["attention_mask"].sum(axis=1)
    for key, axis in (("input_ids", 0), ("attention_mask", 0), ("loss_mask", 0), ("position_ids", 1)):
        x = batch[key]
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])], constant_values=int(key == "position_ids"))
        out[key] = np.stack([np.roll(row, s, axis=-1) for row, s in zip(np.moveaxis(x, axis, 0), shifts)], axis=axis)
    return out


def prompt_inputs(model_cfg, prompts: dict[str, np.ndarray]) -> tuple[ModelInputs, np.ndarray]:
    """This process's prompts as the sampler and the update take them (host arrays): left-padded to
    the length every process agrees on, vision prepared; and each prompt's first completion
    position (`next_positions`)."""
    length, _, sizes = agree_shapes(*step_shapes(model_cfg, [prompts]))
    inputs, _ = micro_batch_inputs(model_cfg, left_padded(prompts, length), length, sizes)
    return inputs, next_positions(inputs.attention_mask, inputs.position_ids, length)


def rollout_sampling(options: GRPOSection, model_cfg, eos_ids: tuple[int, ...], pad_id: int = 0) -> SamplingConfig:
    """The rollout's sampler: grpo.num_generations completions per prompt of at most max_completion_length
    tokens, at grpo.temperature / top_k / top_p; the vision placeholders never sampled."""
    return SamplingConfig(
        max_new_tokens=options.max_completion_length,
        temperature=options.temperature,
        top_k=options.top_k,
        top_p=options.top_p,
        num_samples=options.num_generations,
        eos_ids=eos_ids,
        pad_id=pad_id,
        suppress_ids=(model_cfg.image_token_id, model_cfg.video_token_id),
    )


@functools.partial(jax.jit, static_argnums=3)
def completion_keys(rng: jax.Array, step: int, sample_ids: np.ndarray, group_size: int) -> jax.Array:
    """(P * G,) raw keys, one per completion: the run's key data `rng` folded with the step, the
    prompt's sample id and the completion's index in its group."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 1), step)
    split = lambda i: jax.random.split(jax.random.fold_in(key, i), group_size)
    return jax.random.key_data(jax.vmap(split)(sample_ids).reshape(-1))


@dataclass
class Completions:
    """This process's completion rows, G adjacent rows per prompt (host arrays)."""

    tokens: np.ndarray  # (N, T) the sampled tokens, padding after each row's end
    lengths: np.ndarray  # (N,) tokens sampled per row, EOS included

    def ended(self, eos_ids: Sequence[int]) -> np.ndarray:
        """(N,) True where a completion ends with an EOS token (False: cut at the length limit)."""
        last = self.tokens[np.arange(len(self.tokens)), np.maximum(self.lengths - 1, 0)]
        return (self.lengths > 0) & np.isin(last, eos_ids)


class Rollout:
    """Decoding (`generate`) and scoring without a gradient (`logps`) for the actor being trained.

    `model` gives the structure the sampler merges (trained and frozen weights as one state);
    `graphdef` and `frozen` are the training split (`split_trainable`) the train state's params fit.
    """

    def __init__(
        self,
        model: nnx.Module,
        graphdef: nnx.GraphDef,
        frozen: nnx.State,
        sampling: SamplingConfig,
        settings: LossSettings,
        train_mesh: Mesh,
        mesh: Mesh | None = None,
    ):
        self.graphdef, self.frozen, self.sampling = graphdef, frozen, sampling
        self.compute_dtype = model.config.compute_dtype
        self.mesh = mesh or train_mesh
        self.decode_graphdef = nnx.split(model)[0]
        self.shardings = None if mesh is None else model_shardings(model, mesh)
        self.logps_fn = on_mesh(logps_function(graphdef, settings), train_mesh)

    def weights(self, params: nnx.State) -> nnx.State:
        """The actor's weights for decoding: the trained ones in the compute dtype with the frozen
        ones, resharded onto the rollout mesh when it is not the training mesh."""
        params = jax.tree.map(
            lambda x: x.astype(self.compute_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
        weights = nnx.split(nnx.merge(self.graphdef, params, self.frozen))[1]
        return weights if self.shardings is None else jax.device_put(weights, self.shardings)

    def generate(
        self, state: TrainState, prompts: ModelInputs, starts: np.ndarray, sample_ids: Sequence[str], step: int
    ) -> Completions:
        """G completions of each of this process's prompts (from `prompt_inputs`).

        Each completion has its own key: the run's (checkpointed), the step, the prompt's sample id
        and its index in the group. A resumed run samples the same, and so does another layout of
        the batch over processes and devices.
        """
        length = prompts.input_ids.shape[1]
        inputs, start = global_inputs(prompts, self.mesh), place_rows(starts, self.mesh)
        ids = np.asarray([zlib.crc32(i.encode()) & 0x7FFFFFFF for i in sample_ids], np.int32)
        # made from this process's copy of the run's key, then placed with the rows
        keys = np.asarray(completion_keys(state.rng.addressable_data(0), step, ids, self.sampling.num_samples))
        keys = jax.random.wrap_key_data(place_rows(keys, self.mesh))
        out = on_mesh(sample, self.mesh)(
            self.decode_graphdef, self.sampling, self.weights(state.params), inputs, jnp.int32(length - 1), start, keys
        )
        rows = len(prompts.input_ids) * self.sampling.num_samples
        return Completions(local_rows(out.tokens, rows), local_rows(out.lengths, rows))

    def logps(self, params: nnx.State, batch: GRPOBatch) -> jax.Array:
        """(accum, B, T) log-probs of the batch's completions under `params` (the old policy's or the
        reference's), no gradient, on the training mesh where the batch lies."""
        return self.logps_fn(params, self.frozen, batch)
