"""The training run's configuration: nested dataclasses filled from a YAML file and `--set` overrides.

    python -m stjax.train --stage sft --config configs/sft/qwen2-vl-7b-h100x4.yaml --set optim.learning_rate=1e-5

Every key of the YAML file must name a field below (a typo is an error, not a silently ignored
setting); `--set a.b=value` overrides one field, the value read as YAML (numbers, lists, true/false).
`check` validates the whole run against the devices before anything is loaded or compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from stjax.data.formats import TASKS
from stjax.data.video import SECOND_PER_GRID
from stjax.io import OutputError, as_path, is_remote
from stjax.models.attention import BACKENDS
from stjax.models.config import QUANTIZE_FORMATS, QUANTIZE_TARGETS
from stjax.models.layers import REMAT_POLICIES
from stjax.sharding import mesh_shape, parse_mesh
from stjax.train import rewards
from stjax.train.reporters import check_report_to
from stjax.train.step import OptimConfig


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """A training config that cannot run; raised before any compilation."""


@dataclass(frozen=True)
class ModelSection:
    # A Hugging Face or stjax model directory, a preset name (configs/models/*.json, random weights) or
    # a hub id (Qwen/Qwen2.5-VL-7B-Instruct, through the Hugging Face cache), tried in that order.
    # Empty: the embedded default, a tiny random model matching the tokenizer.
    init: str = ""
    revision: str = ""  # hub id only: branch, tag or commit (default: main)
    arch: str = "qwen2_vl"  # architecture of the embedded default model
    param_dtype: str = "float32"  # dtype the weights are loaded in (the frozen ones stay so)
    master_dtype: str = "float32"  # the optimizer's copy of the trained weights
    compute_dtype: str = "float32"
    attention: str = "auto"  # see stjax.models.attention.BACKENDS
    remat: str = "none"  # see stjax.models.layers.REMAT_POLICIES


@dataclass(frozen=True)
class LoRASection:
    rank: int = 0  # 0: full fine-tuning
    alpha: float = 8.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    # QLoRA: the frozen base stored quantized on load (stjax.models.quant): none | nf4 | int8 ...
    quantize_base: str = "none"
    # ... for the linears LoRA targets (lora) or every linear of the decoder and the vision tower (all)
    quantize_targets: str = "lora"
    double_quant: bool = False  # nf4's block scales quantized too (bitsandbytes' bnb_4bit_use_double_quant)


@dataclass(frozen=True)
class DataSection:
    format: str = "synthetic"  # synthetic | st_r1 | plain
    path: str = ""  # the JSONL file (synthetic: where to render; default <out_dir>/data)
    video_root: str = ""  # base directory of relative video paths (st_r1, plain)
    tokenizer: str = ""  # tokenizer directory or hub id; default: the model's, or the synthetic one
    synthetic_walks: int = 4  # synthetic data: walks to render (a forward and a reverse question per task)
    synthetic_tasks: tuple[str, ...] = ("direction", "landmark", "action")  # ... of stjax.data.synthetic.STEPS
    template: str = ""  # the prompt template (stjax.data.processor.user_text); empty: sft for SFT, grpo for GRPO
    loss_rule: str = "assistant"  # assistant | release
    num_frames: int = 8
    fps: float = 1.0
    max_pixels: int = 360 * 420
    second_per_grid: str = "seed"  # Qwen2.5-VL time spacing: seed | kept_frames (stjax.data.video.MediaConfig)
    shuffle: bool = True
    num_workers: int = 0
    token_buckets: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    patch_buckets: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384)


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 100  # steps between saves (0: only at the end and on SIGTERM)
    keep: int = 3  # checkpoints kept (the oldest are deleted)
    async_save: bool = True  # write in the background while training goes on
    export_hf: bool = True  # write <out_dir>/hf (LoRA merged) at the end


@dataclass(frozen=True)
class DistributedSection:
    """Multi-host: left empty, SLURM and TPU VMs are detected from the environment."""

    coordinator: str = ""  # host:port of process 0
    num_processes: int = 0
    process_id: int = -1


@dataclass(frozen=True)
class GRPOSection:
    """GRPO settings, named as TRL's `GRPOConfig` names them; defaults are the release's recipe
    (where TRL's differ: beta 0.0, loss_type dapo). `batch_size` counts completions, as TRL's
    effective batch does: a step samples batch_size / num_generations prompts."""

    num_generations: int = 8  # G: completions per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    max_completion_length: int = 256
    beta: float = 0.1  # KL to the reference model; 0 keeps no reference model at all
    epsilon: float = 0.2  # ratio clipping below 1 (TRL's epsilon_low)
    epsilon_high: float = 0.0  # ratio clipping above 1; 0: the same as epsilon
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | cispo
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    scale_rewards: str = "group"  # group | batch | none
    num_iterations: int = 1  # optimizer updates per rollout batch
    mask_truncated_completions: bool = False  # completions that hit the length limit weigh nothing
    # Named rewards (stjax.train.rewards.REWARDS) or dotted paths to functions of one's own.
    reward_funcs: tuple[str, ...] = ("accuracy",)
    reward_weights: tuple[float, ...] = ()  # one per reward; empty: all 1
    accuracy_rule: str = "release"  # release (first letter inside <answer>) | default (the evaluator's extractor)
    rollout_mesh: str = ""  # the weights' placement for decoding (e.g. tensor=-1); empty: the training mesh
    log_completions_steps: int = 10  # every k steps a few completions go to <out_dir>/completions.jsonl
    num_completions_to_print: int = 4


@dataclass(frozen=True)
class TrainConfig:
    stage: str = "sft"
    out_dir: str = "runs/sft"
    seed: int = 0
    steps: int = 0  # optimizer steps; 0: epochs over the data
    epochs: int = 1
    batch_size: int = 4  # samples per optimizer step, over all devices
    micro_batch_size: int = 0  # samples per forward/backward over all devices; 0: batch_size
    loss_average: str = "token"  # token | sequence
    loss_chunk: int = 512  # positions of each row whose logits are made at once (less memory, same loss); 0: all
    mesh: str = "fsdp=-1"  # data=..,fsdp=..,tensor=..; -1: the remaining devices
    max_bad_steps: int = 5  # this many non-finite steps in a row stop the run
    peak_flops: float = 0.0  # per-device peak for MFU; 0: look the device up
    # a plain metric line every this many steps where stdout is not a terminal (a batch job's log; a terminal
    # shows a progress bar); below 1: that fraction of the run's steps (TRL's meaning, and TRL's default 10)
    logging_steps: float = 10
    report_to: tuple[str, ...] = ()  # tensorboard, wandb (stjax.train.reporters); every step's metrics; none
    model: ModelSection = field(default_factory=ModelSection)
    lora: LoRASection = field(default_factory=LoRASection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """A YAML value as the field's type (ints for floats, lists for tuples), or a ConfigError."""
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a section; give it a mapping, not {value!r}")
        return from_dict(kind, value, key + ".")
    origin = getattr(kind, "__origin__", None)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} takes a list, got {value!r}")
        return tuple(_coerce(v, kind.__args__[0], key) for v in value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        try:
            return float(value)  # YAML reads 1e-5 as a string
        except ValueError:
            pass
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(f"{key} takes a {kind.__name__}, got {value!r}")
    return value


def from_dict(cls: type, values: dict, prefix: str = "") -> Any:
    """The dataclass `cls` from a (nested) mapping; unknown keys are errors that list the known ones."""
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; {prefix or 'the top level '}takes "
                          f"{', '.join(sorted(known))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in values.items()})


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """`key.sub=value` strings applied to a nested mapping (values read as YAML)."""
    values = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes key=value, got {item!r}")
        *parents, name = key.strip().split(".")
        node = values
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[name] = yaml.safe_load(text)
    return values


# The embedded default run of each stage (`python -m stjax.train --stage S`, no --config): a tiny model
# on the synthetic ego-centric set, sized to learn on a laptop CPU in minutes (`python -m stjax.demo`
# measures what it learns on held-out walks). Its task is the synthetic walls question (the corridor's
# paint), one a tiny vision tower can answer from pixels; Ego-ST's own tasks are far beyond a model this
# size. The dataclass defaults above stay the release's recipe.
_TINY_DATA = {"synthetic_walks": 48, "synthetic_tasks": ["walls"], "max_pixels": 12544,  # 112 x 112 frames
              "token_buckets": [256, 512, 1024], "patch_buckets": [256, 512, 1024]}
EMBEDDED: dict[str, dict[str, Any]] = {
    # 300 steps: the paint is learned suddenly, between steps 50 and 80 (a run of 80 steps, its learning
    # rate decayed sooner, stays at chance)
    "sft": {"out_dir": "runs/sft", "steps": 300, "batch_size": 8, "data": _TINY_DATA,
            "optim": {"learning_rate": 5e-3, "max_grad_norm": 1.0}, "checkpoint": {"every": 100}},
    "grpo": {"out_dir": "runs/grpo", "steps": 30, "batch_size": 32,
             "data": {**_TINY_DATA, "template": "problem"},  # the cold start's prompt: a tiny model cannot follow another
             "optim": {"learning_rate": 5e-4, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
             # the format reward weighs a tenth of the accuracy reward, so it cannot carry the reward curve
             "grpo": {"num_generations": 8, "max_completion_length": 96, "beta": 0.04,
                      "reward_funcs": ["accuracy", "format"], "reward_weights": [1.0, 0.1]},
             "checkpoint": {"every": 10}},
}


def merge(values: dict, changes: dict) -> dict:
    """`values` with `changes` applied; a section given as a mapping changes only the keys it names."""
    out = dict(values)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def load(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None, **fixed: Any) -> TrainConfig:
    """The run's config: the YAML file (else `defaults`, else the dataclass defaults), then `fixed`
    values (a section merged key by key), then overrides."""
    values: dict = json.loads(json.dumps(defaults or {}))  # a deep copy
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    values = merge(values, fixed)
    return from_dict(TrainConfig, apply_overrides(values, list(overrides)))


def _floats(values: dict, prefix: str = "") -> Iterator[tuple[str, float]]:
    """(key, value) of every float setting of a nested mapping, list items included."""
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _floats(value, f"{prefix}{key}.")
        else:
            yield from ((prefix + key, v) for v in (value if isinstance(value, (list, tuple)) else [value])
                        if isinstance(v, float))


def check(cfg: TrainConfig, num_devices: int, num_processes: int = 1) -> dict[str, int]:
    """Every error a run can know of before loading or compiling anything; returns the mesh shape."""
    choices = {"stage": ("sft", "grpo"), "loss_average": ("token", "sequence"), "model.remat": tuple(REMAT_POLICIES),
               "model.attention": BACKENDS, "data.format": ("synthetic", "st_r1", "plain"),
               "data.loss_rule": ("assistant", "release"), "data.second_per_grid": SECOND_PER_GRID,
               "data.template": ("", "sft", "grpo", "problem", "seed_mcq"),
               "model.param_dtype": ("float32", "bfloat16"), "model.compute_dtype": ("float32", "bfloat16"),
               "model.master_dtype": ("float32", "bfloat16"),
               "grpo.loss_type": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo"),
               "grpo.importance_sampling_level": ("token", "sequence"),
               "grpo.scale_rewards": ("group", "batch", "none"), "grpo.accuracy_rule": ("release", "default"),
               "lora.quantize_base": QUANTIZE_FORMATS, "lora.quantize_targets": QUANTIZE_TARGETS}
    for key, value in _floats(dataclasses.asdict(cfg)):
        if not math.isfinite(value):  # NaN passes every range check below
            raise ConfigError(f"{key}={value} must be a finite number")
    for key, allowed in choices.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(allowed)}")
    d, o = cfg.data, cfg.optim
    ranges = [("steps", cfg.steps, 0, "0: epochs over the data"), ("epochs", cfg.epochs, 1, ""),
              ("batch_size", cfg.batch_size, 1, ""), ("micro_batch_size", cfg.micro_batch_size, 0, "0: batch_size"),
              ("data.num_frames", d.num_frames, 1, ""),
              ("data.max_pixels", d.max_pixels, 28 * 28, "one merged patch"), ("data.num_workers", d.num_workers, 0, ""),
              ("data.synthetic_walks", d.synthetic_walks, 1, ""), ("optim.total_steps", o.total_steps, 0, "")]
    for key, value, least, why in ranges:
        if value < least:
            raise ConfigError(f"{key}={value} must be >= {least}" + (f" ({why})" if why else ""))
    if not (d.fps > 0 and o.learning_rate >= 0 and 0 <= o.warmup_ratio <= 1 and o.max_grad_norm >= 0):
        raise ConfigError(f"data.fps={d.fps} must be > 0, optim.learning_rate={o.learning_rate} >= 0, "
                          f"optim.warmup_ratio={o.warmup_ratio} in [0, 1], optim.max_grad_norm={o.max_grad_norm} >= 0")
    if min(d.token_buckets + d.patch_buckets, default=0) < 1:
        raise ConfigError(f"data.token_buckets {d.token_buckets} and data.patch_buckets {d.patch_buckets} must be "
                          "non-empty lists of positive sizes")
    try:
        mesh = mesh_shape(parse_mesh(cfg.mesh), num_devices)
    except ValueError as e:
        raise ConfigError(f"mesh={cfg.mesh!r}: {e}") from None
    micro = cfg.micro_batch_size or cfg.batch_size
    if cfg.batch_size <= 0 or micro <= 0 or cfg.batch_size % micro:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a positive multiple of micro_batch_size={micro}")
    shards = mesh["data"] * mesh["fsdp"]
    if micro % shards:
        raise ConfigError(f"micro-batch of {micro} samples does not divide over data x fsdp = {shards} devices "
                          f"of mesh {mesh}; use a multiple of {shards}")
    if micro % num_processes:
        raise ConfigError(f"micro-batch of {micro} samples does not divide over {num_processes} processes")
    if cfg.lora.rank < 0 or not 0 <= cfg.lora.dropout < 1:
        raise ConfigError(f"lora.rank must be >= 0 and lora.dropout in [0, 1), got {cfg.lora.rank}, {cfg.lora.dropout}")
    if cfg.lora.quantize_base != "none" and not cfg.lora.rank:
        raise ConfigError(f"lora.quantize_base={cfg.lora.quantize_base} freezes the base: it needs adapters to train "
                          "(lora.rank > 0)")
    if cfg.lora.double_quant and cfg.lora.quantize_base != "nf4":
        raise ConfigError(f"lora.double_quant quantizes nf4's block scales; lora.quantize_base is "
                          f"{cfg.lora.quantize_base}")
    unknown = sorted(set(cfg.lora.targets) - set(LORA_TARGETS))
    if unknown:
        raise ConfigError(f"lora.targets {unknown} are not decoder projections; choose from {', '.join(LORA_TARGETS)}")
    if not cfg.logging_steps > 0:
        raise ConfigError(f"logging_steps={cfg.logging_steps} must be > 0 (below 1: a fraction of the steps)")
    try:
        check_report_to(cfg.report_to)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.max_bad_steps < 1 or cfg.checkpoint.keep < 1 or cfg.checkpoint.every < 0 or cfg.loss_chunk < 0:
        raise ConfigError("max_bad_steps and checkpoint.keep must be >= 1, checkpoint.every and loss_chunk >= 0")
    if not cfg.data.synthetic_tasks or set(cfg.data.synthetic_tasks) - set(TASKS):
        raise ConfigError(f"data.synthetic_tasks {list(cfg.data.synthetic_tasks)} must name some of {', '.join(TASKS)}")
    if cfg.data.format != "synthetic" and not cfg.data.path:
        raise ConfigError(f"data.format={cfg.data.format} needs data.path")
    wrong_template = cfg.data.template not in ("", "sft") if cfg.stage == "sft" else cfg.data.template == "sft"
    if wrong_template:
        raise ConfigError(f"data.template={cfg.data.template!r} does not fit the {cfg.stage} stage (sft trains on the "
                          "sft template's targets; grpo takes a prompt alone: grpo, problem or seed_mcq)")
    if cfg.stage == "grpo":
        check_grpo(cfg, shards, num_devices, num_processes)
    return mesh


def check_out_dir(cfg: TrainConfig) -> None:
    """An object store out_dir needs its client, and holds outputs only: the inputs a run would make
    under out_dir (the embedded tiny model, the synthetic set) are read locally, so they must be given."""
    try:
        out = as_path(cfg.out_dir)
    except OutputError as e:
        raise ConfigError(str(e)) from None
    if is_remote(out) and (not cfg.model.init or (cfg.data.format == "synthetic" and not cfg.data.path)):
        raise ConfigError(f"out_dir={cfg.out_dir} is on an object store, which holds a run's outputs only: set "
                          "model.init and, for the synthetic set, data.path to local paths")


def check_grpo(cfg: TrainConfig, shards: int, num_devices: int, num_processes: int) -> None:
    g = cfg.grpo
    if g.num_generations < 2 or cfg.batch_size % g.num_generations:
        raise ConfigError(f"batch_size={cfg.batch_size} counts completions: it must be a multiple of "
                          f"grpo.num_generations={g.num_generations} (at least 2, for a group to compare)")
    prompts = cfg.batch_size // g.num_generations
    if prompts % shards or prompts % num_processes:
        raise ConfigError(f"{prompts} prompts per step (batch_size / num_generations) must divide over data x fsdp "
                          f"= {shards} devices and {num_processes} processes (each process samples whole groups)")
    if g.max_completion_length < 1 or g.num_iterations < 1 or g.temperature <= 0 or not 0 < g.top_p <= 1 or g.top_k < 0:
        raise ConfigError("grpo: max_completion_length and num_iterations must be >= 1, temperature > 0, "
                          "top_p in (0, 1], top_k >= 0")
    if g.beta < 0 or g.epsilon < 0 or g.epsilon_high < 0:
        raise ConfigError("grpo: beta, epsilon and epsilon_high must be >= 0")
    if not g.reward_funcs or (g.reward_weights and len(g.reward_weights) != len(g.reward_funcs)):
        raise ConfigError(f"grpo.reward_weights needs one weight per reward function {list(g.reward_funcs)}")
    for name in g.reward_funcs:
        try:
            rewards.resolve(name, g.accuracy_rule)
        except ValueError as e:
            raise ConfigError(f"grpo.reward_funcs: {e}") from None
    if g.rollout_mesh:
        try:
            mesh_shape(parse_mesh(g.rollout_mesh), num_devices)
        except ValueError as e:
            raise ConfigError(f"grpo.rollout_mesh={g.rollout_mesh!r}: {e}") from None
