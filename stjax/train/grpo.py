"""GRPO: reinforcement learning from verifiable rewards after the SFT cold start, on the shared loop.

One step, as data (TRL's `GRPOTrainer` names; roles as Tunix names them):

    P prompts (this process: its share; a group never leaves its process)
      --rollout: the actor's current weights, placed for decoding, G completions per prompt
         (`stjax.sampling.sampler.sample`: one shared prefill, weights as arguments)--> P*G rows
      --detokenize + rewards (host, `stjax.train.rewards`)--> rewards (P*G, F)
      --group_advantages--> advantages (P*G,)
      --[old log-probs: the actor before the first update, when num_iterations > 1]
      --[reference log-probs: the base (LoRA adapters off) or a frozen copy, when beta > 0]
      --num_iterations x (policy_loss over the completion tokens, gradients, clip, AdamW)

The update batch holds each prompt once and its completions beside it: the prompt (vision
included) runs once into a KV cache that its G rows share, then each completion runs after it, as
decoding did (`completion_logps`). A prompt's forward and backward thus cost what one row's do,
not G rows'. Logits are made only at the positions that predict a completion token, exactly
`max_completion_length` per row (one compiled shape per prompt bucket), and the update is the SFT
stage's (`stjax.train.step.update`).

`group_advantages` and `policy_loss` are TRL 1.16's formulas (`GRPOTrainer._compute_loss` and the
advantage computation), tested against a PyTorch transcription of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from stjax.data.formats import Sample
from stjax.io import AppendLog
from stjax.models.inputs import ModelInputs
from stjax.models.text import KVCache
from stjax.sampling.sampler import SamplingConfig, next_positions, sample
from stjax.sharding import batch_sharding, constrain_batch, make_mesh, model_shardings, on_mesh, parse_mesh
from stjax.train import config, distributed, loop, rewards, sft
from stjax.train.batch import (agree_shapes, global_batch, global_inputs, local_rows, micro_batch_inputs, place_rows,
                               step_shapes)
from stjax.train.config import TrainConfig
from stjax.train.loss import token_logps
from stjax.train.metrics import drop_steps_after, lm_head_flops_per_token, mfu, model_flops_per_token, vision_flops
from stjax.train.step import TrainState, split_trainable, update

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo")


# ---------------------------------------------------------------- the formulas


def group_advantages(rewards, group_size: int, scale_rewards: str = "group") -> jax.Array:
    """(r - mean_G(r)) / (std_G(r) + 1e-4) per completion, groups of `group_size` adjacent rows.

    std with Bessel's correction, as TRL; `scale_rewards`: "group" (each group's std), "batch" (the
    whole batch's std, still centred per group) or "none" (centred only). NaN rewards ("does not
    apply" for every function) are left out of the statistics and get advantage 0; a group of equal
    rewards gets 0, never NaN.
    """
    r = jnp.asarray(rewards, jnp.float32)
    groups = r.reshape(-1, group_size)
    mean = jnp.repeat(jnp.nanmean(groups, axis=1), group_size)
    if scale_rewards in ("group", "none"):
        std = jnp.repeat(jnp.nanstd(groups, axis=1, ddof=1), group_size)
    elif scale_rewards == "batch":
        std = jnp.broadcast_to(jnp.nanstd(r, ddof=1), r.shape)
    else:
        raise ValueError(f"scale_rewards={scale_rewards!r} is not one of group, batch, none")
    advantages = r - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return jnp.nan_to_num(advantages, nan=0.0)


def policy_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None, advantages: jax.Array,
                mask: jax.Array, *, loss_type: str = "grpo", beta: float = 0.1, epsilon_low: float = 0.2,
                epsilon_high: float = 0.2, importance_sampling_level: str = "token", max_completion_length: int = 256,
                num_items_in_batch: jax.Array | float | None = None, num_sequences: jax.Array | float | None = None
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO loss over (N, T) completion log-probs, and its metrics (masked means).

    `old_logp` None: the policy before this update is the current one (one update per rollout
    batch): the ratio is exp(logp - stop_gradient(logp)) = 1 with the policy gradient as its
    gradient. `ref_logp` is used when `beta` > 0. `mask` marks the completion tokens.
    Normalisers (TRL's): grpo, the token mean of each sequence, then the mean over sequences; bnpo,
    the mean over the batch's tokens; dr_grpo, the sum over (sequences x max_completion_length);
    dapo and cispo, the sum over `num_items_in_batch` tokens. Pass `num_items_in_batch` (tokens)
    and `num_sequences` of the whole step when this batch is one micro-batch of it; default: this
    batch's own.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {', '.join(LOSS_TYPES)}")
    mask = mask.astype(jnp.float32)
    advantages = advantages[:, None] if advantages.ndim == 1 else advantages
    old_logp = jax.lax.stop_gradient(logp) if old_logp is None else old_logp
    log_ratio = logp - old_logp
    per_row = jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    if importance_sampling_level == "token":
        log_weights = log_ratio
    elif importance_sampling_level == "sequence":
        log_weights = (jnp.sum(log_ratio * mask, axis=-1) / per_row)[:, None]
    else:
        raise ValueError(f"importance_sampling_level={importance_sampling_level!r} is not token or sequence")
    ratio = jnp.exp(log_weights)

    if loss_type == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(ratio, epsilon_high)) * advantages * logp
    else:
        clipped = jnp.clip(ratio, 1 - epsilon_low, 1 + epsilon_high)
        per_token = -jnp.minimum(ratio * advantages, clipped * advantages)
    metrics = {}
    if beta != 0.0:
        delta = ref_logp - logp
        kl = jnp.exp(delta) - delta - 1
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(kl, mask)

    tokens = jnp.sum(mask) if num_items_in_batch is None else num_items_in_batch
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    weighted = per_token * mask
    if loss_type == "grpo":
        loss = jnp.sum(jnp.sum(weighted, axis=-1) / per_row) / sequences
    elif loss_type == "dr_grpo":
        loss = jnp.sum(weighted) / (sequences * max_completion_length)
    else:  # bnpo, dapo, cispo
        loss = jnp.sum(weighted) / jnp.maximum(tokens, 1.0)

    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = _masked_mean((ratio > epsilon_high) & (advantages > 0), mask)
    else:
        low = (ratio < 1 - epsilon_low) & (advantages < 0)
        high = (ratio > 1 + epsilon_high) & (advantages > 0)
        metrics.update({"clip_ratio/low_mean": _masked_mean(low, mask), "clip_ratio/high_mean": _masked_mean(high, mask),
                        "clip_ratio/region_mean": _masked_mean(low | high, mask)})
    return loss, metrics


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """TRL's masked mean: over the tokens, or over the sequences for one value per sequence."""
    x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        return jnp.mean(x)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---------------------------------------------------------------- the update


@struct.dataclass
class GRPOBatch:
    """The update's rows, micro-batches stacked on a leading axis: every leaf is (accum, ...).

    A micro-batch holds p prompt copies and B = p * run completion rows: rows [i * run, (i + 1) * run)
    continue prompt copy i (see `update_batch` for `run`)."""

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
        g = cfg.grpo
        return cls(g.loss_type, g.beta, g.epsilon, g.epsilon_high or g.epsilon, g.importance_sampling_level,
                   g.max_completion_length, g.temperature, cfg.loss_chunk or g.max_completion_length)


def completion_logps(model, micro: GRPOBatch, temperature: float, chunk: int,
                     dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, T) log-probs of the completion tokens under `logits / temperature` (TRL's), and the
    entropies there.

    Each prompt copy runs once into a KV cache; its `run` rows share the cache and run their
    completions after it, at the positions the sampler gave them. Completion token j is predicted
    by the hidden state before it: the prompt's last for j = 0 (prompts are left-padded).
    """
    text, inputs = model.model, micro.inputs
    prompts, length = inputs.input_ids.shape
    rows, t = micro.completions.shape
    run = rows // prompts
    keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
    cache = KVCache.zeros(model.config.text, prompts, length + t, jnp.dtype(model.config.compute_dtype))
    prompt_hidden, cache = text.extend(model.embed(inputs), inputs.position_ids, inputs.attention_mask, cache, keys[0],
                                       offset=0)
    shared = lambda x, axis=0: jnp.repeat(x, run, axis=axis)
    cache = cache.replace(k=constrain_batch(shared(cache.k, 1), 1), v=constrain_batch(shared(cache.v, 1), 1),
                          segments=shared(cache.segments))
    steps = jnp.arange(t)
    live = (steps < micro.lengths[:, None]).astype(jnp.int32)
    positions = jnp.broadcast_to(shared(micro.starts)[:, None] + steps, (3, rows, t))
    hidden, _ = text.extend(text.embed(micro.completions), positions, live, cache, keys[1])
    hidden = jnp.concatenate([shared(prompt_hidden[:, -1:]), hidden[:, :-1]], axis=1)
    return token_logps(hidden / jnp.asarray(temperature, hidden.dtype), model.output_table(), micro.completions, chunk)


def grpo_micro_loss(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, micro: GRPOBatch,
                    batch: GRPOBatch, key: jax.Array, settings: LossSettings) -> tuple[jax.Array, dict]:
    """One micro-batch's share of the step's loss (normalisers from the whole step), and metric sums."""
    model = nnx.merge(graphdef, params, frozen)
    logp, entropy = completion_logps(model, micro, settings.temperature, settings.chunk, key)
    tokens = jnp.sum(micro.completion_mask)
    bnpo = settings.loss_type == "bnpo"  # TRL's bnpo: each micro-batch's own tokens, then the micro-batches' mean
    loss, metrics = policy_loss(
        logp, micro.old_logp, micro.ref_logp, micro.advantages, micro.completion_mask, loss_type=settings.loss_type,
        beta=settings.beta, epsilon_low=settings.epsilon_low, epsilon_high=settings.epsilon_high,
        importance_sampling_level=settings.importance_sampling_level,
        max_completion_length=settings.max_completion_length,
        num_items_in_batch=tokens if bnpo else jnp.sum(batch.completion_mask), num_sequences=batch.advantages.size)
    if bnpo:
        loss = loss / batch.advantages.shape[0]
    sums = {k: v * tokens for k, v in metrics.items()}  # token-weighted over the micro-batches
    return loss, {**sums, "entropy": jnp.sum(entropy * micro.completion_mask), "loss_tokens": tokens}


def grpo_update(graphdef: nnx.GraphDef, optim, settings: LossSettings, state: TrainState, frozen: nnx.State,
                batch: GRPOBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    state, metrics = update(graphdef, optim, state, frozen, batch,
                            functools.partial(grpo_micro_loss, settings=settings))
    tokens = jnp.maximum(metrics.pop("loss_tokens"), 1.0)
    for name in [k for k in metrics if k == "entropy" or k == "kl" or "clip_ratio" in k]:
        metrics[name] = metrics[name] / tokens
    prompt_tokens = jnp.sum(batch.inputs.attention_mask)
    completion_tokens = jnp.sum(jnp.arange(batch.completions.shape[-1]) < batch.lengths[..., None])
    metrics.update(tokens=prompt_tokens + completion_tokens, prompt_tokens=prompt_tokens,
                   completion_tokens=completion_tokens, target_tokens=tokens)
    if batch.inputs.vision is not None:
        metrics["patches"] = jnp.sum(batch.inputs.vision.frames.lengths)
    return state, metrics


def update_flops(model_cfg, batch: GRPOBatch, metrics: dict[str, float]) -> float:
    """Model FLOPs of one update as it is computed: each prompt copy once (vision included), each
    completion token after its prompt, logits at the completion tokens only."""
    head = lm_head_flops_per_token(model_cfg)
    length, t = batch.inputs.input_ids.shape[-1], batch.completions.shape[-1]
    return ((model_flops_per_token(model_cfg, length) - head) * metrics["prompt_tokens"]
            + model_flops_per_token(model_cfg, length + t) * metrics["completion_tokens"]
            + vision_flops(model_cfg, batch.inputs, metrics))


def batch_logps(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: GRPOBatch,
                settings: LossSettings) -> jax.Array:
    """(accum, B, T) completion log-probs of the model (params, frozen), no dropout and no gradient:
    the old policy's or the reference's."""
    model = nnx.merge(graphdef, params, frozen)

    def one(micro: GRPOBatch) -> jax.Array:
        return completion_logps(model, micro, settings.temperature, settings.chunk)[0]

    return jax.lax.map(one, batch.replace(old_logp=None, ref_logp=None))


def update_function(graphdef: nnx.GraphDef, optim, settings: LossSettings, shardings: TrainState, mesh):
    """The jitted update (state, frozen, batch) -> (state, metrics): the state donated and kept where
    `shardings` puts it, the metrics replicated."""
    return jax.jit(functools.partial(grpo_update, graphdef, optim, settings),
                   out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)


def logps_function(graphdef: nnx.GraphDef, settings: LossSettings):
    """The jitted `batch_logps` (params, frozen, batch) -> (accum, B, T) log-probs."""
    return jax.jit(functools.partial(batch_logps, graphdef, settings=settings))


# ---------------------------------------------------------------- host side: prompts, completions


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


@functools.partial(jax.jit, static_argnums=3)
def completion_keys(rng: jax.Array, step: int, sample_ids: np.ndarray, group_size: int) -> jax.Array:
    """(P * G,) raw keys, one per completion: the run's key data `rng` folded with the step, the
    prompt's sample id and the completion's index in its group."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(rng), 1), step)
    split = lambda i: jax.random.split(jax.random.fold_in(key, i), group_size)
    return jax.random.key_data(jax.vmap(split)(sample_ids).reshape(-1))


def ended(tokens: np.ndarray, lengths: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """(N,) True where a completion ends with an EOS token (False: cut at the length limit)."""
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    return (lengths > 0) & np.isin(last, eos_ids)


def update_batch(prompts: ModelInputs, starts: np.ndarray, tokens: np.ndarray, lengths: np.ndarray,
                 completion_mask: np.ndarray, advantages: np.ndarray, group_size: int, accumulation: int,
                 shards: int) -> GRPOBatch:
    """This process's update rows as `accumulation` micro-batches (host arrays, like `host_batch`).

    A micro-batch's rows are split over `shards` devices (data x fsdp, all processes). Runs of
    run = gcd(group_size, rows per device) adjacent rows share one prompt and one device, so each
    run gets a copy of its prompt: its forward is shared by the run without crossing devices.
    """
    rows = len(tokens)
    per_device = rows // accumulation * jax.process_count() // shards
    run = math.gcd(group_size, per_device)
    copies = np.arange(0, rows, run) // group_size  # the prompt of each run
    split = lambda x, axis=0: np.stack(np.split(x, accumulation, axis=axis))
    inputs = jax.tree.map(lambda x: split(x[copies]), prompts.replace(position_ids=None))
    return GRPOBatch(inputs=inputs.replace(position_ids=split(prompts.position_ids[:, copies], 1)),
                     starts=split(starts[copies]), completions=split(tokens), lengths=split(lengths),
                     completion_mask=split(completion_mask.astype(np.float32)),
                     advantages=split(advantages.astype(np.float32)))


def _global_table(local: np.ndarray) -> np.ndarray:
    """Rows of every process, in process order (each process's own with one process)."""
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


# ---------------------------------------------------------------- the stage


class GRPO:
    template = "grpo"

    def samples_per_step(self, cfg: TrainConfig) -> int:
        return cfg.batch_size // cfg.grpo.num_generations

    def loader_batch(self, cfg: TrainConfig) -> int:
        return self.samples_per_step(cfg)

    def updates_per_step(self, cfg: TrainConfig) -> int:
        return cfg.grpo.num_iterations

    def setup(self, run: loop.Run, model, state: TrainState) -> None:
        cfg, g = run.cfg, run.cfg.grpo
        self.reward_funcs = [rewards.resolve(name, g.accuracy_rule) for name in g.reward_funcs]  # checked by config
        self.reward_weights = np.asarray(g.reward_weights or [1.0] * len(g.reward_funcs), np.float64)
        self.settings = LossSettings.of(cfg)
        tok = run.processor.tokenizer
        self.tokenizer = tok
        self.eos_ids = tuple(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        self.sampling = SamplingConfig(
            max_new_tokens=g.max_completion_length, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p,
            num_samples=g.num_generations, eos_ids=self.eos_ids, pad_id=tok.pad_token_id,
            suppress_ids=(run.model_cfg.image_token_id, run.model_cfg.video_token_id))
        self.rollout_mesh = make_mesh(parse_mesh(g.rollout_mesh)) if g.rollout_mesh else run.mesh
        self.rollout_graphdef = nnx.split(model)[0]
        self.rollout_shardings = model_shardings(model, self.rollout_mesh) if g.rollout_mesh else None
        self.reference = None
        if g.beta:  # LoRA: the base with the adapters off (zeros); full fine-tuning: a frozen copy
            compute = run.model_cfg.compute_dtype
            if run.model_cfg.lora_rank:
                self.reference = jax.jit(lambda p: jax.tree.map(jnp.zeros_like, p))(state.params)
            else:  # of the loaded model (a resumed run's state has moved on), sharded like the policy
                self.reference = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p),
                                         out_shardings=jax.tree.map(lambda x: x.sharding, state.params)
                                         )(split_trainable(model)[1])
        self.update_fn = on_mesh(update_function(run.graphdef, run.optim, self.settings,
                                                 jax.tree.map(lambda x: x.sharding, state), run.mesh), run.mesh)
        self.logps_fn = on_mesh(logps_function(run.graphdef, self.settings), run.mesh)
        self.completions_log = run.out / "completions.jsonl"
        if jax.process_index() == 0:  # a resumed run logs the steps after its checkpoint again
            drop_steps_after(self.completions_log, run.start_step)

    def rollout_weights(self, run: loop.Run, state: TrainState) -> nnx.State:
        """The actor's weights for decoding: the trained ones in the compute dtype with the frozen
        ones, on the rollout mesh when it differs from the training mesh."""
        compute = run.model_cfg.compute_dtype
        params = jax.tree.map(lambda x: x.astype(compute) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                              state.params)
        weights = nnx.split(nnx.merge(run.graphdef, params, run.frozen))[1]
        if self.rollout_shardings is not None:
            weights = jax.device_put(weights, self.rollout_shardings)
        return weights

    def rollout(self, run: loop.Run, state: TrainState, prompts: ModelInputs, starts: np.ndarray,
                samples: Sequence[Sample], step: int):
        """G completions of each of this process's prompts (from `prompt_inputs`): (tokens, lengths,
        logp_model) of its rows.

        Each completion has its own key: the run's (checkpointed), the step, the prompt's sample id
        and its index in the group. A resumed run samples the same, and so does another layout of
        the batch over processes and devices.
        """
        length = prompts.input_ids.shape[1]
        inputs, start = global_inputs(prompts, self.rollout_mesh), place_rows(starts, self.rollout_mesh)
        ids = np.asarray([zlib.crc32(s.id.encode()) & 0x7FFFFFFF for s in samples], np.int32)
        # made from this process's copy of the run's key, then placed with the rows
        keys = np.asarray(completion_keys(state.rng.addressable_data(0), step, ids, self.sampling.num_samples))
        keys = jax.random.wrap_key_data(place_rows(keys, self.rollout_mesh))
        weights = self.rollout_weights(run, state)
        out = on_mesh(sample, self.rollout_mesh)(self.rollout_graphdef, self.sampling, weights, inputs,
                                                 jnp.int32(length - 1), start, keys)
        rows = len(prompts.input_ids) * self.sampling.num_samples
        return local_rows(out.tokens, rows), local_rows(out.lengths, rows), local_rows(out.logp_model, rows)

    def step(self, run: loop.Run, state: TrainState, data: Iterator, step: int) -> tuple[TrainState, dict[str, float]]:
        g = run.cfg.grpo
        prompts = next(data)
        samples = [run.samples[i] for i in prompts.pop("sample_id")]
        began = time.perf_counter()
        prompts, starts = prompt_inputs(run.model_cfg, prompts)
        tokens, lengths, _ = self.rollout(run, state, prompts, starts, samples, step)
        rollout_time = time.perf_counter() - began

        began = time.perf_counter()
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(tokens, lengths)]
        groups = [s for s in samples for _ in range(g.num_generations)]
        prompt_texts = [s.question for s in groups]
        scores = rewards.score(self.reward_funcs, prompt_texts, texts, groups)
        truncated = ~ended(tokens, lengths, self.eos_ids)
        diagnostics = np.stack([rewards.accuracy(texts, [s.answer for s in groups], [s.options for s in groups]),
                                rewards.format_reward(texts), lengths, truncated], axis=1)
        table = _global_table(np.concatenate([scores.values, diagnostics], axis=1))
        letters = {letter: k for k, letter in enumerate("ABCD")}  # the collapse watch: think length, answer letters
        shape = _global_table(np.array([[rewards.think_words(t), letters.get(rewards.answer_letter(t), -1)]
                                        for t in texts], np.float64))
        errors, invalid = _global_table(np.stack([scores.errors, scores.invalid])[None]).sum(axis=0)
        per_func = table[:, : len(self.reward_funcs)]
        total = np.nansum(per_func * self.reward_weights, axis=1)
        total[np.isnan(per_func).all(axis=1)] = np.nan
        rewards.check(g.reward_funcs, errors, invalid, scores.problems, total, step + 1)
        advantages_all = np.asarray(group_advantages(total, g.num_generations, g.scale_rewards))
        mine = slice(jax.process_index() * len(texts), (jax.process_index() + 1) * len(texts))
        scoring_time = time.perf_counter() - began

        began = time.perf_counter()
        completion_mask = np.arange(tokens.shape[1]) < lengths[:, None]
        if g.mask_truncated_completions:  # a completion cut at the length limit weighs nothing
            completion_mask &= ~truncated[:, None]
        # rows of a micro-batch, all processes
        micro = len(tokens) // run.cfg.gradient_accumulation_steps * jax.process_count()
        shards = micro // batch_sharding(run.mesh, (micro,)).shard_shape((micro,))[0]  # as `global_batch` places them
        host = update_batch(prompts, starts, tokens, lengths, completion_mask, advantages_all[mine], g.num_generations,
                            run.cfg.gradient_accumulation_steps, shards)
        batch = global_batch(host, run.mesh)
        if self.reference is not None:
            batch = batch.replace(ref_logp=self.logps_fn(self.reference, run.frozen, batch))
        if g.num_iterations > 1:
            batch = batch.replace(old_logp=self.logps_fn(state.params, run.frozen, batch))
        jax.block_until_ready((batch.ref_logp, batch.old_logp))
        logprob_time = time.perf_counter() - began

        began = time.perf_counter()
        for _ in range(g.num_iterations):
            state, metrics = self.update_fn(state, run.frozen, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        update_time = time.perf_counter() - began

        grouped = total.reshape(-1, g.num_generations)
        metrics.update({
            "reward": float(np.nanmean(total)), "reward_std": float(np.nanstd(total, ddof=1)),
            "frac_reward_zero_std": float(np.mean(np.isclose(np.nanstd(grouped, axis=1, ddof=1), 0.0))),
            "accuracy": float(table[:, -4].mean()), "format_rate": float(table[:, -3].mean()),
            "completions/mean_length": float(table[:, -2].mean()), "completions/max_length": float(table[:, -2].max()),
            "completions/clipped_ratio": float(table[:, -1].mean()),
            "rollout_time": rollout_time, "scoring_time": scoring_time, "logprob_time": logprob_time,
            "update_time": update_time, "rollout_tokens_per_s": float(table[:, -2].sum()) / rollout_time,
            "step_time": rollout_time + scoring_time + logprob_time + update_time,
        })
        metrics.update({f"answers/{letter}": float(np.mean(shape[:, 1] == k)) for letter, k in letters.items()})
        metrics["completions/think_words"] = float(shape[:, 0].mean())
        for f, name in enumerate(g.reward_funcs):
            column = per_func[:, f]
            metrics[f"rewards/{name}/mean"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            metrics[f"rewards/{name}/std"] = float(np.nanstd(column, ddof=1)) if np.isfinite(column).sum() > 1 else 0.0
            metrics[f"rewards/{name}/errors"] = float(errors[f])
        metrics["tokens_per_s"] = metrics["tokens"] * g.num_iterations / update_time
        if run.peak_flops:
            flops = update_flops(run.model_cfg, batch, metrics) * g.num_iterations
            metrics["mfu"] = mfu(flops, update_time, jax.device_count(), run.peak_flops)
        if jax.process_index() == 0 and g.log_completions_steps and (step + 1) % g.log_completions_steps == 0:
            self.log_completions(step + 1, groups, texts, scores.values, total[mine], g.reward_funcs,
                                 g.num_completions_to_print)
        return state, metrics

    def log_completions(self, step: int, groups: list[Sample], texts: list[str], values: np.ndarray,
                        total: np.ndarray, names: Sequence[str], count: int) -> None:
        """A few completions with their rewards, appended to <output_dir>/completions.jsonl."""
        with AppendLog(self.completions_log, autoflush=False) as f:
            for i in range(min(count, len(texts))):
                scores = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values[i])}
                f.write(json.dumps({"step": step, "prompt_id": groups[i].id, "completion": texts[i],
                                    "rewards": scores, "reward": None if np.isnan(total[i]) else float(total[i])},
                                   ensure_ascii=False) + "\n")


def cold_start(cfg: TrainConfig) -> TrainConfig:
    """The embedded default's starting point: the SFT cold start as `--stage sft` makes it (under
    <output_dir>/sft, made when missing), and its synthetic set."""
    out = Path(cfg.output_dir) / "sft"
    if not (out / "hf" / "config.json").exists():
        sft.run(config.load(None, [], config.EMBEDDED["sft"], stage="sft", output_dir=str(out), seed=cfg.seed,
                            model={"arch": cfg.model.arch}, data={"synthetic_walks": cfg.data.synthetic_walks,
                                                                    "synthetic_tasks": list(cfg.data.synthetic_tasks)}))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, model_name_or_path=str(out / "hf")),
                               data=dataclasses.replace(cfg.data, path=cfg.data.path or str(out / "data")))


def run(cfg: TrainConfig) -> dict:
    """The GRPO stage on the shared loop (`stjax.train.loop.run`); with no model.model_name_or_path, from
    the embedded SFT cold start."""
    if not cfg.model.model_name_or_path and cfg.data.format == "synthetic":
        d = cfg.distributed
        distributed.initialize(d.coordinator, d.num_processes, d.process_id)
        config.check(cfg, jax.device_count(), jax.process_count())  # errors before the cold start's work
        cfg = cold_start(cfg)
    return loop.run(cfg, GRPO())
