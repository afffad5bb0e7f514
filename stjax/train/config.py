"""The training run's configuration: nested dataclasses filled from a YAML file and `--set` overrides.

    python -m stjax.train --stage sft --config configs/sft/qwen2-vl-7b-h100x4.yaml --set optim.learning_rate=1e-5

Every key of the YAML file must name a field below (a typo is an error, not a silently ignored
setting; a renamed key names its new name); `--set a.b=value` overrides one field, the value read as
YAML (numbers, lists, true/false). Each field documents itself (`stjax.settings.setting`: its meaning
and allowed values, which `--help` lists); each section checks itself, and `check` validates the whole
run against the devices before anything is loaded or compiled. `STAGES` registers the training stages.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml

from stjax.data.formats import TASKS
from stjax.data.processor import Template
from stjax.data.video import SECOND_PER_GRID
from stjax.io import OutputError, as_path, is_remote
from stjax.models.attention import BACKENDS
from stjax.models.config import QUANTIZE_FORMATS, QUANTIZE_TARGETS
from stjax.models.families import model_types
from stjax.models.layers import REMAT_POLICIES
from stjax.settings import ConfigError, apply_overrides, check_fields, from_dict, merge, setting
from stjax.sharding import mesh_shape, parse_mesh
from stjax.train import rewards
from stjax.train.reporters import REPORTERS, check_report_to
from stjax.train.step import OptimConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = ("float32", "bfloat16")
TEMPLATES = ("",) + get_args(Template)  # "": the stage's own

# Keys renamed to the names TRL / transformers / PEFT users type: the old ones are refused with the new name.
RENAMED = {
    "out_dir": "output_dir",
    "steps": "max_steps",
    "epochs": "num_train_epochs",
    "micro_batch_size": "gradient_accumulation_steps",
    "model.init": "model.model_name_or_path",
    "model.remat": "model.gradient_checkpointing",
    "lora.rank": "lora.r",
    "lora.alpha": "lora.lora_alpha",
    "lora.dropout": "lora.lora_dropout",
    "lora.targets": "lora.target_modules",
    "data.num_workers": "data.dataloader_num_workers",
    "optim.b1": "optim.adam_beta1",
    "optim.b2": "optim.adam_beta2",
    "optim.eps": "optim.adam_epsilon",
    "checkpoint.every": "checkpoint.save_steps",
    "checkpoint.keep": "checkpoint.save_total_limit",
}
HINTS = {old: f"is now `{new}`" for old, new in RENAMED.items()}
HINTS["micro_batch_size"] += " (= batch_size / micro_batch_size)"
# TRL keys whose meaning a stjax key holds otherwise: refused with where that meaning lives.
HINTS |= {
    key: "is TRL's per-device batch; stjax takes `batch_size`, the global batch (per_device_train_batch_size "
    "x data x fsdp devices x gradient_accumulation_steps)"
    for key in ("per_device_train_batch_size", "train_batch_size")
}


@dataclass(frozen=True)
class ModelSection:
    model_name_or_path: str = setting(
        "",
        "a Hugging Face or stjax model directory, a preset (configs/models/*.json, random weights) or a hub id, "
        "tried in that order; empty: the embedded default's tiny random model",
    )
    revision: str = setting("", "hub id only: branch, tag or commit (empty: main)")
    arch: str = setting("qwen2_vl", "architecture of the embedded default model", choices=model_types())
    param_dtype: str = setting("float32", "dtype the weights are loaded in (the frozen ones stay so)", choices=DTYPES)
    master_dtype: str = setting("float32", "the optimizer's copy of the trained weights", choices=DTYPES)
    compute_dtype: str = setting("float32", "dtype of the activations and matmuls", choices=DTYPES)
    attention: str = setting("auto", "attention kernel (stjax.models.attention)", choices=BACKENDS)
    gradient_checkpointing: str = setting(
        "none",
        "activations recomputed in the backward pass (true: full, false: none)",
        choices=tuple(REMAT_POLICIES),
        aliases={True: "full", False: "none"},
    )

    def check(self) -> None:
        check_fields(self, "model.")


@dataclass(frozen=True)
class LoRASection:
    r: int = setting(0, "LoRA rank (PEFT's r); 0: full fine-tuning", least=0)
    lora_alpha: float = setting(8.0, "adapter scale alpha / r")
    lora_dropout: float = setting(0.0, "dropout on the adapters' input, in [0, 1)", least=0.0)
    target_modules: tuple[str, ...] = setting(
        ("q_proj", "k_proj", "v_proj", "o_proj"), "decoder projections that get adapters", choices=LORA_TARGETS
    )
    quantize_base: str = setting(
        "none", "QLoRA: the frozen base stored quantized on load (stjax.models.quant)", choices=QUANTIZE_FORMATS
    )
    quantize_targets: str = setting(
        "lora",
        "what quantize_base stores quantized: the linears LoRA targets (lora) "
        "or every linear of the decoder and the vision tower (all)",
        choices=QUANTIZE_TARGETS,
    )
    double_quant: bool = setting(False, "nf4's block scales quantized too (bitsandbytes' bnb_4bit_use_double_quant)")

    def check(self) -> None:
        check_fields(self, "lora.")
        if self.lora_dropout >= 1:
            raise ConfigError(f"lora.lora_dropout={self.lora_dropout} must be in [0, 1)")
        if self.quantize_base != "none" and not self.r:
            raise ConfigError(
                f"lora.quantize_base={self.quantize_base} freezes the base: it needs adapters to train (lora.r > 0)"
            )
        if self.double_quant and self.quantize_base != "nf4":
            raise ConfigError(
                f"lora.double_quant quantizes nf4's block scales; lora.quantize_base is {self.quantize_base}"
            )


@dataclass(frozen=True)
class DataSection:
    format: str = setting("synthetic", "the data's format (README: own data)", choices=("synthetic", "st_r1", "plain"))
    path: str = setting("", "the JSONL file (synthetic: where to render it; empty: <output_dir>/data)")
    video_root: str = setting("", "base directory of relative video paths (st_r1, plain)")
    tokenizer: str = setting("", "tokenizer directory or hub id; empty: the model's, or the synthetic one")
    synthetic_walks: int = setting(
        4, "synthetic data: walks to render (a forward and a reverse question per task)", least=1
    )
    synthetic_tasks: tuple[str, ...] = setting(
        ("direction", "landmark", "action"), "synthetic data: the tasks asked", choices=TASKS
    )
    template: str = setting(
        "", "the prompt template (stjax.data.processor.user_text); empty: the stage's own", choices=TEMPLATES
    )
    loss_rule: str = setting(
        "assistant",
        "SFT: tokens trained on (the answer, or every non-pad token as the release does)",
        choices=("assistant", "release"),
    )
    num_frames: int = setting(8, "frames sampled per video", least=1)
    fps: float = setting(1.0, "frame rate the video is sampled at (> 0)")
    max_pixels: int = setting(360 * 420, "pixels per frame at most (>= one merged patch, 28 x 28)", least=28 * 28)
    second_per_grid: str = setting(
        "seed", "Qwen2.5-VL time spacing (stjax.data.video.MediaConfig)", choices=SECOND_PER_GRID
    )
    shuffle: bool = setting(True, "shuffle the samples each epoch")
    dataloader_num_workers: int = setting(0, "processes decoding videos (0: in the training process)", least=0)
    token_buckets: tuple[int, ...] = setting(
        (512, 1024, 2048, 4096, 8192), "padded prompt lengths (static shapes)", least=1
    )
    patch_buckets: tuple[int, ...] = setting((1024, 2048, 4096, 8192, 16384), "padded patch counts per batch", least=1)

    def check(self) -> None:
        check_fields(self, "data.")
        if not self.fps > 0:
            raise ConfigError(f"data.fps={self.fps} must be > 0")
        if not self.token_buckets or not self.patch_buckets:
            raise ConfigError(
                f"data.token_buckets {self.token_buckets} and data.patch_buckets {self.patch_buckets} "
                "must be non-empty lists of positive sizes"
            )
        if not self.synthetic_tasks:
            raise ConfigError(f"data.synthetic_tasks must name some of {', '.join(TASKS)}")
        if self.format != "synthetic" and not self.path:
            raise ConfigError(f"data.format={self.format} needs data.path")


@dataclass(frozen=True)
class CheckpointSection:
    save_steps: int = setting(100, "steps between saves (0: only at the end and on SIGTERM)", least=0)
    save_total_limit: int = setting(3, "checkpoints kept (the oldest are deleted)", least=1)
    async_save: bool = setting(True, "write in the background while training goes on")
    export_hf: bool = setting(True, "write <output_dir>/hf (LoRA merged) at the end")

    def check(self) -> None:
        check_fields(self, "checkpoint.")


@dataclass(frozen=True)
class DistributedSection:
    """Multi-host: left empty, SLURM and TPU VMs are detected from the environment."""

    coordinator: str = setting("", "host:port of process 0 (empty: detected)")
    num_processes: int = setting(0, "processes in the job (0: detected)")
    process_id: int = setting(-1, "this process's index (-1: detected)")

    def check(self) -> None:
        check_fields(self, "distributed.")


@dataclass(frozen=True)
class GRPOSection:
    """GRPO settings, named as TRL's `GRPOConfig` names them; defaults are the release's recipe
    (where TRL's differ: beta 0.0, loss_type dapo). `batch_size` counts completions, as TRL's
    effective batch does: a step samples batch_size / num_generations prompts."""

    num_generations: int = setting(8, "G: completions per prompt", least=2)
    temperature: float = setting(1.0, "sampling temperature (> 0)")
    top_p: float = setting(1.0, "nucleus sampling, in (0, 1]")
    top_k: int = setting(0, "sample among the k likeliest tokens; 0: no limit", least=0)
    max_completion_length: int = setting(256, "tokens per completion at most", least=1)
    beta: float = setting(0.1, "KL to the reference model; 0 keeps no reference model at all", least=0.0)
    epsilon: float = setting(0.2, "ratio clipping below 1 (TRL's epsilon_low)", least=0.0)
    epsilon_high: float = setting(0.0, "ratio clipping above 1; 0: the same as epsilon", least=0.0)
    loss_type: str = setting(
        "grpo", "how token losses are averaged (TRL's loss_type)", choices=("grpo", "bnpo", "dr_grpo", "dapo", "cispo")
    )
    importance_sampling_level: str = setting(
        "token", "ratio per token, or per sequence (GSPO)", choices=("token", "sequence")
    )
    scale_rewards: str = setting(
        "group",
        "advantages divided by the std of the group, the batch, or not at all",
        choices=("group", "batch", "none"),
    )
    num_iterations: int = setting(1, "optimizer updates per rollout batch", least=1)
    mask_truncated_completions: bool = setting(False, "completions that hit the length limit weigh nothing")
    reward_funcs: tuple[str, ...] = setting(
        ("accuracy",), "named rewards (stjax.train.rewards.REWARDS) or dotted paths to functions of one's own"
    )
    reward_weights: tuple[float, ...] = setting((), "one weight per reward; empty: all 1")
    accuracy_rule: str = setting(
        "release",
        "accuracy reward's answer: the first letter inside <answer> (release) or the evaluator's extractor (default)",
        choices=("release", "default"),
    )
    rollout_mesh: str = setting("", "the weights' placement for decoding (e.g. tensor=-1); empty: the training mesh")
    log_completions_steps: int = setting(10, "every k steps a few completions go to <output_dir>/completions.jsonl")
    num_completions_to_print: int = setting(4, "completions logged each time")

    def check(self) -> None:
        check_fields(self, "grpo.")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError("grpo: temperature must be > 0, top_p in (0, 1]")
        if not self.reward_funcs or (self.reward_weights and len(self.reward_weights) != len(self.reward_funcs)):
            raise ConfigError(f"grpo.reward_weights needs one weight per reward function {list(self.reward_funcs)}")
        for name in self.reward_funcs:
            try:
                rewards.resolve(name, self.accuracy_rule)
            except ValueError as e:
                raise ConfigError(f"grpo.reward_funcs: {e}") from None


def check_grpo(cfg: TrainConfig, shards: int, num_devices: int, num_processes: int) -> None:
    """The grpo section, and what GRPO needs of the whole run: whole groups per step, divided over the
    mesh and the processes."""
    g = cfg.grpo
    g.check()
    if cfg.batch_size % g.num_generations:
        raise ConfigError(
            f"batch_size={cfg.batch_size} counts completions: it must be a multiple of "
            f"grpo.num_generations={g.num_generations} (at least 2, for a group to compare)"
        )
    prompts = cfg.batch_size // g.num_generations
    if prompts % shards or prompts % num_processes:
        raise ConfigError(
            f"{prompts} prompts per step (batch_size / num_generations) must divide over data x fsdp "
            f"= {shards} devices and {num_processes} processes (each process samples whole groups)"
        )
    if g.rollout_mesh:
        try:
            mesh_shape(parse_mesh(g.rollout_mesh), num_devices)
        except ValueError as e:
            raise ConfigError(f"grpo.rollout_mesh={g.rollout_mesh!r}: {e}") from None


# The embedded default run of each stage (`python -m stjax.train --stage S`, no --config): a tiny model
# on the synthetic ego-centric set, sized to learn on a laptop CPU in minutes (`python -m stjax.demo`
# measures what it learns on held-out walks). Its task is the synthetic walls question (the corridor's
# paint), one a tiny vision tower can answer from pixels; Ego-ST's own tasks are far beyond a model this
# size. The dataclass defaults stay the release's recipe.
_TINY_DATA = {
    "synthetic_walks": 48,
    "synthetic_tasks": ["walls"],
    "max_pixels": 12544,  # 112 x 112 frames
    "token_buckets": [256, 512, 1024],
    "patch_buckets": [256, 512, 1024],
}


@dataclass(frozen=True)
class Stage:
    """A training stage as the command line, the config check and a resume know it; a new stage is one
    entry of STAGES (and its module)."""

    trainer: str  # "module:Class" of its steps on the shared loop (`loop.Stage`; imported only when it runs)
    template: str  # its own prompt template (`TrainConfig.prompt_template`)
    templates: tuple[str, ...]  # the data.template values it takes ("" for its own)
    embedded: dict  # the embedded default run's settings
    resume_keys: tuple[str, ...] = ()  # settings beyond rundir.RESUME_KEYS its checkpoints depend on
    check: Callable[[TrainConfig, int, int, int], None] | None = None  # (cfg, shards, devices, processes)


STAGES: dict[str, Stage] = {
    "sft": Stage(
        "stjax.train.sft:SFT",
        "sft",
        ("", "sft"),
        # 300 steps: the paint is learned suddenly, between steps 50 and 80 (a run of 80 steps, its learning
        # rate decayed sooner, stays at chance)
        {
            "output_dir": "runs/sft",
            "max_steps": 300,
            "batch_size": 8,
            "data": _TINY_DATA,
            "optim": {"learning_rate": 5e-3, "max_grad_norm": 1.0},
            "checkpoint": {"save_steps": 100},
        },
    ),
    "grpo": Stage(
        "stjax.train.grpo:GRPO",
        "grpo",
        ("", "grpo", "problem", "seed_mcq"),
        {
            "output_dir": "runs/grpo",
            "max_steps": 30,
            "batch_size": 32,
            "data": {
                **_TINY_DATA,
                "template": "problem",
            },  # the cold start's prompt: a tiny model cannot follow another
            "optim": {"learning_rate": 5e-4, "warmup_ratio": 0.0, "max_grad_norm": 1.0},
            # the format reward weighs a tenth of the accuracy reward, so it cannot carry the reward curve
            "grpo": {
                "num_generations": 8,
                "max_completion_length": 96,
                "beta": 0.04,
                "reward_funcs": ["accuracy", "format"],
                "reward_weights": [1.0, 0.1],
            },
            "checkpoint": {"save_steps": 10},
        },
        resume_keys=("grpo.num_generations",),
        check=check_grpo,
    ),
}
EMBEDDED: dict[str, dict[str, Any]] = {name: stage.embedded for name, stage in STAGES.items()}


@dataclass(frozen=True)
class TrainConfig:
    stage: str = setting("sft", "training stage", choices=tuple(STAGES))
    output_dir: str = setting("runs/sft", "where checkpoints, metrics and exports go (local or gs://, s3://)")
    seed: int = setting(0, "seed of the initial weights, the data order and sampling")
    max_steps: int = setting(0, "optimizer steps; 0: num_train_epochs over the data", least=0)
    num_train_epochs: int = setting(1, "epochs over the data when max_steps is 0", least=1)
    batch_size: int = setting(
        4, "samples per optimizer step over all devices: the GLOBAL batch (GRPO: completions)", least=1
    )
    gradient_accumulation_steps: int = setting(
        1,
        "micro-batches per optimizer step (each batch_size / gradient_accumulation_steps samples over all devices)",
        least=1,
    )
    loss_average: str = setting(
        "token", "loss averaged over the batch's tokens or per sequence first", choices=("token", "sequence")
    )
    loss_chunk: int = setting(
        512, "positions of each row whose logits are made at once (less memory, same loss); 0: all", least=0
    )
    mesh: str = setting("fsdp=-1", "device mesh data=..,fsdp=..,tensor=..; -1: the remaining devices")
    max_bad_steps: int = setting(5, "this many non-finite steps in a row stop the run", least=1)
    peak_flops: float = setting(0.0, "per-device peak for MFU; 0: look the device up")
    logging_steps: float = setting(
        10.0,
        "a plain metric line every this many steps where stdout is not a terminal "
        "(a batch job's log); below 1: that fraction of the run's steps (TRL's meaning)",
    )
    report_to: tuple[str, ...] = setting(
        (),
        "where every step's metrics go besides metrics.jsonl (stjax.train.reporters); empty: none",
        choices=tuple(REPORTERS),
    )
    model: ModelSection = setting(factory=ModelSection)
    lora: LoRASection = setting(factory=LoRASection)
    data: DataSection = setting(factory=DataSection)
    optim: OptimConfig = setting(factory=OptimConfig)
    checkpoint: CheckpointSection = setting(factory=CheckpointSection)
    grpo: GRPOSection = setting(factory=GRPOSection)
    distributed: DistributedSection = setting(factory=DistributedSection)

    @property
    def micro_batch(self) -> int:
        """Samples per forward/backward over all devices."""
        return self.batch_size // self.gradient_accumulation_steps

    @property
    def prompt_template(self) -> str:
        """The template the samples are encoded with (and the export records): data.template, else the stage's own."""
        return self.data.template or STAGES[self.stage].template


def load(path: str | Path | None, overrides: list[str] = (), defaults: dict | None = None, **fixed: Any) -> TrainConfig:
    """The run's config: the YAML file (else `defaults`, else the dataclass defaults), then `fixed`
    values (a section merged key by key), then overrides. A fixed top-level value that the file or an
    override sets otherwise is refused (`--stage grpo` beside a config's `stage: sft`)."""
    values: dict = json.loads(json.dumps(defaults or {}))  # a deep copy
    if path:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config {path} must be a mapping of keys to values")
    given = apply_overrides(values if path else {}, list(overrides))
    for key, value in fixed.items():
        if not isinstance(value, dict) and given.get(key, value) != value:
            where = f"{path}" if path and given[key] == values.get(key) else "--set"
            raise ConfigError(f"--{key} {value} conflicts with {key}: {given[key]} in {where}; give one of them")
    return parse(apply_overrides(merge(values, fixed), list(overrides)))


def parse(values: dict) -> TrainConfig:
    """A TrainConfig from a nested mapping (a YAML file's, or a run's config.json)."""
    return from_dict(TrainConfig, values, hints=HINTS)


def check(cfg: TrainConfig, num_devices: int, num_processes: int = 1) -> dict[str, int]:
    """Every error a run can know of before loading or compiling anything; returns the mesh shape."""
    check_fields(cfg)
    if not cfg.logging_steps > 0:
        raise ConfigError(f"logging_steps={cfg.logging_steps} must be > 0 (below 1: a fraction of the steps)")
    try:
        check_report_to(cfg.report_to)  # each reporter's package installed
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for section in (cfg.model, cfg.lora, cfg.data, cfg.optim, cfg.checkpoint, cfg.distributed):
        section.check()  # grpo: its stage's check
    try:
        mesh = mesh_shape(parse_mesh(cfg.mesh), num_devices)
    except ValueError as e:
        raise ConfigError(f"mesh={cfg.mesh!r}: {e}") from None
    if cfg.batch_size % cfg.gradient_accumulation_steps:
        raise ConfigError(
            f"batch_size={cfg.batch_size} must be a positive multiple of gradient_accumulation_steps="
            f"{cfg.gradient_accumulation_steps}"
        )
    micro, shards = cfg.micro_batch, mesh["data"] * mesh["fsdp"]
    if micro % shards:
        raise ConfigError(
            f"micro-batch of {micro} samples does not divide over data x fsdp = {shards} devices "
            f"of mesh {mesh}; use a multiple of {shards}"
        )
    if micro % num_processes:
        raise ConfigError(f"micro-batch of {micro} samples does not divide over {num_processes} processes")
    stage = STAGES[cfg.stage]
    if cfg.data.template not in stage.templates:
        raise ConfigError(
            f"data.template={cfg.data.template!r} does not fit the {cfg.stage} stage (it takes "
            f"{', '.join(repr(t) for t in stage.templates)})"
        )
    if stage.check:
        stage.check(cfg, shards, num_devices, num_processes)
    return mesh


def check_output_dir(cfg: TrainConfig) -> None:
    """An object store output_dir needs its client, and holds outputs only: the inputs a run would make
    under output_dir (the embedded tiny model, the synthetic set) are read locally, so they must be given."""
    try:
        out = as_path(cfg.output_dir)
    except OutputError as e:
        raise ConfigError(str(e)) from None
    if is_remote(out) and (not cfg.model.model_name_or_path or (cfg.data.format == "synthetic" and not cfg.data.path)):
        raise ConfigError(
            f"output_dir={cfg.output_dir} is on an object store, which holds a run's outputs only: set "
            "model.model_name_or_path and, for the synthetic set, data.path to local paths"
        )
