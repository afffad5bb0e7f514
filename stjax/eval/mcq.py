"""Ego-ST multiple-choice evaluation: generate (or score the option letters), extract, count.

    python -m stjax.eval.mcq --model DIR --data FILE... [--videos DIR...] [--out DIR] [--config FILE.yaml]
    python -m stjax.eval.mcq --model openinterx/ST-R1-mcq [--revision REV] --data FILE...   # a hub id
    python -m stjax.eval.mcq                      # embedded default: synthetic set + tiny model, no download
    python -m stjax.eval.mcq --model DIR --data FILE... --quantize nf4    # a 4-bit model (stjax.models.quant)

A model stjax trained is evaluated as it was trained: its export's training recipe (`stjax_training.json`:
prompt template, frames, fps, max_pixels, second_per_grid) gives those options unless they are set; other
models get the seed's recipe: the "seed_mcq" prompt, 8 frames, max_pixels 360*420, fps 1.0. The run prints
which it used. Greedy, 512 new tokens. A YAML config may set any option (same names, "-" or "_"); flags
override it.

Data files: Ego-ST MCQ JSON (`Part1_forward_mcq.json`, ...; a folder means its `*_mcq*.json`), ST-R1
JSONL (rows with `problem` and `solution`) or our plain JSONL (rows with `options`). `--videos` gives
one folder for every file or one per file, in order; for Ego-ST files a folder holding the part's
subfolder (`part1`, `part3_clip`, ...) is entered. Without it, videos resolve beside the data file.

Output (`--out`): `predictions.jsonl`, one record per sample written as each batch finishes, so a
stopped run resumes where it stopped; `accuracy.json` per file, task, direction and overall, each
accuracy with its 95% Wilson interval beside three baselines: chance (1 / options), the majority letter
(always answering the group's most common gold letter) and text-only (the same model with every video
frame blank, its records in `predictions_text_only.jsonl`; `--no-text-only` skips it).
A sample that cannot be run (unreadable video, prompt over --max-prompt-tokens) is recorded with an
"error" and counts as wrong; records already in the file, failed ones included, are never redone.
One run at a time per --out (a second is refused); resuming under other settings or with changed data
or model files is refused; a run in which no sample could be evaluated exits non-zero.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from etils import epath
from flax import nnx
from tqdm import tqdm

from stjax.cli import add_debug_flag, run_cli
from stjax.data.formats import (
    EGO_ST_TASKS,
    PART_FOLDERS,
    ReadResult,
    Sample,
    read_egost_mcq,
    read_plain_jsonl,
    read_st_r1_jsonl,
)
from stjax.data.tokenizer import tiny_model_dir
from stjax.data.video import SECOND_PER_GRID, MediaConfig, SampleError
from stjax.eval.extract import RULES, extract_answer
from stjax.io import AppendLog, DirectoryLock, OutputError, as_path, file_digest, is_remote, write_text_atomic
from stjax.models.config import QUANTIZE_FORMATS
from stjax.models.inputs import ModelInputs, bucket, cast_floats, prepare_inputs
from stjax.models.loading import model_fingerprints
from stjax.sampling.sampler import SamplingConfig, generate
from stjax.settings import ConfigError, changed, check_fields, from_dict, setting
from stjax.sharding import make_mesh, parse_mesh, shard_inputs

PREDICTIONS = "predictions.jsonl"
TEXT_ONLY = "predictions_text_only.jsonl"
ACCURACY = "accuracy.json"
RUN = "run.json"
MODES = ("generate", "logits")
TEMPLATES = ("seed_mcq", "grpo", "problem")
LETTERS = "ABCDEFGHIJ"


@dataclass
class EvalConfig:
    """Every option of a run; the YAML keys and the flags have these names. Each documents itself
    (`stjax.settings.setting`): `--help` and `check_config` read the meaning, allowed values and ranges."""

    model: str | None = setting(
        None,
        "a HF or stjax model directory or a hub id; none (with no --data): the embedded default's tiny random model",
    )
    revision: str | None = setting(None, "hub id only: branch, tag or commit (default: main)")
    data: list[str] = setting(help="data files (or Ego-ST folders)", factory=list)
    videos: list[str] = setting(help="video folder for all files, or one per file", factory=list)
    out: str = setting("runs/eval", "output folder (local or an object store URL)")
    tokenizer: str | None = setting(None, "a directory or hub id; default: the model's")
    dtype: str | None = setting(None, "parameter dtype; default: the checkpoint's")
    quantize: str = setting(
        "none",
        "every linear of the decoder and the vision tower stored nf4 or int8 "
        "(stjax.models.quant), as transformers' load_in_4bit / load_in_8bit do",
        choices=QUANTIZE_FORMATS,
    )
    mode: str = setting("generate", "generate an answer, or score the option letters' logits", choices=MODES)
    extract: str = setting("default", "answer extraction rule (stjax.eval.extract)", choices=RULES)
    # The media and prompt recipe: unset (None), a stjax export's training recipe where it records one, else
    # SEED_RECIPE's value (`with_training_recipe`)
    template: str | None = setting(None, "the prompt template (stjax.data.processor.user_text)", choices=TEMPLATES)
    num_frames: int | None = setting(None, "frames sampled per video", least=1)
    fps: float | None = setting(None, "frame rate the video is sampled at (> 0)")
    max_pixels: int | None = setting(None, "pixels per frame at most", least=28 * 28)
    second_per_grid: str | None = setting(
        None, "Qwen2.5-VL time spacing (stjax.data.video.MediaConfig)", choices=SECOND_PER_GRID
    )
    max_new_tokens: int = setting(512, "tokens generated per answer at most", least=1)
    temperature: float = setting(0.0, "sampling temperature; 0: greedy, the recipe")
    top_p: float = setting(1.0, "nucleus sampling, in (0, 1]")
    top_k: int = setting(0, "sample among the k likeliest tokens; 0: no limit", least=0)
    seed: int = setting(0, "sampling key; with temperature > 0 a resumed run is not batch-for-batch the same")
    batch_size: int = setting(8, "prompts per batch", least=1)
    mesh: str | None = setting(None, "e.g. fsdp=4,tensor=2: shard the model and the batch over the devices")
    max_prompt_tokens: int = setting(
        4096,
        "longer prompts are recorded as failed (the GRPO recipe's limit; the recipe's prompts are about 1k)",
        least=1,
    )
    limit: int | None = setting(None, "evaluate only the first N samples (over all files, in order)", least=1)
    walks: int = setting(
        2,
        "embedded default only (no --model, no --data): walks of its synthetic benchmark, "
        "each a forward and a reverse question on 3 tasks (6 questions per walk)",
        least=1,
    )
    text_only: bool = setting(True, "also run the model with every video frame blank: what it scores without looking")


# The seed's inference recipe: the prompt and media options of a model that records no training recipe.
SEED_RECIPE = {"template": "seed_mcq", "num_frames": 8, "fps": 1.0, "max_pixels": 360 * 420, "second_per_grid": "seed"}


# Options whose change alters predictions: resuming under different ones would mix two runs.
_RESULT_KEYS = (
    "model",
    "revision",
    "dtype",
    "quantize",
    "mode",
    "extract",
    "template",
    "num_frames",
    "fps",
    "max_pixels",
    "second_per_grid",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "max_prompt_tokens",
)


# ---------------------------------------------------------------- data


def read_data(path: Path, video_dir: Path | None) -> ReadResult:
    """One data file, its format told by extension and content."""
    if path.suffix == ".json":
        if video_dir is not None:
            part = PART_FOLDERS.get(path.stem.split("_")[0], "")
            video_dir = video_dir / part if part and (video_dir / part).is_dir() else video_dir
        return read_egost_mcq(path, video_dir)
    if path.suffix == ".jsonl":
        try:
            first = next((line for line in path.read_text().splitlines() if line.strip()), "{}")
            row = json.loads(first)
        except ValueError as e:  # not text, or not JSON
            raise SystemExit(f"{path}: first line is not JSON ({e})") from e
        if not isinstance(row, dict):
            raise SystemExit(f"{path}: first line is not a JSON object")
        if "problem" in row and "options" not in row:
            return read_st_r1_jsonl(path, video_dir)
        return read_plain_jsonl(path, video_dir)
    raise SystemExit(f"{path}: unknown data format (expected Ego-ST .json, ST-R1 or plain .jsonl)")


def load_samples(cfg: EvalConfig) -> tuple[list[tuple[str, Sample]], dict[str, dict[str, int]]]:
    """(file name, sample) in order over all data files, and per file the reasons records were skipped."""
    files: list[Path] = []
    for name in cfg.data:
        path = Path(name)
        files += sorted(path.glob("*_mcq*.json")) if path.is_dir() else [path]
    if not files:
        raise SystemExit("no data files given (--data)")
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise SystemExit(f"data file(s) not found: {', '.join(missing)}")
    names = [p.name for p in files]
    if len(set(names)) != len(names):
        raise SystemExit(f"data files must have distinct names (records are keyed by file name): {names}")
    if len(cfg.videos) not in (0, 1, len(files)):
        raise SystemExit(
            f"--videos: give one folder for all {len(files)} data files or one per file, not {len(cfg.videos)}"
        )
    samples, skipped = [], {}
    for i, path in enumerate(files):
        video_dir = Path(cfg.videos[i if len(cfg.videos) > 1 else 0]) if cfg.videos else None
        result = read_data(path, video_dir)
        ids = [s.id for s in result.samples]
        if len(set(ids)) != len(ids):
            dup = next(x for x in ids if ids.count(x) > 1)
            raise SystemExit(f"{path}: sample id {dup!r} appears more than once")
        samples += [(path.name, s) for s in result.samples]
        skipped[path.name] = dict(result.reasons())
    if not samples:
        raise SystemExit(f"no usable samples in {', '.join(map(str, files))} (records skipped: {skipped})")
    return samples[: cfg.limit], skipped


# ---------------------------------------------------------------- records and accuracy


def load_records(path: str | os.PathLike) -> list[dict]:
    """Records already written. A last line that a crash cut short is repaired in place (completed
    or dropped, then its sample is redone); a bad line elsewhere means the file was edited: an error."""
    path = as_path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        try:
            json.loads(lines[-1])
            write_text_atomic(path, text + "\n")
        except ValueError:
            write_text_atomic(path, text[: len(text) - len(lines[-1])])
            lines = lines[:-1]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise SystemExit(f"{path}:{number}: not a JSON record ({e}); fix or remove the line") from e
    return records


def wilson(correct: int, n: int, z: float = 1.959964) -> list[float]:
    """The 95% Wilson score interval of a proportion (z: the normal quantile): unlike p +- z * se it stays
    inside [0, 1] and does not shrink to a point at 0 or n correct."""
    if not n:
        return [0.0, 1.0]
    p, z2 = correct / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarize(records: list[dict], text_only: list[dict] | None = None) -> dict:
    """Accuracy with its interval and baselines, overall and per file, task and direction. Failed
    samples count as wrong. `text_only`: the same samples' records on blank frames."""

    def tally(group: list[dict], blind: list[dict] | None) -> dict:
        n, correct = len(group), sum(bool(r["correct"]) for r in group)
        out = {
            "n": n,
            "correct": correct,
            "accuracy": correct / n if n else None,
            "interval": wilson(correct, n),
            "failed": sum("error" in r for r in group),
            "no_answer": sum("error" not in r and r["pred"] is None for r in group),
            "chance": sum(1 / r["n_options"] for r in group) / n if n else None,
            "majority": max(Counter(r["gold"] for r in group).values()) / n if n else None,
        }
        if blind is not None:
            hits = sum(bool(r["correct"]) for r in blind)
            out["text_only"] = {
                "n": len(blind),
                "correct": hits,
                "accuracy": hits / len(blind) if blind else None,
                "interval": wilson(hits, len(blind)),
            }
        return out

    def groups(rows: list[dict] | None, key: str) -> dict[str, list[dict]]:
        grouped: dict[str, list[dict]] = defaultdict(list)
        for r in rows or []:
            if r.get(key) is not None:  # a record without a direction is in no direction's group
                grouped[r[key]].append(r)
        return grouped

    out: dict = {"overall": tally(records, text_only)}
    for key in ("file", "task", "direction"):
        seen, blind = groups(records, key), groups(text_only, key)
        out[f"by_{key}"] = {
            name: tally(seen[name], None if text_only is None else blind[name]) for name in breakdown_order(seen)
        }
    return out


