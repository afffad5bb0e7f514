"""GRPO: reinforcement learning from verifiable rewards after the SFT cold start, on the shared loop.

One step, as data (TRL's `GRPOTrainer` names; roles as Tunix names them, one module each under
`stjax.train.rl`):

    P prompts (this process: its share; a group never leaves its process)
      --rollout (`rl.rollout`): the actor's current weights, placed for decoding, G completions per
         prompt (`stjax.sampling.sampler.sample`: one shared prefill, weights as arguments)--> P*G rows
      --detokenize + rewards (host, `stjax.train.rewards`; `rl.scores` gathers every process's)
      --group advantages (`rl.objective`)--> advantages (P*G,)
      --[old log-probs: the actor before the first update, when num_iterations > 1]
      --[reference log-probs: the base (LoRA adapters off) or a frozen copy, when beta > 0]
      --num_iterations x (policy loss over the completion tokens, gradients, clip, AdamW) (`rl.learner`)
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import jax
import numpy as np

from stjax.data.formats import Sample
from stjax.io import AppendLog
from stjax.sharding import make_mesh, parse_mesh
from stjax.train import loop, rewards
from stjax.train.config import TrainConfig
from stjax.train.metrics import drop_steps_after, mfu
from stjax.train.rl.learner import Learner, LossSettings, reference_params, update_flops
from stjax.train.rl.objective import group_advantages
from stjax.train.rl.rollout import Completions, Rollout, prompt_inputs, rollout_sampling
from stjax.train.rl.scores import Scores
from stjax.train.step import TrainState


class Stopwatch:
    """Seconds of each named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        began = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - began


