"""The run loop that every training stage shares, from a laptop CPU to a multi-host mesh.

    config -> check against the devices (`checked_mesh`) -> [its inputs made and named as plain paths:
    `stjax.train.stages.resolve`] -> model (+ LoRA) on the mesh -> train state -> data iterator
    -> [restore the latest checkpoint] -> stage steps (metrics, periodic async saves, SIGTERM save)
    -> final checkpoint -> Hugging Face export (LoRA merged)

A stage (`stjax.train.sft.SFT`, `stjax.train.grpo.GRPO`) says only what differs: how many samples
one step draws, and the step itself (its prompt template is `TrainConfig.prompt_template`).
Everything a resumed run needs is in the checkpoint (parameters, optimizer state, step, PRNG key,
data position), so rerunning the same command after a stop continues the run exactly. Non-finite
steps are skipped by the step itself; `max_bad_steps` of them in a row stop the run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from stjax.data.formats import Sample, read_plain_jsonl, read_st_r1_jsonl
from stjax.data.loader import LoaderConfig, make_loader
from stjax.data.processor import TRAINING_RECIPE, Processor, Template, hf_processor_files, training_recipe
from stjax.data.video import MediaConfig
from stjax.io import as_path, write_text_atomic
from stjax.models.config import PRESETS_DIR, QwenVLConfig
from stjax.models.loading import ModelNotFoundError, load_pretrained, quantize_model, resolve_model_dir, save_hf
from stjax.models.qwen_vl import QwenVLForConditionalGeneration, init_model
from stjax.sharding import make_mesh, shard_model
from stjax.train import distributed, rundir
from stjax.train.checkpoint import Checkpointer, abstract_like
from stjax.train.config import ConfigError, TrainConfig, check, check_output_dir
from stjax.train.lora import merged_params, with_lora
from stjax.train.metrics import MetricsLogger, device_peak_flops
from stjax.train.step import OptimConfig, TrainState, init_state, split_trainable, train_state_shardings

log = logging.getLogger(__name__)
# Save a checkpoint, then exit with 128 + the signal: 143 for SIGTERM (schedulers read it as "stopped by
# a signal, requeue"), 130 for SIGINT (Ctrl-C).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM


class TrainingStopped(RuntimeError):
    """The run cannot go on: too many non-finite steps in a row (the last good state was saved), or
    not one step could be trained."""


def tokenizer_dir(cfg: TrainConfig) -> Path:
    """data.tokenizer, else the model directory's (hub ids resolved)."""
    data = cfg.data
    key, name, revision = (
        ("data.tokenizer", data.tokenizer, None)
        if data.tokenizer
        else ("model.model_name_or_path", cfg.model.model_name_or_path, cfg.model.revision or None)
    )
    try:
        return resolve_model_dir(name, revision)
    except ModelNotFoundError as e:
        raise ConfigError(f"{key}: {e}") from None


def prepare_data(cfg: TrainConfig) -> list:
    """The training samples of data.path."""
    data = cfg.data
    reader = read_st_r1_jsonl if data.format == "st_r1" else read_plain_jsonl
    result = reader(data.path, video_root=data.video_root or None)
    for reason, count in result.reasons().items():
        log.warning("%d records of %s skipped: %s", count, data.path, reason)
    if not result.samples:
        raise ConfigError(f"no usable samples in {data.path}")
    return result.samples


def model_source(cfg: TrainConfig) -> str | Path:
    """model.model_name_or_path as a preset's name (random weights of its shape) or a model directory (a hub id
    resolved through the local cache)."""
    init, revision = cfg.model.model_name_or_path, cfg.model.revision
    if not Path(init).is_dir() and (PRESETS_DIR / f"{init}.json").exists():
        return init
    try:
        return resolve_model_dir(init, revision or None)
    except ModelNotFoundError as e:
        raise ConfigError(f"model.model_name_or_path: {e}; nor is it a preset in {PRESETS_DIR}") from None