def breakdown_order(names) -> list[str]:
    """Ego-ST's three tasks first, in their order, then every other name (other tasks, files,
    directions) sorted: whatever tasks the data has are reported."""
    return [t for t in EGO_ST_TASKS if t in names] + sorted(n for n in names if n not in EGO_ST_TASKS)


def percent_with_interval(t: dict) -> str:
    """'41.7% [32.3, 51.6]': an accuracy and its 95% interval, in percent."""
    if t["accuracy"] is None:
        return "-"
    low, high = t["interval"]
    return f"{100 * t['accuracy']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def format_summary(summary: dict) -> str:
    rows = [("overall", summary["overall"])]
    for key in ("file", "task", "direction"):
        rows += [(f"{key} {name}", t) for name, t in summary[f"by_{key}"].items()]
    width = max(len(name) for name, _ in rows)
    lines = [
        f"{'':{width}}  {'n':>6} {'correct':>7} {'failed':>6} {'no-ans':>6} {'accuracy [95% interval]':>24} "
        f"{'chance':>6} {'majority':>8} {'text-only [95% interval]':>24}"
    ]
    for name, t in rows:
        percent = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
        blind = percent_with_interval(t["text_only"]) if "text_only" in t else "-"
        lines.append(
            f"{name:{width}}  {t['n']:>6} {t['correct']:>7} {t['failed']:>6} {t['no_answer']:>6} "
            f"{percent_with_interval(t):>24} {percent(t['chance']):>6} {percent(t['majority']):>8} "
            f"{blind:>24}"
        )
    return "\n".join(lines)


