"""GRPO's learner: the update and its batch.

The update batch holds each prompt once and its completions beside it: the prompt (vision
included) runs once into a KV cache that its G rows share, then each completion runs after it, as
decoding did (`completion_logps`). A prompt's forward and backward thus cost what one row's do,
not G rows'. Logits are made only at the positions that predict a completion token, exactly
`max_completion_length` per row (one compiled shape per prompt bucket), and the update is the SFT
stage's (`stjax.train.step.update`) with the loss of `stjax.train.rl.objective`.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stjax.models.inputs import ModelInputs
from stjax.models.text import KVCache
from stjax.sharding import batch_sharding, constrain_batch, on_mesh
from stjax.train.batch import global_batch
from stjax.train.config import TrainConfig
from stjax.train.loss import token_logps
from stjax.train.metrics import lm_head_flops_per_token, model_flops_per_token, vision_flops
from stjax.train.rl.objective import policy_loss
from stjax.train.step import OptimConfig, TrainState, split_trainable, update


@struct.dataclass
class GRPOBatch:
    """The update's rows, micro-batches stacked on a leading axis: every leaf is (accum, ...).

    A micro-batch holds p prompt copies and B = p * per_copy completion rows: rows
    [i * per_copy, (i + 1) * per_copy) continue prompt copy i (see `update_batch` for `per_copy`)."""

    inputs: ModelInputs  # the prompts (accum, p, L), left-padded, vision included
    starts: jax.Array  # (accum, p) M-RoPE position of each prompt's first completion token
    completions: jax.Array  # (accum, B, T) the sampled tokens (padding after each row's end)
    lengths: jax.Array  # (accum, B) tokens sampled per row, EOS included
    completion_mask: jax.Array  # (accum, B, T) 1 for the tokens that weigh in the loss
    advantages: jax.Array  # (accum, B)
    old_logp: jax.Array | None = None  # (accum, B, T) the policy before the first update
    ref_logp: jax.Array | None = None  # (accum, B, T) the reference model


@dataclass(frozen=True)
class LossSettings:
    """What the compiled update needs of `grpo.*` (hashable: a static argument)."""

    loss_type: str
    beta: float
    epsilon_low: float
    epsilon_high: float
    importance_sampling_level: str
    max_completion_length: int
    temperature: float
    chunk: int

    @classmethod
    def of(cls, cfg: TrainConfig) -> LossSettings:
        grpo = cfg.grpo
        return cls(
            grpo.loss_type,
            grpo.beta,
            grpo.epsilon,
            grpo.epsilon_high or grpo.epsilon,
            grpo.importance_sampling_level,
            grpo.max_completion_length,
            grpo.temperature,
            cfg.loss_chunk or grpo.max_completion_length,
        )


def completion_logps(
    model, micro: GRPOBatch, temperature: float, chunk: int, dropout_key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """(B, T) log-probs of the completion tokens under `logits / temperature` (TRL's), and the
    entropies there.

    Each prompt copy runs once into a KV cache; its `per_copy` rows share the cache and run their
    completions after it, at the positions the sampler gave them. Completion token j is predicted
    by the hidden state before it: the prompt's last for j = 0 (prompts are left-padded).
    """
    text, inputs = model.model, micro.inputs
    prompts, length = inputs.input_ids.shape
    rows, t = micro.completions.shape
    per_copy = rows // prompts
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    cache = KVCache.zeros(model.config.text, prompts, length + t, jnp.dtype(model.config.compute_dtype))
    prompt_hidden, cache = model.prefill(inputs, cache, keys[0], offset=0)
    shared = lambda x, axis=0: jnp.repeat(x, per_copy, axis=axis)
    cache = cache.replace(
        k=constrain_batch(shared(cache.k, 1), 1),
        v=constrain_batch(shared(cache.v, 1), 1),
        segments=shared(cache.segments),
    )
    steps = jnp.arange(t)
    live = (steps < micro.lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(shared(micro.starts)[:, None] + steps, (3, rows, t))
    hidden, _ = text.extend(text.embed(micro.completions), positions, live, cache, keys[1])
    hidden = jnp.concatenate([shared(prompt_hidden[:, -1:]), hidden[:, :-1]], axis=1)
    return token_logps(hidden / jnp.asarray(temperature, hidden.dtype), model.output_table(), micro.completions, chunk)


def grpo_micro_loss(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    frozen: nnx.State,
    micro: GRPOBatch,
    batch: GRPOBatch,
    key: jax.Array,
    settings: LossSettings,
) -> tuple[jax.Array, dict]:
    """One micro-batch's share of the step's loss (normalisers from the whole step), and metric sums."""
    model = nnx.merge(graphdef, params, frozen)
    logp, entropy = completion_logps(model, micro, settings.temperature, settings.chunk, key)
    tokens = jnp.sum(micro.completion_mask)
    bnpo = settings.loss_type == "bnpo"  # TRL's bnpo: each micro-batch's own tokens, then the micro-batches' mean
    loss, metrics = policy_loss(
        logp,
        micro.old_logp,
        micro.ref_logp,
        micro.advantages,
        micro.completion_mask,
        loss_type=settings.loss_type,
        beta=settings.beta,
        epsilon_low=settings.epsilon_low,
        epsilon_high=settings.epsilon_high,
        importance_sampling_level=settings.importance_sampling_level,
        max_completion_length=settings.max_completion_length,
        num_items_in_batch=tokens if bnpo else jnp.sum(batch.completion_mask),
        num_sequences=batch.advantages.size,
    )
    if bnpo:
        loss = loss / batch.advantages.shape[0]
    entropy = jnp.sum(entropy * micro.completion_mask) / jnp.maximum(tokens, 1.0)
    return loss, {**metrics, "entropy": entropy, "loss_tokens": tokens}


# The update's metrics TRL logs once per micro-batch (`GRPOTrainer._compute_loss`): a step logs their mean.
POLICY_METRICS = {
    "kl",
    "entropy",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "cispo_clip_ratio",
}


def grpo_update(
    graphdef: nnx.GraphDef, optim, settings: LossSettings, state: TrainState, frozen: nnx.State, batch: GRPOBatch
) -> tuple[TrainState, dict[str, jax.Array]]:
    state, metrics = update(
        graphdef, optim, state, frozen, batch, functools.partial(grpo_micro_loss, settings=settings)
    )
    tokens = jnp.maximum(metrics.pop("loss_tokens"), 1.0)
    for name in POLICY_METRICS & set(metrics):  # TRL logs each micro-batch's masked mean, then their mean
        metrics[name] = metrics[name] / batch.advantages.shape[0]
    prompt_tokens = jnp.sum(batch.inputs.attention_mask)
    completion_tokens = jnp.sum(jnp.arange(batch.completions.shape[-1]) < batch.lengths[..., None])
    metrics.update(
        tokens=prompt_tokens + completion_tokens,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        target_tokens=tokens,
    )
    if batch.inputs.vision is not None:
        metrics["patches"] = jnp.sum(batch.inputs.vision.frames.lengths)
    return state, metrics


def update_flops(model_cfg, batch: GRPOBatch, metrics: dict[str, float]) -> float:
    """Model FLOPs of one update as it is computed: each prompt copy once (vision included), each
    completion token after its prompt, logits at the completion tokens only."""
    head = lm_head_flops_per_token(model_cfg)
    length, t = batch.inputs.input_ids.shape[-1], batch.completions.shape[-1]
    return (
        (model_flops_per_token(model_cfg, length) - head) * metrics["prompt_tokens"]
        + model_flops_per_token(model_cfg, length + t) * metrics["completion_tokens"]
        + vision_flops(model_cfg, batch.inputs, metrics)
    )


def batch_logps(
    graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: GRPOBatch, settings: LossSettings
) -> jax.Array:
    """(accum, B, T) completion log-probs of the model (params, frozen), no dropout and no gradient:
    the old policy's or the reference's."""
    model = nnx.merge(graphdef, params, frozen)

    def one(micro: GRPOBatch) -> jax.Array:
        return completion_logps(model, micro, settings.temperature, settings.chunk)[0]

    return jax.lax.map(one, batch.replace(old_logp=None, ref_logp=None))


def update_function(graphdef: nnx.GraphDef, optim, settings: LossSettings, shardings: TrainState, mesh):
    """The jitted update (state, frozen, batch) -> (state, metrics): the state donated and kept where
    `shardings` puts it, the metrics replicated."""
    return jax.jit(
        functools.partial(grpo_update, graphdef, optim, settings),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


def logps_function(graphdef: nnx.GraphDef, settings: LossSettings):
    """The jitted `batch_logps` (params, frozen, batch) -> (accum, B, T) log-probs."""
    return jax.jit(functools.partial(batch_logps, graphdef, settings=settings))


def update_batch(
    prompts: ModelInputs,
    starts: np.ndarray,
    tokens: np.ndarray,
    lengths: np.ndarray,
    completion_mask: np.ndarray,
    advantages: np.ndarray,
    group_size: int,
    accumulation: int,
    shards: int,
) -> GRPOBatch:
    """This process's update rows as `accumulation` micro-batches (host arrays, like `host_batch`).

    A micro-batch's rows are split over `shards` devices (data x fsdp, all processes). Spans of
    per_copy = gcd(group_size, rows per device) adjacent rows share one prompt and one device, so
    each span gets a copy of its prompt: its forward is shared by the span without crossing devices.
    """
    rows = len(tokens)
    per_device = rows // accumulation * jax.process_count() // shards
    per_copy = math.gcd(group_size, per_device)
    copies = np.arange(0, rows, per_copy) // group_size  # the prompt of each span
    split = lambda x, axis=0: np.stack(np.split(x, accumulation, axis=axis))
    inputs = jax.tree.map(lambda x: split(x[copies]), prompts.replace(position_ids=None))
    return GRPOBatch(
        inputs=inputs.replace(position_ids=split(prompts.position_ids[:, copies], 1)),
        starts=split(starts[copies]),
        completions=split(tokens),
        lengths=split(lengths),
        completion_mask=split(completion_mask.astype(np.float32)),
        advantages=split(advantages.astype(np.float32)),
    )


def reference_params(model, state: TrainState, compute_dtype: str, lora: bool) -> nnx.State:
    """The reference model's trained part, placed like the policy's: with LoRA, the adapters off (zeros:
    the base); full fine-tuning, a frozen copy of the loaded model in the compute dtype (a resumed run's
    state has moved on)."""
    if lora:
        return jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))(state.params)
    return jax.jit(
        lambda p: jax.tree.map(lambda x: x.astype(compute_dtype), p),
        out_shardings=jax.tree.map(lambda x: x.sharding, state.params),
    )(split_trainable(model)[1])


class Learner:
    """The update on the training mesh: lays the rollout's completions out as an update batch
    (`update_batch`) and runs the compiled optimizer update on it."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        optim: OptimConfig,
        settings: LossSettings,
        state: TrainState,
        frozen: nnx.State,
        mesh: Mesh,
        group_size: int,
        accumulation: int,
    ):
        self.mesh, self.frozen, self.group_size, self.accumulation = mesh, frozen, group_size, accumulation
        self.update_fn = on_mesh(
            update_function(graphdef, optim, settings, jax.tree.map(lambda x: x.sharding, state), mesh), mesh
        )

    def batch(
        self,
        prompts: ModelInputs,
        starts: np.ndarray,
        tokens: np.ndarray,
        lengths: np.ndarray,
        completion_mask: np.ndarray,
        advantages: np.ndarray,
    ) -> GRPOBatch:
        """This process's rows placed as one global update batch on the training mesh."""
        micro = len(tokens) // self.accumulation * jax.process_count()  # rows of a micro-batch, all processes
        shards = micro // batch_sharding(self.mesh, (micro,)).shard_shape((micro,))[0]  # as `global_batch` places
        host = update_batch(
            prompts, starts, tokens, lengths, completion_mask, advantages, self.group_size, self.accumulation, shards
        )
        return global_batch(host, self.mesh)

    def update(self, state: TrainState, batch: GRPOBatch, iterations: int) -> tuple[TrainState, dict[str, float]]:
        """`iterations` optimizer updates on the batch: the last one's metrics, with the policy metrics
        TRL logs per micro-batch (`POLICY_METRICS`) averaged over every update's micro-batches."""
        policy = []
        for _ in range(iterations):
            state, metrics = self.update_fn(state, self.frozen, batch)
            policy.append({k: v for k, v in metrics.items() if k in POLICY_METRICS})
        metrics = {k: float(v) for k, v in metrics.items()}
        return state, metrics | {k: float(np.mean([float(m[k]) for m in policy])) for k in policy[0]}
