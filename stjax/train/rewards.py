"""GRPO's verifiable rewards: named functions of the decoded completions and their records.

A reward function takes TRL's arguments, `fn(prompts=..., completions=..., **columns)`, where
`completions` are the decoded texts and `columns` every field of the records as lists: the reader's
(`answer`, `solution`, `options`, `question`, `direction`, `task`, `id`, `video`, `pair_id`, `problem`:
`stjax.data.formats.Sample`) and any other field a record holds (a JSONL row's `"difficulty": 3` arrives
as `difficulty=[3, ...]`; None for a record without it, as TRL gives for a row's missing value). It
returns one float (or None: "does not apply") per completion. The config names them
(`grpo.reward_funcs`, weighted by `grpo.reward_weights`, then summed as TRL does); a dotted path
`package.module.function` or a file `path/to/rewards.py:function` names one of your own.

Built in:
- `accuracy`: the release's rule, 1 when the first character inside the first `<answer>...</answer>`
  is the gold letter, else 0 (`rule="default"`: the evaluator's robust extractor instead).
- `format`: 1 when the completion is one `<think>...</think>` then one `<answer>...</answer>` (the
  release's pattern, whitespace around and between allowed; nested, repeated or trailing tags and
  text outside them fail), else 0.
- `reverse_thinking`: 1 when the completion's `<think>` restates the opposite-direction question's
  answer correctly, in the release's reverse-thinking template ("Let's start by thinking reverse
  <question>? <its answer> And then think about ..."), else 0; None for a record with no such gold
  (its `solution` does not follow the template). The gold comes from the record's solution, which
  both the ST-R1 rows and the synthetic set write in that template.

A function that raises is retried one completion at a time; the completions it still raises on
score 0 and are counted (`RewardTable.errors`), so a strange completion never stops a run. A broken
function does (`check`): one that raises on every completion of a step, or returns anything but a
finite number or None (a string, NaN, an infinity).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import numbers
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stjax.data.formats import FIELDS, Sample
from stjax.eval.extract import extract_answer

log = logging.getLogger(__name__)

RewardFunc = Callable[..., Sequence[float | None]]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_THINK = re.compile(r"<think>(.*?)</think>", re.S)
_NO_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # text holding no think / answer tag
_FORMAT = re.compile(rf"\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.S)
# The release's reverse-thinking template: the opposite question, "?", its answer, then "And then think about".
_OPPOSITE_ANSWER = re.compile(r"Let's start by thinking (?:reverse|forward) .*?\?\s*(.*?)\s*And then", re.S)


def accuracy(
    completions: Sequence[str], answer: Sequence[str], options: Sequence[list[str]], rule: str = "release", **_
) -> list[float]:
    """1.0 where the completion's answer is the gold letter (see the module docstring for the rules)."""
    if rule == "default":
        return [float(extract_answer(c, o) == a) for c, a, o in zip(completions, answer, options)]
    return [float(answer_letter(c) == gold) for c, gold in zip(completions, answer)]  # a gold letter is never empty


def answer_letter(completion: str) -> str | None:
    """The release's answer: the first character inside the first <answer> tag ('' when empty, None without one)."""
    match = _ANSWER.search(completion)
    return match.group(1).strip()[:1] if match else None


def think_words(completion: str) -> int:
    """Words inside the first <think> ... </think> (0 without one): a policy collapsing to a bare answer
    shows here first."""
    match = _THINK.search(completion)
    return len(match.group(1).split()) if match else 0


def format_reward(completions: Sequence[str], **_) -> list[float]:
    return [float(_FORMAT.fullmatch(c) is not None) for c in completions]


def _normalize(text: str) -> str:
    """Lower case, brackets, quotes and punctuation dropped, spaces collapsed: "['toy birdhouse']." ->
    "toy birdhouse"."""
    return " ".join(re.sub(r"[\[\]'\".,;:!?()]", " ", text.lower()).split())


def opposite_answer(solution: str | None) -> str | None:
    """The opposite-direction answer a reverse-thinking solution states, or None."""
    match = _OPPOSITE_ANSWER.search(solution or "")
    return _normalize(match.group(1)) or None if match else None


def reverse_thinking(completions: Sequence[str], solution: Sequence[str | None], **_) -> list[float | None]:
    scores = []
    for completion, gold_solution in zip(completions, solution):
        gold = opposite_answer(gold_solution)
        if gold is None:
            scores.append(None)
            continue
        start = completion.find("<think>")
        end = completion.find("</think>", start)
        think = "" if start < 0 else completion[start : end if end >= 0 else len(completion)]  # unclosed: to the end
        scores.append(float(opposite_answer(think) == gold))
    return scores


REWARDS: dict[str, RewardFunc] = {"accuracy": accuracy, "format": format_reward, "reverse_thinking": reverse_thinking}