def prepare_model(cfg: TrainConfig, mesh: Mesh) -> QwenVLForConditionalGeneration:
    """The base model on the mesh, with fresh LoRA adapters when `lora.r` > 0."""
    model_section, lora = cfg.model, cfg.lora
    policy = dict(
        compute_dtype=model_section.compute_dtype,
        attention=model_section.attention,
        remat=model_section.gradient_checkpointing,
    )
    quantization = dict(
        quantize_base=lora.quantize_base,
        quantize_targets=lora.quantize_targets,
        double_quant=lora.double_quant,
        lora_targets=tuple(lora.target_modules),
    )
    source = model_source(cfg)
    if isinstance(source, str):  # a preset
        model_cfg = QwenVLConfig.from_file(source).replace(param_dtype=model_section.param_dtype, **policy)
        model = init_model(model_cfg, cfg.seed)
        if lora.quantize_base != "none":
            model = quantize_model(model, mesh, **quantization)
        else:
            model = shard_model(model, mesh)
    else:
        model, _ = load_pretrained(source, dtype=model_section.param_dtype, mesh=mesh, **policy, **quantization)
    if lora.r:
        model = shard_model(
            with_lora(model, lora.r, lora.lora_alpha, lora.target_modules, cfg.seed, lora.lora_dropout), mesh
        )
    return model


def check_tokenizer_early(cfg: TrainConfig, tokenizer: Path) -> None:
    """`check_tokenizer` on model.model_name_or_path's config.json (small files), before the large model is built."""
    check_tokenizer(Processor.from_pretrained(tokenizer), QwenVLConfig.from_file(model_source(cfg)))


def check_tokenizer(processor: Processor, model_cfg: QwenVLConfig) -> None:
    spec = processor.rope_spec
    ours = (spec.image_token_id, spec.video_token_id, spec.vision_start_token_id)
    theirs = (model_cfg.image_token_id, model_cfg.video_token_id, model_cfg.vision_start_token_id)
    if ours != theirs:
        raise ConfigError(f"the tokenizer's image/video/vision-start ids {ours} differ from the model's {theirs}")


def placed_state(
    trainable: nnx.State, optim: OptimConfig, seed: int, mesh: Mesh, master_dtype: str = "float32"
) -> TrainState:
    """A fresh train state made on the devices: optimizer moments sharded like their parameters."""
    make = lambda p: init_state(p, optim, master_dtype, seed)
    shardings = train_state_shardings(
        jax.eval_shape(make, trainable), jax.tree.map(lambda x: x.sharding, trainable), optim, mesh
    )
    return jax.jit(make, out_shardings=shardings)(trainable)


def non_finite_arrays(model: QwenVLForConditionalGeneration) -> list[str]:
    """Paths of the model's floating-point arrays that hold a NaN or an infinity (on the devices, by
    every process: the same answer everywhere)."""
    leaves = [
        (jax.tree_util.keystr(path, simple=True, separator="/"), x)
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))
        if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    finite = jax.jit(lambda xs: [jnp.all(jnp.isfinite(x)) for x in xs])([x for _, x in leaves])
    return [name for (name, _), ok in zip(leaves, finite) if not ok]


def media_config(cfg: TrainConfig) -> MediaConfig:
    d = cfg.data
    return MediaConfig(num_frames=d.num_frames, fps=d.fps, max_pixels=d.max_pixels, second_per_grid=d.second_per_grid)


def export_files(processor: Processor, tokenizer: Path, stage: str, template: Template) -> dict[str, str]:
    """An export's own files: the training recipe the evaluator reads (`stjax.data.processor.TRAINING_RECIPE`),
    and transformers' processor files of the model's family that the tokenizer's directory lacks (a real model's
    own are copied)."""
    files = {TRAINING_RECIPE: json.dumps(training_recipe(stage, template, processor.media), indent=1) + "\n"}
    made = hf_processor_files(processor)
    if (tokenizer / "chat_template.json").exists():  # the older file name of the same template
        del made["chat_template.jinja"]
    return files | {name: text for name, text in made.items() if not (tokenizer / name).exists()}


def export_hf(
    model: QwenVLForConditionalGeneration,
    target: Path,
    tokenizer: Path,
    overwrite: bool = True,
    files: dict[str, str] | None = None,
) -> None:
    """The trained model as a Hugging Face directory in its parameter dtype (adapters merged into the
    base, dequantized where it is stored quantized), with the tokenizer's files and `files` (`export_files`),
    written beside `target` and put in place whole (`save_hf`). One parameter at a time is made and brought
    to the host, by every process (a collective where the processes hold parts of it); process 0 writes it."""
    bad = non_finite_arrays(model)
    if bad:
        raise TrainingStopped(
            f"the trained model holds NaN or infinite values ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}); nothing exported to {target}"
        )
    cfg, params = merged_params(model)
    if jax.process_index() == 0:
        save_hf(target, cfg, params, side_files=tokenizer, overwrite=overwrite, files=files)
    else:
        for source in params.values():  # the same gathers, in the same order, as process 0's writer makes
            source.read()