def record(file: str, sample: Sample, pred: str | None, **extra) -> dict:
    return {
        "id": sample.id,
        "file": file,
        "task": sample.task,
        "direction": sample.direction,
        **extra,
        "pred": pred,
        "gold": sample.answer,
        "correct": pred == sample.answer,
        "n_options": len(sample.options),
    }


# ---------------------------------------------------------------- model side


def sampling_config(cfg: EvalConfig, model_config, eos_ids: tuple[int, ...]) -> SamplingConfig:
    """The evaluator's sampler (greedy by default): one answer of at most max_new_tokens per prompt, at
    --temperature / --top-k / --top-p; the vision placeholders never sampled."""
    return SamplingConfig(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_ids=eos_ids,
        suppress_ids=(model_config.image_token_id, model_config.video_token_id),
    )


@dataclass
class Runner:
    """Model, processor and the fixed token ids; `encode` and `run_batch` do the work."""

    cfg: EvalConfig
    model: object
    processor: object
    tokenizer: object  # a second instance for decoding, so the background encoder never shares one
    letter_ids: dict[str, int]
    mesh: jax.sharding.Mesh | None = None
    blank_media: bool = False  # every video frame and image blank (patch values 0: the processor's mean colour)

    def encode(self, sample: Sample) -> dict[str, np.ndarray] | str:
        """The sample's arrays, or why it cannot be run."""
        try:
            arrays = self.processor(sample, self.cfg.template)
            if self.blank_media:  # the same prompt and grids, so the same positions: only the pixels go
                arrays |= {k: np.zeros_like(arrays[k]) for k in ("pixel_values_videos", "pixel_values")}
        except SampleError as e:
            return str(e)
        except Exception as e:  # any other failure of one sample (resizing, tokenising) is recorded too
            return str(SampleError(f"{type(e).__name__}: {e}", sample_id=sample.id, path=sample.video))
        length = len(arrays["input_ids"])
        if length > self.cfg.max_prompt_tokens:
            return f"prompt has {length} tokens, over --max-prompt-tokens {self.cfg.max_prompt_tokens}"
        return arrays

    def run_batch(self, samples: list[Sample], arrays: list[dict], step: int) -> list[dict]:
        """Record fields (pred, and the response or the letter logits) for each sample of one batch."""
        inputs, length = left_padded_batch(
            self.model.config, arrays, self.cfg.batch_size, self.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        )
        if self.mesh is None:
            return self.run_inputs(samples, inputs, length, step)
        with jax.set_mesh(self.mesh):  # activations split by rows, the backend of the mesh's devices
            return self.run_inputs(samples, shard_inputs(inputs, self.mesh), length, step)

    def run_inputs(self, samples: list[Sample], inputs: ModelInputs, length: int, step: int) -> list[dict]:
        if self.cfg.mode == "logits":
            return self.score_letters(samples, inputs, length)
        return self.decode(samples, inputs, length, step)

    def score_letters(self, samples: list[Sample], inputs: ModelInputs, length: int) -> list[dict]:
        """The option letter with the highest logit right after the prompt (the assistant position)."""
        logits = np.asarray(last_logits(self.model, inputs, length - 1))
        out = []
        for row, sample in enumerate(samples):
            letters = LETTERS[: len(sample.options)]
            missing = [k for k in letters if k not in self.letter_ids]
            if missing:
                raise SystemExit(f"sample {sample.id}: option letter(s) {missing} are not single tokens")
            scores = {k: float(logits[row, self.letter_ids[k]]) for k in letters}
            out.append({"logits": scores, "pred": max(scores, key=scores.get)})
        return out

    def decode(self, samples: list[Sample], inputs: ModelInputs, length: int, step: int) -> list[dict]:
        """Decode with the jitted sampler, detokenise (special tokens skipped), extract the letter."""
        eos_ids = tuple(self.tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
        sampling = sampling_config(self.cfg, self.model.config, eos_ids)
        key = jax.random.fold_in(jax.random.key(self.cfg.seed), step)
        result = generate(self.model, inputs, length, key, sampling)
        tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
        out = []
        for row, sample in enumerate(samples):
            response = self.tokenizer.decode(tokens[row, : lengths[row]], skip_special_tokens=True)
            out.append(
                {
                    "response": response,
                    "new_tokens": int(lengths[row]),
                    "pred": extract_answer(response, sample.options, self.cfg.extract),
                }
            )
        return out


def left_padded_batch(config, arrays: list[dict], batch_size: int, pad_id: int) -> tuple[ModelInputs, int]:
    """Prompts left-padded to a bucketed common length; a short last batch is filled with copies of its
    first prompt, so every batch has the same shape and reuses the compiled programs."""
    arrays = arrays + [arrays[0]] * (batch_size - len(arrays))
    length = bucket(max(len(a["input_ids"]) for a in arrays))
    ids = np.full((len(arrays), length), pad_id, np.int64)
    mask = np.zeros((len(arrays), length), np.int32)
    positions = np.ones((3, len(arrays), length), np.int64)  # padding positions are never used
    for row, a in enumerate(arrays):
        n = len(a["input_ids"])
        ids[row, length - n :], mask[row, length - n :] = a["input_ids"], 1
        positions[:, row, length - n :] = a["position_ids"]
    inputs = prepare_inputs(
        config,
        ids,
        mask,
        pixel_values_videos=np.concatenate([a["pixel_values_videos"] for a in arrays]),
        video_grid_thw=np.concatenate([a["video_grid_thw"] for a in arrays]),
        second_per_grid_ts=np.concatenate([a["second_per_grid_ts"] for a in arrays]),
        position_ids=positions,
    )
    return inputs, length


def last_logits(model, inputs: ModelInputs, position: int) -> jax.Array:
    """Logits (B, vocab) at one position: one prefill, without the (B, L, vocab) tensor of a full forward."""
    inputs = cast_floats(inputs, model.config.compute_dtype)
    graphdef, state = nnx.split(model)
    return _last_logits(graphdef, state, inputs, jnp.int32(position))


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(graphdef, state, inputs: ModelInputs, position: jax.Array) -> jax.Array:
    model = nnx.merge(graphdef, state)
    hidden = jax.lax.dynamic_slice_in_dim(model.hidden_states(inputs), position, 1, axis=1)
    return model.logits(hidden)[:, 0]


def make_runner(cfg: EvalConfig) -> Runner:
    from transformers import AutoTokenizer

    from stjax.data.processor import Processor
    from stjax.models.loading import ModelNotFoundError, load_pretrained, resolve_model_dir

    cfg = with_training_recipe(cfg)
    mesh = make_mesh(parse_mesh(cfg.mesh)) if cfg.mesh else None
    try:
        model_dir = resolve_model_dir(cfg.model, cfg.revision)
        tokenizer_dir = resolve_model_dir(cfg.tokenizer) if cfg.tokenizer else model_dir
    except ModelNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    model, config = load_pretrained(
        model_dir, dtype=cfg.dtype, mesh=mesh, quantize_base=cfg.quantize, quantize_targets="all"
    )
    media = MediaConfig(
        num_frames=cfg.num_frames, fps=cfg.fps, max_pixels=cfg.max_pixels, second_per_grid=cfg.second_per_grid
    )
    processor = Processor.for_model(tokenizer_dir, config, media)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    single = {k: tokenizer.encode(k, add_special_tokens=False) for k in LETTERS}
    letter_ids = {k: ids[0] for k, ids in single.items() if len(ids) == 1}
    return Runner(cfg, model, processor, tokenizer, letter_ids, mesh)


def encoded_batches(
    pending: list[tuple[str, Sample]], runner: Runner, pool: ThreadPoolExecutor
) -> Iterator[tuple[list[tuple[str, Sample]], list[dict | str]]]:
    """Batches of (file, sample) with their arrays; the next batch is read in the background while the
    model runs on the current one (video decoding is the slow host-side step)."""
    size = runner.cfg.batch_size
    chunks = [pending[i : i + size] for i in range(0, len(pending), size)]

    def submit(chunk: list[tuple[str, Sample]]) -> list[Future]:
        return [pool.submit(runner.encode, sample) for _, sample in chunk]

    ahead: list[Future] = submit(chunks[0]) if chunks else []
    for k, chunk in enumerate(chunks):
        current, ahead = ahead, submit(chunks[k + 1]) if k + 1 < len(chunks) else []
        yield chunk, [f.result() for f in current]


# ---------------------------------------------------------------- the run


def batch_records(runner: Runner, chunk: list[tuple[str, Sample]], arrays: list[dict | str], step: int) -> list[dict]:
    """One record per sample of the batch: failures (arrays is the reason) first, then the model's."""
    records = [record(file, s, None, error=a) for (file, s), a in zip(chunk, arrays) if isinstance(a, str)]
    ready = [(file, s, a) for (file, s), a in zip(chunk, arrays) if not isinstance(a, str)]
    if ready:
        results = runner.run_batch([s for _, s, _ in ready], [a for _, _, a in ready], step)
        records += [record(file, s, **result) for (file, s, _), result in zip(ready, results)]
    return records


def embedded_default(cfg: EvalConfig) -> EvalConfig:
    """With neither a model nor data: a synthetic benchmark and a tiny random model under the output
    folder (made once, then reused), named as plain paths; else `cfg` as it is. `cfg` is checked."""
    from stjax.data.synthetic import generate as generate_benchmark

    if cfg.model is not None or cfg.data:
        return cfg
    if is_remote(cfg.out):
        raise SystemExit(
            f"--out {cfg.out}: the embedded default makes its model and data under --out, which must then be local"
        )
    out = Path(cfg.out)
    if not (out / "data" / "plain.jsonl").exists():
        generate_benchmark(out / "data", cfg.walks, cfg.seed)
    if not (out / "tiny-model" / "config.json").exists():
        tiny_model_dir(out / "data" / "tokenizer", out / "tiny-model", "qwen2_5_vl", cfg.seed)
    return dataclasses.replace(cfg, model=str(out / "tiny-model"), data=[str(out / "data" / "plain.jsonl")])


def with_training_recipe(cfg: EvalConfig) -> EvalConfig:
    """The prompt and media options left unset taken from the model's training recipe (a stjax export's),
    else from the seed's; says which."""
    unset = [k for k in SEED_RECIPE if getattr(cfg, k) is None]
    recipe, source = None, "the seed's recipe (the model records no training recipe)"
    if unset and cfg.model:
        from stjax.data.processor import TRAINING_RECIPE, read_training_recipe
        from stjax.models.loading import ModelNotFoundError, resolve_model_dir

        try:
            recipe = read_training_recipe(resolve_model_dir(cfg.model, cfg.revision))
        except ModelNotFoundError:  # reported where the model is loaded
            source = "the seed's recipe (the model is not found)"
        if recipe is not None:
            source = f"the model's training recipe ({TRAINING_RECIPE}, {recipe.get('stage')} stage)"
    values = {k: (recipe or SEED_RECIPE).get(k, SEED_RECIPE[k]) for k in unset}
    if values:
        print(
            f"evaluating with {source}: "
            + ", ".join(f"{k}={v!r}" for k, v in values.items())
            + " (set these options to override)"
        )
    return dataclasses.replace(cfg, **values)


# `check_config`'s words for a bad option: the flag as it is typed (`stjax.settings.check_fields`)
FLAG_MESSAGES = {
    "finite": "{flag} {value}: must be a finite number",
    "choices": "{flag} {value!r} is not one of {allowed}",
    "least": "{flag} {value}: must be >= {least}",
}


def check_config(cfg: EvalConfig) -> None:
    """Every option's type, choices and range, before any work (a YAML file's values are not checked
    by the flag parser, a config made in Python by neither); the prompt and media options may be unset
    (None: `with_training_recipe` fills them)."""
    for f in dataclasses.fields(EvalConfig):
        value = getattr(cfg, f.name)
        kinds = {int: (int,), float: (int, float)}.get(type(SEED_RECIPE.get(f.name, f.default)))
        unset = f.name in SEED_RECIPE and value is None
        if kinds and not unset and (isinstance(value, bool) or not isinstance(value, kinds)):
            raise SystemExit(
                f"--{f.name.replace('_', '-')} takes a{'n integer' if kinds == (int,) else ' number'}, got {value!r}"
            )
    try:
        check_fields(cfg, messages=FLAG_MESSAGES)
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    if not ((cfg.fps is None or cfg.fps > 0) and cfg.temperature >= 0 and 0 < cfg.top_p <= 1):
        raise SystemExit(
            f"--fps {cfg.fps} must be > 0, --temperature {cfg.temperature} >= 0, --top-p {cfg.top_p} in (0, 1]"
        )


def input_fingerprints(cfg: EvalConfig) -> dict[str, str]:
    """What the recorded predictions were made from: each data file's SHA-256, and the model's files by
    size and modification time (hashing a 15 GB model on every resume would cost minutes)."""
    out = {}
    for name in cfg.data:
        for path in sorted(Path(name).glob("*_mcq*.json")) if Path(name).is_dir() else [Path(name)]:
            if path.is_file():
                out[f"data {path.name}"] = file_digest(path)
    return out | {f"model {name}": value for name, value in model_fingerprints(cfg.model).items()}


def check_resumable(out: epath.Path, cfg: EvalConfig) -> None:
    """Refuse to add predictions made under other settings, or from changed data or model files, to an
    existing predictions file."""
    current = {k: getattr(cfg, k) for k in _RESULT_KEYS} | {"inputs": input_fingerprints(cfg)}
    run_file = out / RUN
    if run_file.exists() and (out / PREDICTIONS).exists():
        before = json.loads(run_file.read_text())
        # the training run's comparison (stjax.settings.changed); inputs not recorded before are not compared
        inputs = tuple(f"inputs.{k}" for k in current["inputs"] if k in before.get("inputs", {}))
        differ = [k.removeprefix("inputs.") for k in changed(before, current, _RESULT_KEYS + inputs)]
        if differ:
            raise SystemExit(
                f"{out / PREDICTIONS} was made with other settings or inputs ({', '.join(differ)} "
                "differ); use another --out or remove that file"
            )
    write_text_atomic(run_file, json.dumps(current, indent=1) + "\n")


def evaluate(cfg: EvalConfig) -> dict:
    """Run (or resume) an evaluation; returns the accuracy summary, also written to accuracy.json."""
    check_config(cfg)
    return evaluate_resolved(with_training_recipe(cfg))


def evaluate_resolved(cfg: EvalConfig) -> dict:
    """`evaluate` of a config already checked, its recipe resolved (`parse_config`'s)."""
    try:
        out = as_path(cfg.out)  # local, or an object store URL (stjax.io)
    except OutputError as e:
        raise SystemExit(f"--out {e}") from None
    if cfg.model is None or not cfg.data:
        raise SystemExit("give both --model and --data, or neither for the embedded default")
    with DirectoryLock(out, "evaluation"):  # two runs on one --out would record every sample twice
        return _evaluate(cfg, out)


def predict(runner: Callable[[], Runner], samples: list[tuple[str, Sample]], path: epath.Path, desc: str) -> list[dict]:
    """The samples' records in `path`, running those not yet recorded (the runner is made only then)."""
    done = {(r["file"], r["id"]) for r in load_records(path)}
    pending = [(file, s) for file, s in samples if (file, s.id) not in done]
    if pending:
        model = runner()
        with (
            AppendLog(path, durable=True) as f,
            ThreadPoolExecutor(1) as pool,
            tqdm(total=len(samples), initial=len(samples) - len(pending), unit="sample", desc=desc) as bar,
        ):
            for step, (chunk, arrays) in enumerate(encoded_batches(pending, model, pool)):
                records = batch_records(model, chunk, arrays, step)
                f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
                bar.update(len(chunk))
    keys = {(file, s.id) for file, s in samples}
    return [r for r in load_records(path) if (r["file"], r["id"]) in keys]


def _evaluate(cfg: EvalConfig, out: epath.Path) -> dict:
    samples, skipped = load_samples(cfg)
    check_resumable(out, cfg)
    runner = functools.cache(lambda: make_runner(cfg))  # loaded once, for both passes, and only if needed
    records = predict(runner, samples, out / PREDICTIONS, "eval")
    blind = None
    if cfg.text_only:
        blind = predict(
            lambda: dataclasses.replace(runner(), blank_media=True), samples, out / TEXT_ONLY, "eval, blank frames"
        )
    summary = summarize(records, blind)
    summary["skipped_records"] = skipped
    write_text_atomic(out / ACCURACY, json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    if any(skipped.values()):
        print(f"records skipped while reading (not scored): {skipped}")
    print(f"predictions: {out / PREDICTIONS}; accuracy: {out / ACCURACY}")
    return summary


# ---------------------------------------------------------------- command line


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """Defaults, then the YAML file's keys, then the flags given on the command line; checked (`check_config`),
    then the model's training recipe (or the seed's) for the prompt and media options still unset: a bad
    option is refused before the model is looked up."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument("--config", help="YAML file with any of the options below")
    help_of = {f.name: f.metadata["help"] for f in dataclasses.fields(EvalConfig)}
    parser.add_argument("--data", nargs="+", help=help_of["data"])
    parser.add_argument("--videos", nargs="+", help=help_of["videos"])
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="compile the evaluation's program for "
        "--topology and report memory, collectives and roofline per chip; evaluate nothing",
    )
    parser.add_argument(
        "--topology",
        help="with --compile-only: a TPU topology (v5p:2x2x1, v5e:4x4, ...) or a GPU "
        "mesh (h100x8); default: the devices present",
    )
    for f in dataclasses.fields(EvalConfig):
        if f.name in ("data", "videos"):
            continue
        least = f" (>= {f.metadata['least']})" if f.metadata["least"] is not None else ""
        default = (
            f"a stjax model's training recipe, else {SEED_RECIPE[f.name]!r}"
            if f.name in SEED_RECIPE
            else repr(f.default)
        )
        text = f"{f.metadata['help']}{least}; default: {default}".replace("%", "%%")
        if isinstance(f.default, bool):
            parser.add_argument(f"--{f.name.replace('_', '-')}", action=argparse.BooleanOptionalAction, help=text)
            continue
        kind = int if f.name == "limit" else {int: int, float: float}.get(type(SEED_RECIPE.get(f.name, f.default)), str)
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", type=kind, choices=f.metadata["choices"] or None, help=text
        )
    add_debug_flag(parser)
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)
    values = {}
    if "config" in args:
        path = args.pop("config")
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        names = {f.name for f in dataclasses.fields(EvalConfig)}
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in names:
                raise SystemExit(f"{path}: unknown option {key!r}")
            if name in ("data", "videos"):  # a list of paths, or one path
                value = [str(v) for v in (value if isinstance(value, list) else [value])]
            values[name] = value
        try:  # the training config's reader: each value as its option's type
            values = dataclasses.asdict(from_dict(EvalConfig, values))
        except ConfigError as e:
            raise SystemExit(f"{path}: {e}") from None
    cfg = EvalConfig(**(values | args))
    check_config(cfg)
    return with_training_recipe(cfg)


def compile_programs(cfg: EvalConfig, mesh) -> list:
    """The evaluator's compiled program for `--compile-only` (`stjax.compile_only`): the sampler
    (prefill and decoding) or, in logits mode, the prompt's forward; `batch_size` prompts of the
    `max_prompt_tokens` bucket, each with the largest video `num_frames` and `max_pixels` admit."""
    from stjax import compile_only as co
    from stjax.models.qwen_vl import abstract_model
    from stjax.sampling.sampler import sample
    from stjax.train.compile_only import sampler_flops
    from stjax.train.metrics import model_flops_per_token, vision_flops

    policy = {"param_dtype": cfg.dtype} if cfg.dtype else {}
    config = co.model_config(cfg.model or "", quantize_base=cfg.quantize, quantize_targets="all", **policy)
    graphdef, weights = nnx.split(abstract_model(config))
    weights = co.abstract_state(weights, mesh)
    grid = co.largest_grid(config, cfg.num_frames, cfg.max_pixels)
    length = bucket(cfg.max_prompt_tokens)
    one = co.example_inputs(config, 1, length, grid)
    inputs = co.placed_inputs(
        cast_floats(co.example_inputs(config, cfg.batch_size, length, grid), config.compute_dtype), mesh
    )
    position = co.abstract((), jnp.int32, None)
    if cfg.mode == "logits":
        flops = (
            model_flops_per_token(config, length) * cfg.batch_size * length
            + vision_flops(config, one, {"patches": cfg.batch_size * int(one.vision.frames.lengths.sum())})
        ) / 3
        return [co.Program("eval prompt logits", _last_logits, (graphdef, weights, inputs, position), flops, passes=1)]
    sampling = sampling_config(cfg, config, (config.eos_token_id,))
    starts = co.abstract((cfg.batch_size,), jnp.int32, None)
    key = co.abstract((), jax.random.key(0).dtype, None)
    flops = sampler_flops(config, one, cfg.batch_size, 1, cfg.max_new_tokens)
    return [
        co.Program(
            "eval sampler (prefill + decoding)",
            sample,
            (graphdef, sampling, weights, inputs, position, starts, key),
            flops,
            passes=1 + cfg.max_new_tokens,
        )
    ]


def compile_only(cfg: EvalConfig, topology: str | None) -> None:
    """`--compile-only`: compile the evaluator's program for `topology` and report, evaluating nothing.
    `cfg` is `parse_config`'s (checked, its recipe resolved)."""
    from stjax import compile_only as co

    target = co.target(topology)
    mesh = make_mesh(parse_mesh(cfg.mesh or "fsdp=-1"), target.devices)
    print(f"evaluation compiled for {target.name} ({len(target.devices)} devices), mesh {dict(mesh.shape)}")
    co.run_programs(compile_programs(cfg, mesh), target, mesh)


def main(argv: list[str] | None = None) -> None:
    """Evaluate; a run in which no sample could be evaluated exits non-zero."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--compile-only", action="store_true")
    flags.add_argument("--topology")
    compiling, argv = flags.parse_known_args(argv)
    if compiling.compile_only:
        return compile_only(parse_config(argv), compiling.topology)
    overall = evaluate_resolved(embedded_default(parse_config(argv)))["overall"]
    if overall["n"] == overall["failed"]:
        raise SystemExit(
            f"error: none of the {overall['n']} samples could be evaluated (their errors are in {PREDICTIONS})"
        )


if __name__ == "__main__":
    run_cli(main)
