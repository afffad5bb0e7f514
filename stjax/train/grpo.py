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

The update batch is the prompt rows repeated G times with the completion after each prompt,
right-padded like an SFT batch, so the same step (`stjax.train.step.update`), loss positions and
buckets serve: logits are made only at the positions that predict a completion token, exactly
`max_completion_length` of them per row (one compiled shape).

`group_advantages` and `policy_loss` are TRL 1.16's formulas (`GRPOTrainer._compute_loss` and the
advantage computation), tested against a PyTorch transcription of them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
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
from stjax.models.inputs import ModelInputs
from stjax.sampling.sampler import SamplingConfig, next_positions, sample
from stjax.sharding import make_mesh, model_shardings, parse_mesh
from stjax.train import config, distributed, loop, rewards, sft
from stjax.train.batch import (agree_shapes, global_batch, global_inputs, local_rows, loss_positions,
                               micro_batch_inputs, place_rows, step_shapes)
from stjax.train.config import ConfigError, TrainConfig
from stjax.train.loss import next_tokens, token_logps
from stjax.train.metrics import drop_steps_after, mfu, step_flops
from stjax.train.step import TrainState, update

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
    """The update's rows, micro-batches stacked on a leading axis: every leaf is (accum, B, ...)."""

    inputs: ModelInputs
    loss_positions: jax.Array  # (accum, B, T): the positions that predict completion token j
    completion_mask: jax.Array  # (accum, B, T) 1 for the completion's tokens (EOS included)
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


def completion_logps(model, inputs: ModelInputs, positions: jax.Array, temperature: float, chunk: int,
                     dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """(B, T) log-probs of the completion tokens under `logits / temperature` (TRL's), and the
    entropies there, with logits made only at the `positions` that predict them."""
    hidden = model.hidden_states(inputs, dropout_key)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    targets = jnp.take_along_axis(next_tokens(inputs.input_ids), positions, axis=1)
    return token_logps(hidden / jnp.asarray(temperature, hidden.dtype), model.output_table(), targets, chunk)


def grpo_micro_loss(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, micro: GRPOBatch,
                    batch: GRPOBatch, key: jax.Array, settings: LossSettings) -> tuple[jax.Array, dict]:
    """One micro-batch's share of the step's loss (normalisers from the whole step), and metric sums."""
    model = nnx.merge(graphdef, params, frozen)
    logp, entropy = completion_logps(model, micro.inputs, micro.loss_positions, settings.temperature, settings.chunk,
                                     key)
    loss, metrics = policy_loss(
        logp, micro.old_logp, micro.ref_logp, micro.advantages, micro.completion_mask, loss_type=settings.loss_type,
        beta=settings.beta, epsilon_low=settings.epsilon_low, epsilon_high=settings.epsilon_high,
        importance_sampling_level=settings.importance_sampling_level,
        max_completion_length=settings.max_completion_length, num_items_in_batch=jnp.sum(batch.completion_mask),
        num_sequences=batch.advantages.size)
    if settings.loss_type == "bnpo":  # TRL's bnpo normalises each micro-batch by its own tokens
        loss = loss / batch.advantages.shape[0]
    tokens = jnp.sum(micro.completion_mask)
    sums = {k: v * tokens for k, v in metrics.items()}  # token-weighted over the micro-batches
    return loss, {**sums, "entropy": jnp.sum(entropy * micro.completion_mask), "completion_tokens": tokens}


def grpo_update(graphdef: nnx.GraphDef, optim, settings: LossSettings, state: TrainState, frozen: nnx.State,
                batch: GRPOBatch) -> tuple[TrainState, dict[str, jax.Array]]:
    state, metrics = update(graphdef, optim, state, frozen, batch,
                            functools.partial(grpo_micro_loss, settings=settings))
    tokens = jnp.maximum(metrics.pop("completion_tokens"), 1.0)
    for name in [k for k in metrics if k == "entropy" or k == "kl" or "clip_ratio" in k]:
        metrics[name] = metrics[name] / tokens
    metrics.update(tokens=jnp.sum(batch.inputs.attention_mask), target_tokens=tokens)
    if batch.inputs.vision is not None:
        metrics["patches"] = jnp.sum(batch.inputs.vision.frames.lengths)
    return state, metrics


def batch_logps(graphdef: nnx.GraphDef, params: nnx.State, frozen: nnx.State, batch: GRPOBatch,
                settings: LossSettings) -> jax.Array:
    """(accum, B, T) completion log-probs of the model (params, frozen), no dropout and no gradient:
    the old policy's or the reference's."""
    model = nnx.merge(graphdef, params, frozen)

    def one(micro: GRPOBatch) -> jax.Array:
        return completion_logps(model, micro.inputs, micro.loss_positions, settings.temperature, settings.chunk)[0]

    return jax.lax.map(one, batch.replace(old_logp=None, ref_logp=None))


# ---------------------------------------------------------------- host side: prompts, completions


def left_padded(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The loader's right-padded text rows moved to the right end (the sampler's prompt layout)."""
    out = dict(batch)
    length = batch["input_ids"].shape[1]
    shifts = length - batch["attention_mask"].sum(axis=1)
    roll = lambda x, axis: np.stack([np.roll(row, s, axis=-1) for row, s in  # each row's text, along L
                                     zip(np.moveaxis(x, axis, 0), shifts)], axis=axis)
    for key in ("input_ids", "attention_mask", "loss_mask"):
        out[key] = roll(batch[key], 0)
    out["position_ids"] = roll(batch["position_ids"], 1)
    return out


def completion_rows(batch: dict[str, np.ndarray], tokens: np.ndarray, lengths: np.ndarray, group_size: int,
                    eos_ids: Sequence[int], mask_truncated: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The update's rows: each prompt of the loader's (right-padded) batch repeated `group_size`
    times with its completion written after it, and the (rows, T) completion mask.

    The completion's tokens (EOS included) are the targets; they take M-RoPE positions
    max(prompt positions) + 1 + k, as the sampler gave them. With `mask_truncated`, a completion
    that ends without EOS weighs nothing.
    """
    repeat = lambda x, axis=0: np.repeat(x, group_size, axis=axis)
    rows = {k: repeat(v, 1 if k == "position_ids" else 0) for k, v in batch.items()}
    n, t = tokens.shape
    prompt = rows["attention_mask"].sum(axis=1)
    steps = np.arange(t)
    completion_mask = (steps < lengths[:, None]).astype(np.int32)
    if mask_truncated:
        completion_mask *= ended(tokens, lengths, eos_ids)[:, None]
    pad = lambda x, value=0: np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, t)], constant_values=value)
    ids, attention, loss = pad(rows["input_ids"]), pad(rows["attention_mask"]), pad(np.zeros_like(rows["loss_mask"]))
    positions = pad(rows["position_ids"], 1)
    start = np.max(np.where(rows["attention_mask"][None] == 1, rows["position_ids"], -1), axis=(0, 2)) + 1
    row_index = np.arange(n)[:, None]
    where = prompt[:, None] + steps  # (n, t) columns of the completion's tokens
    live = steps < lengths[:, None]
    ids[row_index, where] = np.where(live, tokens, ids[row_index, where])
    attention[row_index, where] = live
    loss[row_index, where] = completion_mask
    positions[:, row_index, where] = np.where(live, start[:, None] + steps, 1)
    return dict(rows, input_ids=ids, attention_mask=attention, loss_mask=loss, position_ids=positions), completion_mask