@dataclasses.dataclass
class Context:
    """What the loop sets up once and hands to the stage: the config, the mesh, the model split into
    its traced structure and frozen weights, the processor and where outputs go."""

    cfg: TrainConfig
    mesh: Mesh
    output_dir: Path
    model_cfg: QwenVLConfig
    graphdef: nnx.GraphDef
    frozen: nnx.State
    optim: OptimConfig
    processor: Processor
    samples: dict[str, Sample]  # by id
    start_step: int  # steps done before this run (a resumed run's checkpoint)
    peak_flops: float | None  # per device, for MFU; None where unknown (CPUs)


class Stage(Protocol):
    """A training stage: the parts of a training run that differ between SFT and GRPO. The loop asks
    the class how a step draws its data, then makes one (`__init__`) once the model and the train
    state are placed, and calls its `step`. (Its prompt template is its registry entry's, `config.STAGES`.)"""

    @staticmethod
    def samples_per_step(cfg: TrainConfig) -> int:
        """Samples (prompts) one step draws from the data, over all processes."""

    @staticmethod
    def loader_batch(cfg: TrainConfig) -> int:
        """Samples in one loader batch, over all processes."""

    @staticmethod
    def updates_per_step(cfg: TrainConfig) -> int:
        """Optimizer updates one step makes (the learning-rate schedule's length is steps x this)."""

    def __init__(self, context: Context, model: QwenVLForConditionalGeneration, state: TrainState) -> None:
        """Compile, keep a reference model: whatever the steps need (made once, before any step)."""

    def step(self, state: TrainState, data: Iterator, step: int) -> tuple[TrainState, dict[str, float]]:
        """One step from `data` (StopIteration when it runs out); `step` counts the steps done before it."""


def stage_context(
    cfg: TrainConfig,
    mesh: Mesh,
    model: QwenVLForConditionalGeneration,
    processor: Processor,
    samples: Sequence[Sample],
    output_dir: Path,
    optim: OptimConfig,
    peak_flops: float | None = None,
) -> tuple[Context, TrainState]:
    """What a stage is made from, as the loop makes it (a benchmark drives a stage from the same): the context
    of a run at step 0 and a fresh train state of the model's trained part, placed on `mesh`."""
    graphdef, trainable, frozen = split_trainable(model)
    state = placed_state(trainable, optim, cfg.seed, mesh, cfg.model.master_dtype)
    context = Context(
        cfg=cfg,
        mesh=mesh,
        output_dir=output_dir,
        model_cfg=model.config,
        graphdef=graphdef,
        frozen=frozen,
        optim=optim,
        processor=processor,
        samples={s.id: s for s in samples},
        start_step=0,
        peak_flops=peak_flops,
    )
    return context, state


def checked_mesh(cfg: TrainConfig) -> Mesh:
    """The mesh of a config checked against the devices, this process joined to the others: every
    error a run can know of comes before any work."""
    check_output_dir(cfg)  # a gs:// output_dir without its client: refused before any work
    distributed.initialize(cfg.distributed.coordinator, cfg.distributed.num_processes, cfg.distributed.process_id)
    return make_mesh(check(cfg, jax.device_count(), jax.process_count()))


