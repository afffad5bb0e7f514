"""The train state and its compiled update, shared by the SFT and GRPO stages: AdamW with warmup +
cosine, global-norm clipping and gradient accumulation over micro-batches inside one jitted function
(`update`, for any micro-batch loss; `train_step` is SFT's).

The trainable parameters (all of them, or only the LoRA adapters) are kept in `master_dtype`
(float32 by default, the optimizer's copy); the model casts them to its compute dtype where it uses
them. Frozen parameters are passed to the step beside the state and never updated. A step whose loss
or gradient is not finite leaves the state unchanged and reports `skipped = 1`, so one bad batch
cannot poison the weights.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from stjax.models.inputs import ModelInputs
from stjax.models.layers import LoRAParam
from stjax.settings import ConfigError, check_fields, setting
from stjax.train.loss import chunked_sft_loss, loss_totals, sft_loss


@dataclass(frozen=True)
class OptimConfig:
    """Defaults follow the release's SFT recipe (lr 8e-5, cosine, warmup 0.1, max grad norm 0.3).
    `total_steps` is the schedule's length (a training run sets it to its own length when 0)."""

    learning_rate: float = setting(8e-5, "peak learning rate", least=0.0)
    total_steps: int = setting(0, "the schedule's length; 0: the run's own", least=0)
    warmup_ratio: float = setting(0.1, "share of the steps warming up linearly from 0, in [0, 1]", least=0.0)
    weight_decay: float = setting(0.0, "AdamW's decoupled weight decay")
    max_grad_norm: float = setting(0.3, "gradients clipped to this global norm", least=0.0)
    adam_beta1: float = setting(0.9, "AdamW's beta1")
    adam_beta2: float = setting(0.999, "AdamW's beta2")
    adam_epsilon: float = setting(1e-8, "AdamW's epsilon")

    def check(self) -> None:
        check_fields(self, "optim.")
        if self.warmup_ratio > 1:
            raise ConfigError(f"optim.warmup_ratio={self.warmup_ratio} must be in [0, 1]")

    def schedule(self) -> optax.Schedule:
        """Linear warmup from 0 over ceil(warmup_ratio * total_steps) steps (transformers' Trainer's
        `get_warmup_steps`), then cosine decay to 0: `get_cosine_schedule_with_warmup`."""
        warmup = math.ceil(self.total_steps * self.warmup_ratio)
        if warmup == 0:
            return optax.cosine_decay_schedule(self.learning_rate, max(self.total_steps, 1))
        return optax.warmup_cosine_decay_schedule(
            0.0, self.learning_rate, warmup, max(self.total_steps, warmup + 1), end_value=0.0
        )

    def optimizer(self) -> optax.GradientTransformation:
        """optax AdamW on the schedule; clipping is done by `apply` with the step's gradient norm."""
        return optax.adamw(
            self.schedule(), self.adam_beta1, self.adam_beta2, self.adam_epsilon, weight_decay=self.weight_decay
        )

    def init(self, params: nnx.State) -> optax.OptState:
        return self.optimizer().init(params)

    def apply(
        self, grads: nnx.State, state: optax.OptState, params: nnx.State, grad_norm: jax.Array
    ) -> tuple[nnx.State, optax.OptState]:
        """Global-norm clipping with the norm the step already computed (optax's clip_by_global_norm
        would compute it again), then AdamW and the update, all element-wise maps XLA fuses."""
        clip = jnp.where(grad_norm < self.max_grad_norm, 1.0, self.max_grad_norm / grad_norm)
        grads = jax.tree.map(lambda g: g * clip.astype(g.dtype), grads)
        updates, state = self.optimizer().update(grads, state, params)
        return optax.apply_updates(params, updates), state


@struct.dataclass
class TrainState:
    step: jax.Array
    params: nnx.State  # master copy, `master_dtype`
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data (checkpointable); step k uses fold_in(rng, k) for dropout


@struct.dataclass
class Batch:
    """Micro-batches stacked on a leading axis: every leaf is (accum, ...)."""

    inputs: ModelInputs
    loss_mask: jax.Array  # (accum, B, L) aligned with input_ids
    # (accum, B, K): the positions that predict a target (`batch.loss_positions`); None: logits everywhere
    loss_positions: jax.Array | None = None


def split_trainable(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trainable, frozen): the LoRA adapters when the model has them, else every parameter."""
    trainable = LoRAParam if model.config.lora_rank else nnx.Param
    return nnx.split(model, trainable, ...)


def init_state(trainable: nnx.State, optim: OptimConfig, master_dtype=jnp.float32, seed: int = 0) -> TrainState:
    """A fresh state; the master parameters are copies (the step donates its state)."""
    params = jax.tree.map(lambda x: jnp.array(x, master_dtype, copy=True), trainable)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optim.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def train_state_shardings(
    abstract: TrainState, params_sharding: nnx.State, optim: OptimConfig, mesh: jax.sharding.Mesh
) -> TrainState:
    """Where a train state lives: optimizer moments sharded like their parameters, the rest replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_sharding = optax.tree_map_params(
        optim.optimizer(),
        lambda _, s: s,
        abstract.opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated,
    )
    return TrainState(step=replicated, params=params_sharding, opt_state=opt_sharding, rng=replicated)