def ended(tokens: np.ndarray, lengths: np.ndarray, eos_ids: Sequence[int]) -> np.ndarray:
    """(N,) True where a completion ends with an EOS token (False: cut at the length limit)."""
    last = tokens[np.arange(len(tokens)), np.maximum(lengths - 1, 0)]
    return (lengths > 0) & np.isin(last, eos_ids)


def update_batch(model_cfg, rows: dict[str, np.ndarray], completion_mask: np.ndarray, advantages: np.ndarray,
                 accumulation: int) -> GRPOBatch:
    """This process's update rows as `accumulation` micro-batches (host arrays, like `host_batch`)."""
    n = len(completion_mask)
    size = n // accumulation
    parts = [{k: (v[:, i * size:(i + 1) * size] if k == "position_ids" else v[i * size:(i + 1) * size])
              for k, v in rows.items()} for i in range(accumulation)]
    length, _, sizes = agree_shapes(*step_shapes(model_cfg, parts))
    made = [micro_batch_inputs(model_cfg, p, length, sizes) for p in parts]
    t = completion_mask.shape[1]
    stack = lambda *x: np.stack(x)
    split = lambda x: x.reshape(accumulation, size, *x.shape[1:])
    return GRPOBatch(inputs=jax.tree.map(stack, *[m[0] for m in made]),
                     loss_positions=np.stack([loss_positions(m[1], t) for m in made]),
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
        try:
            self.reward_funcs = [rewards.resolve(name, g.accuracy_rule) for name in g.reward_funcs]
        except ValueError as e:
            raise ConfigError(str(e)) from None
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
            else:
                self.reference = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(compute), p))(state.params)
        shardings = jax.tree.map(lambda x: x.sharding, state)
        replicated = NamedSharding(run.mesh, PartitionSpec())
        self.update_fn = jax.jit(functools.partial(grpo_update, run.graphdef, run.optim, self.settings),
                                 out_shardings=(shardings, replicated), donate_argnums=0)
        self.logps_fn = jax.jit(functools.partial(batch_logps, run.graphdef, settings=self.settings))
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

    def rollout(self, run: loop.Run, state: TrainState, prompts: dict[str, np.ndarray], step: int):
        """G completions of each of this process's prompts: (tokens, lengths, logp_model) of its rows."""
        left = left_padded(prompts)
        length, _, sizes = agree_shapes(*step_shapes(run.model_cfg, [left]))
        inputs, _ = micro_batch_inputs(run.model_cfg, left, length, sizes)
        start = next_positions(inputs.attention_mask, inputs.position_ids, length)
        inputs, start = global_inputs(inputs, self.rollout_mesh), place_rows(start, self.rollout_mesh)
        # The rollout key: the run's key (checkpointed) and the step, so a resumed run samples the same.
        key = jax.random.fold_in(jax.random.fold_in(jax.random.wrap_key_data(state.rng), 1), step)
        weights = self.rollout_weights(run, state)
        out = sample(self.rollout_graphdef, self.sampling, weights, inputs, jnp.int32(length - 1), start, key)
        rows = len(prompts["input_ids"]) * self.sampling.num_samples
        return local_rows(out.tokens, rows), local_rows(out.lengths, rows), local_rows(out.logp_model, rows)

    def step(self, run: loop.Run, state: TrainState, data: Iterator, step: int) -> tuple[TrainState, dict[str, float]]:
        g = run.cfg.grpo
        prompts = next(data)
        samples = [run.samples[i] for i in prompts.pop("sample_id")]
        began = time.perf_counter()
        tokens, lengths, _ = self.rollout(run, state, prompts, step)
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
        errors = _global_table(scores.errors[None]).sum(axis=0)
        per_func = table[:, : len(self.reward_funcs)]
        total = np.nansum(per_func * self.reward_weights, axis=1)
        total[np.isnan(per_func).all(axis=1)] = np.nan
        advantages_all = np.asarray(group_advantages(total, g.num_generations, g.scale_rewards))
        mine = slice(jax.process_index() * len(texts), (jax.process_index() + 1) * len(texts))
        scoring_time = time.perf_counter() - began

        began = time.perf_counter()
        rows, completion_mask = completion_rows(prompts, tokens, lengths, g.num_generations, self.eos_ids,
                                                g.mask_truncated_completions)
        host = update_batch(run.model_cfg, rows, completion_mask, advantages_all[mine], run.cfg.accumulation)
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
        for f, name in enumerate(g.reward_funcs):
            column = per_func[:, f]
            metrics[f"rewards/{name}/mean"] = float(np.nanmean(column)) if np.isfinite(column).any() else float("nan")
            metrics[f"rewards/{name}/std"] = float(np.nanstd(column, ddof=1)) if np.isfinite(column).sum() > 1 else 0.0
            metrics[f"rewards/{name}/errors"] = float(errors[f])
        metrics["tokens_per_s"] = metrics["tokens"] * g.num_iterations / update_time
        if run.peak_flops:
            flops = step_flops(run.model_cfg, batch, metrics) * g.num_iterations
            metrics["mfu"] = mfu(flops, update_time, jax.device_count(), run.peak_flops)
        if jax.process_index() == 0 and g.log_completions_steps and (step + 1) % g.log_completions_steps == 0:
            self.log_completions(step + 1, groups, texts, scores.values, total[mine], g.reward_funcs,
                                 g.num_completions_to_print)
        return state, metrics

    def log_completions(self, step: int, groups: list[Sample], texts: list[str], values: np.ndarray,
                        total: np.ndarray, names: Sequence[str], count: int) -> None:
        """A few completions with their rewards, appended to <out_dir>/completions.jsonl."""
        with self.completions_log.open("a") as f:
            for i in range(min(count, len(texts))):
                scores = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values[i])}
                f.write(json.dumps({"step": step, "prompt_id": groups[i].id, "completion": texts[i],
                                    "rewards": scores, "reward": None if np.isnan(total[i]) else float(total[i])},
                                   ensure_ascii=False) + "\n")


def cold_start(cfg: TrainConfig) -> TrainConfig:
    """The embedded default's starting point: the SFT cold start as `--stage sft` makes it (under
    <out_dir>/sft, made when missing), and its synthetic set."""
    out = Path(cfg.out_dir) / "sft"
    if not (out / "hf" / "config.json").exists():
        sft.run(config.load(None, [], config.EMBEDDED["sft"], stage="sft", out_dir=str(out), seed=cfg.seed,
                            model={"arch": cfg.model.arch}, data={"synthetic_walks": cfg.data.synthetic_walks}))
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init=str(out / "hf")),
                               data=dataclasses.replace(cfg.data, path=cfg.data.path or str(out / "data")))


def run(cfg: TrainConfig) -> dict:
    """The GRPO stage on the shared loop (`stjax.train.loop.run`); with no model.init, from the
    embedded SFT cold start."""
    if not cfg.model.init and cfg.data.format == "synthetic":
        d = cfg.distributed
        distributed.initialize(d.coordinator, d.num_processes, d.process_id)
        config.check(cfg, jax.device_count(), jax.process_count())  # errors before the cold start's work
        cfg = cold_start(cfg)
    return loop.run(cfg, GRPO())