def train(cfg: TrainConfig, stage: type[Stage], mesh: Mesh) -> dict:
    """Train as configured on `mesh` (from `checked_mesh`); returns the summary. The config's inputs are
    plain paths (`stjax.train.stages.resolve`); the caller holds output_dir's lock (`stjax.train.stages.train`)."""
    out = as_path(cfg.output_dir)
    rundir.check_resume(out, cfg)

    samples = prepare_data(cfg)
    source = model_source(cfg)
    rundir.check_inputs(out, Path(cfg.data.path), source if isinstance(source, Path) else None)
    tokenizer = tokenizer_dir(cfg)
    check_tokenizer_early(cfg, tokenizer)
    model = prepare_model(cfg, mesh)
    model_cfg = model.config
    processor = Processor.for_model(tokenizer, model_cfg, media_config(cfg), loss_rule=cfg.data.loss_rule)
    check_tokenizer(processor, model_cfg)

    per_step = stage.samples_per_step(cfg)
    steps = cfg.max_steps or len(samples) * cfg.num_train_epochs // per_step
    if steps == 0:
        raise ConfigError(f"{len(samples)} samples x {cfg.num_train_epochs} epochs do not fill one step of {per_step}")
    epochs = max(cfg.num_train_epochs, math.ceil(steps * per_step / len(samples)))
    loader = make_loader(
        samples,
        processor,
        LoaderConfig(
            batch_size=stage.loader_batch(cfg) // jax.process_count(),
            seed=cfg.seed,
            num_epochs=epochs,
            shuffle=cfg.data.shuffle,
            num_workers=cfg.data.dataloader_num_workers,
            template=cfg.prompt_template,
            token_buckets=cfg.data.token_buckets,
            patch_buckets=cfg.data.patch_buckets,
            image_patch_buckets=(0,),
            videos_per_sample=1,
            images_per_sample=0,
        ),
    )
    data = iter(loader)

    updates = steps * stage.updates_per_step(cfg)
    optim = cfg.optim if cfg.optim.total_steps else dataclasses.replace(cfg.optim, total_steps=updates)
    peak_flops = device_peak_flops(jax.devices()[0], cfg.peak_flops or None)
    context, state = stage_context(cfg, mesh, model, processor, samples, out, optim, peak_flops)
    checkpoints = Checkpointer(
        out / "checkpoints", cfg.checkpoint.save_steps, cfg.checkpoint.save_total_limit, cfg.checkpoint.async_save
    )
    start, restored = checkpoints.restore_latest(abstract_like(state), data)
    if start:
        state, context = restored, dataclasses.replace(context, start_step=start)
        log.info("resumed from step %d", start)
    rundir.write_config(out, cfg)  # the run is valid: record its settings

    trainer = stage(context, model, state)
    del model
    stop = {}
    previous = {s: signal.signal(s, lambda signum, frame: stop.update(signal=signum)) for s in STOP_SIGNALS}
    bad_in_a_row, step, saved = 0, start, start
    try:
        with MetricsLogger(
            out,
            steps,
            start_step=start,
            report_to=cfg.report_to,
            logging_steps=cfg.logging_steps,
            desc=cfg.stage,
            config=dataclasses.asdict(cfg),
        ) as logger:
            while step < steps and not stop:
                try:
                    state, metrics = trainer.step(state, data, step)
                except StopIteration:
                    log.warning("the data ran out after %d steps (skipped samples: %d)", step, len(data.skipped))
                    break
                step += 1
                logger.log(step, metrics)
                bad_in_a_row = bad_in_a_row + 1 if metrics["skipped"] else 0
                if bad_in_a_row >= cfg.max_bad_steps:
                    checkpoints.save(step, state, data)  # skipped steps left the state as it was: the last good one
                    checkpoints.wait()
                    raise TrainingStopped(
                        f"{bad_in_a_row} non-finite steps in a row (up to step {step}); "
                        f"the last good state is saved in {out / 'checkpoints' / str(step)}"
                    )
                if checkpoints.due(step):
                    checkpoints.save(step, state, data)
                    saved = step
                checkpoints.check()  # a failed background save stops the run now
            summary = logger.summary()
        if step > saved:
            checkpoints.save(step, state, data)
        checkpoints.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        checkpoints.close()
        skipped = [{"id": sample_id, "reason": reason} for sample_id, reason in data.skipped]
        write_text_atomic(out / f"skipped_samples.{jax.process_index()}.json", json.dumps(skipped, indent=1))
    if stop:
        name = signal.Signals(stop["signal"]).name
        log.warning("stopped by %s at step %d; checkpoint saved; rerun the same command to resume", name, step)
        raise SystemExit(128 + stop["signal"])
    if step == 0:
        raise TrainingStopped(
            f"no step was trained ({len(data.skipped)} samples skipped, reasons in "
            f"{out}/skipped_samples.*.json); nothing exported"
        )
    if cfg.checkpoint.export_hf:
        trained = nnx.merge(context.graphdef, state.params, context.frozen)
        export_hf(
            trained,
            out / "hf",
            tokenizer,
            files=export_files(processor, tokenizer, cfg.stage, cfg.prompt_template),
        )
        log.info("exported the trained model to %s", out / "hf")
    return summary