def loss_fn(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    inputs: ModelInputs,
    loss_mask: jax.Array,
    average: str,
    dropout_key: jax.Array | None = None,
    loss_chunk: int = 0,
    loss_positions: jax.Array | None = None,
    totals: jax.Array | None = None,
) -> jax.Array:
    """The SFT loss; `loss_chunk` > 0 makes the logits that many positions at a time, `loss_positions`
    only at the positions that predict a target (`chunked_sft_loss`); `totals` are the whole step's
    target and sequence counts (`loss.loss_totals`), default this batch's."""
    model = nnx.merge(graphdef, params, frozen)
    if loss_chunk or loss_positions is not None:
        hidden = model.hidden_states(inputs, dropout_key)
        return chunked_sft_loss(
            hidden,
            model.output_table(),
            inputs.input_ids,
            loss_mask,
            average,
            loss_chunk or hidden.shape[1],
            loss_positions,
            totals,
        )
    return sft_loss(model.forward(inputs, dropout_key), inputs.input_ids, loss_mask, average, totals)


# (graphdef, params, frozen, micro-batch, whole step's batch, dropout key) -> (loss, metrics to sum).
# A micro-batch's loss is its share of the step's loss: the step sums them, so normalisers that span
# the step (target tokens, sequences) come from the whole batch, never from one micro-batch.
MicroLoss = Callable[[nnx.GraphDef, nnx.State, nnx.State, Any, Any, jax.Array], tuple[jax.Array, dict]]


def sft_micro_loss(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    micro: Batch,
    batch: Batch,
    key: jax.Array,
    average: str = "token",
    loss_chunk: int = 512,
) -> tuple[jax.Array, dict]:
    loss = loss_fn(
        graphdef,
        params,
        frozen,
        micro.inputs,
        micro.loss_mask,
        average,
        key,
        loss_chunk,
        micro.loss_positions,
        loss_totals(batch.loss_mask),
    )
    return loss, {}


def update(
    graphdef: nnx.GraphDef, optim: OptimConfig, state: TrainState, frozen: nnx.State, batch: Any, micro_loss: MicroLoss
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from the gradient of the sum of the micro-batches' losses (every leaf of
    `batch` is (accum, ...)); the state is left as it was when the loss or gradient is not finite."""
    grad_fn = jax.value_and_grad(micro_loss, argnums=1, has_aux=True)
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    count = jax.tree.leaves(batch)[0].shape[0]

    def grads_of(index):
        micro = jax.tree.map(lambda x: x[index], batch)
        key = jax.random.fold_in(step_key, index)  # unused (and compiled away) without LoRA dropout
        return grad_fn(graphdef, state.params, frozen, micro, batch, key)

    # The first micro-batch starts the sums (no zero-filled copy of the gradients); the rest add in.
    (loss, aux), grads = grads_of(0)
    if count > 1:

        def accumulate(carry, index):
            return jax.tree.map(jnp.add, carry, grads_of(index)), None

        ((loss, aux), grads), _ = jax.lax.scan(accumulate, ((loss, aux), grads), jnp.arange(1, count))
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(_):
        return optim.apply(grads, state.opt_state, state.params, grad_norm)

    # A branch rather than a select: a select would hold both the new and the old copies at once.
    params, opt_state = jax.lax.cond(finite, apply, lambda _: (state.params, state.opt_state), None)
    new_state = TrainState(
        step=state.step + finite.astype(jnp.int32), params=params, opt_state=opt_state, rng=state.rng
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "learning_rate": optim.schedule()(state.step),
        "skipped": 1 - finite.astype(jnp.int32),
        **aux,
    }
    return new_state, metrics


def train_step(
    graphdef: nnx.GraphDef,
    optim: OptimConfig,
    state: TrainState,
    frozen: nnx.State,
    batch: Batch,
    average: str = "token",
    loss_chunk: int = 512,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SFT update (jit it with `static_argnums=(0, 1)` and `static_argnames=("average", "loss_chunk")`;
    see `compiled_train_step`). Every target token of the step weighs the same under the token
    average, however the step is split into micro-batches and processes."""
    micro_loss = functools.partial(sft_micro_loss, average=average, loss_chunk=loss_chunk)
    state, metrics = update(graphdef, optim, state, frozen, batch, micro_loss)
    metrics.update(tokens=jnp.sum(batch.inputs.attention_mask), target_tokens=jnp.sum(batch.loss_mask))
    if batch.inputs.vision is not None:
        metrics["patches"] = jnp.sum(batch.inputs.vision.frames.lengths)  # real patches, for MFU
    return state, metrics


compiled_train_step = jax.jit(
    train_step, static_argnums=(0, 1), static_argnames=("average", "loss_chunk"), donate_argnums=2
)