class GRPO:
    """The GRPO stage: the rollout, the rewards and the learner of one actor, set up once per training run."""

    @staticmethod
    def samples_per_step(cfg: TrainConfig) -> int:
        return cfg.batch_size // cfg.grpo.num_generations

    loader_batch = samples_per_step  # one loader batch: a step's prompts

    @staticmethod
    def updates_per_step(cfg: TrainConfig) -> int:
        return cfg.grpo.num_iterations

    def __init__(self, context: loop.Context, model, state: TrainState):
        self.context, self.options = context, context.cfg.grpo
        options, tokenizer = self.options, context.processor.tokenizer
        self.reward_funcs = [rewards.resolve(name, options.accuracy_rule) for name in options.reward_funcs]
        self.reward_weights = np.asarray(options.reward_weights or [1.0] * len(options.reward_funcs), np.float64)
        self.tokenizer = tokenizer
        self.eos_ids = tuple(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        sampling = rollout_sampling(options, context.model_cfg, self.eos_ids, tokenizer.pad_token_id)
        settings = LossSettings.of(context.cfg)
        rollout_mesh = make_mesh(parse_mesh(options.rollout_mesh)) if options.rollout_mesh else None
        self.rollout = Rollout(model, context.graphdef, context.frozen, sampling, settings, context.mesh, rollout_mesh)
        self.learner = Learner(
            context.graphdef,
            context.optim,
            settings,
            state,
            context.frozen,
            context.mesh,
            options.num_generations,
            context.cfg.gradient_accumulation_steps,
        )
        model_cfg = context.model_cfg
        self.reference = (
            reference_params(model, state, model_cfg.compute_dtype, bool(model_cfg.lora_rank)) if options.beta else None
        )
        self.completions_log = context.output_dir / "completions.jsonl"
        if jax.process_index() == 0:  # a resumed run logs the steps after its checkpoint again
            drop_steps_after(self.completions_log, context.start_step)

    def step(self, state: TrainState, data: Iterator, step: int) -> tuple[TrainState, dict[str, float]]:
        options, clock = self.options, Stopwatch()
        loaded = next(data)
        samples = [self.context.samples[i] for i in loaded.pop("sample_id")]
        groups = [s for s in samples for _ in range(options.num_generations)]  # each prompt's sample, G times
        with clock("rollout_time"):
            prompts, starts = prompt_inputs(self.context.model_cfg, loaded)
            completions = self.rollout.generate(state, prompts, starts, [s.id for s in samples], step)
        with clock("scoring_time"):
            texts = [
                self.tokenizer.decode(row[:n], skip_special_tokens=True)
                for row, n in zip(completions.tokens, completions.lengths)
            ]
            scores = self.score(groups, texts, completions, step)
            advantages = np.asarray(group_advantages(scores.reward, options.num_generations, options.scale_rewards))
            mine = slice(jax.process_index() * len(texts), (jax.process_index() + 1) * len(texts))
        with clock("logprob_time"):
            batch = self.learner.batch(
                prompts,
                starts,
                completions.tokens,
                completions.lengths,
                self.completion_mask(completions, scores.truncated[mine]),
                advantages[mine],
            )
            if self.reference is not None:
                batch = batch.replace(ref_logp=self.rollout.logps(self.reference, batch))
            if options.num_iterations > 1:
                batch = batch.replace(old_logp=self.rollout.logps(state.params, batch))
            jax.block_until_ready((batch.ref_logp, batch.old_logp))
        with clock("update_time"):
            state, metrics = self.learner.update(state, batch, options.num_iterations)
        metrics.update(
            scores.metrics(options.reward_funcs, options.num_generations, options.scale_rewards), **clock.seconds
        )
        metrics.update(self.speed(metrics, batch, scores))
        every = options.log_completions_steps
        if jax.process_index() == 0 and every and (step + 1) % every == 0:
            log_completions(
                self.completions_log,
                step + 1,
                groups,
                texts,
                scores.rewards[mine],
                scores.reward[mine],
                options.reward_funcs,
                options.num_completions_to_print,
            )
        return state, metrics

    def score(self, groups: list[Sample], texts: list[str], completions: Completions, step: int) -> Scores:
        """Every reward of this process's completions, gathered with the other processes'; a broken
        reward function stops the run here (`rewards.check`)."""
        table = rewards.score(self.reward_funcs, [s.question for s in groups], texts, groups)
        scores = Scores.gather(
            table, self.reward_weights, texts, groups, completions.lengths, ~completions.ended(self.eos_ids)
        )
        rewards.check(self.options.reward_funcs, scores.errors, scores.invalid, table.problems, scores.reward, step + 1)
        return scores

    def completion_mask(self, completions: Completions, truncated: np.ndarray) -> np.ndarray:
        """(N, T) the tokens that weigh in the loss: each completion up to its end, none of a truncated
        one with `mask_truncated_completions`."""
        mask = np.arange(completions.tokens.shape[1]) < completions.lengths[:, None]
        if self.options.mask_truncated_completions:
            mask &= ~truncated.astype(bool)[:, None]
        return mask

    def speed(self, metrics: dict[str, float], batch, scores: Scores) -> dict[str, float]:
        """Throughput of the step's phases (MFU where the device's peak is known)."""
        iterations, peak = self.options.num_iterations, self.context.peak_flops
        seconds = {k: metrics[k] for k in ("rollout_time", "scoring_time", "logprob_time", "update_time")}
        out = {
            "rollout_tokens_per_s": float(scores.lengths.sum()) / seconds["rollout_time"],
            "step_time": sum(seconds.values()),
            "tokens_per_s": metrics["tokens"] * iterations / seconds["update_time"],
        }
        if peak:
            flops = update_flops(self.context.model_cfg, batch, metrics) * iterations
            out["mfu"] = mfu(flops, seconds["update_time"], jax.device_count(), peak)
        return out


def log_completions(
    path: Path,
    step: int,
    groups: list[Sample],
    texts: list[str],
    values: np.ndarray,
    total: np.ndarray,
    names: Sequence[str],
    count: int,
) -> None:
    """A few completions with their rewards, appended to `path` (<output_dir>/completions.jsonl)."""
    with AppendLog(path, autoflush=False) as f:
        for i in range(min(count, len(texts))):
            scores = {n: (None if np.isnan(v) else float(v)) for n, v in zip(names, values[i])}
            f.write(
                json.dumps(
                    {
                        "step": step,
                        "prompt_id": groups[i].id,
                        "completion": texts[i],
                        "rewards": scores,
                        "reward": None if np.isnan(total[i]) else float(total[i]),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
