"""The scores of one GRPO step's completions, every process's rows gathered, and the metrics TRL logs of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils

from stjax.train import rewards

LETTERS = "ABCD"  # the collapse watch: the share of each answer letter


def global_rows(local: np.ndarray) -> np.ndarray:
    """Rows of every process, in process order (each process's own with one process)."""
    if jax.process_count() == 1:
        return local
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


@dataclass
class Scores:
    """Per completion of the step (all processes, in process order); counts per reward function."""

    rewards: np.ndarray  # (N, F) each function's reward, NaN where it does not apply
    reward: np.ndarray  # (N,) the weighted sum, NaN where no function applies
    accuracy: np.ndarray  # (N,) 1 where the answer is the gold letter (the release's rule)
    format: np.ndarray  # (N,) 1 where the completion is <think>...</think><answer>...</answer>
    lengths: np.ndarray  # (N,) completion tokens, EOS included
    truncated: np.ndarray  # (N,) 1 where the completion was cut at the length limit
    think_words: np.ndarray  # (N,) words inside <think>
    answers: np.ndarray  # (N,) index of the answer letter in LETTERS, -1 for another answer or none
    errors: np.ndarray  # (F,) completions each function raised on (scored 0)
    invalid: np.ndarray  # (F,) values each function returned that are neither a finite number nor None

    @classmethod
    def gather(
        cls,
        table: rewards.RewardTable,
        weights: np.ndarray,
        texts: Sequence[str],
        samples: Sequence,
        lengths: np.ndarray,
        truncated: np.ndarray,
    ) -> Scores:
        """This process's reward table and completions, with every other process's (one gather: each
        process's error counts ride in extra columns of its first row, so that their column sums are the totals)."""
        letters = {letter: k for k, letter in enumerate(LETTERS)}
        columns = {
            "accuracy": rewards.accuracy(texts, [s.answer for s in samples], [s.options for s in samples]),
            "format": rewards.format_reward(texts),
            "lengths": lengths,
            "truncated": truncated,
            "think_words": [rewards.think_words(t) for t in texts],
            "answers": [letters.get(rewards.answer_letter(t), -1) for t in texts],
        }
        funcs = table.values.shape[1]
        counts = np.zeros((len(texts), 2 * funcs))
        counts[0] = np.concatenate([table.errors, table.invalid])
        rows = global_rows(np.concatenate([table.values, np.stack(list(columns.values()), axis=1), counts], axis=1))
        per_func, named, counts = np.split(rows, [funcs, funcs + len(columns)], axis=1)
        errors, invalid = np.split(counts.sum(axis=0).astype(np.int64), 2)
        reward = np.nansum(per_func * weights, axis=1)
        reward[np.isnan(per_func).all(axis=1)] = np.nan
        return cls(rewards=per_func, reward=reward, errors=errors, invalid=invalid, **dict(zip(columns, named.T)))

    def metrics(self, names: Sequence[str], group_size: int, scale_rewards: str) -> dict[str, float]:
        """The reward and completion metrics; those TRL logs by TRL 1.16's formulas
        (`GRPOTrainer._generate_and_score_completions`): stds with Bessel's correction, NaN where fewer
        than two values count; `frac_reward_zero_std` the share of completions whose advantage's
        divisor (their group's std, the batch's with scale_rewards batch) is 0."""
        reward_std = _nanstd(self.reward)
        if scale_rewards == "batch":
            spread = np.full_like(self.reward, reward_std)
        else:
            spread = np.repeat(np.nanstd(self.reward.reshape(-1, group_size), axis=1, ddof=1), group_size)
        terminated = self.lengths[self.truncated == 0]
        terminated = terminated if len(terminated) else np.zeros(1)  # TRL's edge case: no completion ended
        out = {
            "reward": _nanmean(self.reward),
            "reward_std": reward_std,
            "frac_reward_zero_std": float(np.mean(np.isclose(spread, 0.0))),
            "accuracy": float(self.accuracy.mean()),
            "format_rate": float(self.format.mean()),
            "completions/mean_length": float(self.lengths.mean()),
            "completions/min_length": float(self.lengths.min()),
            "completions/max_length": float(self.lengths.max()),
            "completions/clipped_ratio": float(self.truncated.mean()),
            "completions/mean_terminated_length": float(terminated.mean()),
            "completions/min_terminated_length": float(terminated.min()),
            "completions/max_terminated_length": float(terminated.max()),
            "completions/think_words": float(self.think_words.mean()),
        }
        out.update({f"answers/{letter}": float(np.mean(self.answers == k)) for k, letter in enumerate(LETTERS)})
        for f, name in enumerate(names):
            out[f"rewards/{name}/mean"] = _nanmean(self.rewards[:, f])
            out[f"rewards/{name}/std"] = _nanstd(self.rewards[:, f])
            out[f"rewards/{name}/errors"] = float(self.errors[f])
        return out


def _nanmean(x: np.ndarray) -> float:
    """The mean of the values that are not NaN (NaN when none is)."""
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def _nanstd(x: np.ndarray) -> float:
    """TRL's `nanstd`: the std of the values that are not NaN, with Bessel's correction (NaN for fewer than two)."""
    return float(np.nanstd(x, ddof=1)) if np.isfinite(x).sum() > 1 else float("nan")