def resolve(name: str, accuracy_rule: str = "release") -> RewardFunc:
    """A built-in reward by name, or a function of one's own by dotted path (`package.module.function`)
    or by file (`path/to/rewards.py:function`, no PYTHONPATH needed)."""
    if name == "accuracy":
        return functools.partial(accuracy, rule=accuracy_rule)
    if name in REWARDS:
        return REWARDS[name]
    path, by_file, attr = name.rpartition(":")
    if not by_file:
        path, _, attr = name.rpartition(".")
    try:
        module = _module_of_file(path) if by_file else importlib.import_module(path) if path else None
        fn = getattr(module, attr) if module else None
    except (ImportError, AttributeError, OSError) as e:
        raise ValueError(f"reward function {name!r}: {e}") from None
    if not callable(fn):
        raise ValueError(
            f"reward function {name!r} is neither built in ({', '.join(REWARDS)}) nor a dotted path "
            "or file:function naming a function"
        )
    return fn


@functools.cache
def _module_of_file(path: str) -> types.ModuleType:
    """The Python file at `path` as a module, run once (the config check and the stage share it)."""
    if not Path(path).is_file():
        raise OSError(f"no file {path}")
    spec = importlib.util.spec_from_file_location(f"stjax_rewards_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def columns(samples: Sequence[Sample]) -> dict[str, list]:
    """Every field of the records, as TRL passes every dataset column: one list per field, a record's own
    fields (`Sample.extra`) too; a record lacking a field another one has gets None there, as a dataset
    column holds None where a row has no value."""
    own = {n: [getattr(s, n) for s in samples] for n in FIELDS}
    extra = dict.fromkeys(k for s in samples for k in s.extra)
    return own | {k: [s.extra.get(k) for s in samples] for k in extra}


class RewardError(RuntimeError):
    """A reward function that cannot score this run's completions: the run stops."""


@dataclass
class RewardTable:
    values: np.ndarray  # (N, F) float64, NaN where a function said None ("does not apply")
    errors: np.ndarray  # (F,) completions each function raised on (scored 0)
    invalid: np.ndarray  # (F,) values each function returned that are neither a finite number nor None (scored 0)
    problems: list[str]  # (F,) the first error or invalid value of each function, "" where none


def score(
    funcs: Sequence[RewardFunc], prompts: Sequence[str], completions: Sequence[str], samples: Sequence[Sample]
) -> RewardTable:
    """Every function on every completion; one that raises is retried one completion at a time."""
    values = np.zeros((len(completions), len(funcs)))
    errors, invalid = np.zeros(len(funcs), np.int64), np.zeros(len(funcs), np.int64)
    problems = [""] * len(funcs)
    fields = columns(samples)

    def call(fn: RewardFunc, rows: slice) -> list:
        out = list(
            fn(
                prompts=list(prompts[rows]),
                completions=list(completions[rows]),
                **{k: v[rows] for k, v in fields.items()},
            )
        )
        expected = len(completions[rows])
        if len(out) != expected:
            raise ValueError(f"returned {len(out)} rewards for {expected} completions")
        return out

    for f, fn in enumerate(funcs):
        try:
            out = call(fn, slice(None))
        except Exception:  # noqa: BLE001 - a reward must not stop the run: find the completions it fails on
            out = []
            for i in range(len(completions)):
                try:
                    out += call(fn, slice(i, i + 1))
                except Exception as e:  # noqa: BLE001
                    log.warning(
                        "reward %s failed on completion %d (sample %s), scored 0: %s",
                        getattr(fn, "__name__", "function"),
                        i,
                        samples[i].id,
                        e,
                    )
                    errors[f] += 1
                    problems[f] = problems[f] or f"on sample {samples[i].id}: {type(e).__name__}: {e}"
                    out.append(0.0)
        for i, v in enumerate(out):
            if v is not None and not (isinstance(v, numbers.Real) and math.isfinite(v)):
                invalid[f] += 1
                problems[f] = problems[f] or f"{v!r} for sample {samples[i].id}"
                v = 0.0
            values[i, f] = np.nan if v is None else float(v)
    return RewardTable(values=values, errors=errors, invalid=invalid, problems=problems)


def check(
    names: Sequence[str], errors: np.ndarray, invalid: np.ndarray, problems: Sequence[str], total: np.ndarray, step: int
) -> None:
    """Stop the run (RewardError) when a function raised on every completion of the step, returned a
    value that is neither a finite number nor None, or no function applies to any completion (every
    advantage would be 0). Counts and `total` (the weighted sums) cover all processes, `problems`
    this process's first of each function."""
    for name, raised, wrong, problem in zip(names, errors, invalid, problems):
        problem = problem or "on another process"
        if raised == len(total):
            raise RewardError(
                f"reward {name} raised on every completion of step {step} ({len(total)}), e.g. "
                f"{problem}; nothing of this step was trained"
            )
        if wrong:
            raise RewardError(
                f"reward {name} returned {wrong} value(s) that are neither a finite number nor None at "
                f"step {step}, e.g. {problem}"
            )
    if np.isnan(total).all():
        raise RewardError(
            f"no reward applies to any completion of step {step} (each of {', '.join(names)} returned "
            "None for all): nothing to train on"
        )
