"""The programs a training run compiles, built from its config alone for `--compile-only`
(`stjax.compile_only`): SFT's step; GRPO's rollout (prefill and decoding), reference and old-policy
log-probs, and update. Shapes are the config's largest: the longest token bucket, the largest video
`data.num_frames` and `data.max_pixels` admit, the micro-batch of `batch_size / gradient_accumulation_steps`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from stjax import compile_only as co
from stjax.models.qwen_vl import abstract_model
from stjax.sampling.sampler import sample
from stjax.sharding import batch_sharding, make_mesh, parse_mesh
from stjax.train import sft
from stjax.train.config import TrainConfig, check
from stjax.train.metrics import model_flops_per_token, step_flops, vision_flops
from stjax.train.rl import learner
from stjax.train.rl.rollout import rollout_sampling
from stjax.train.step import Batch, init_state, split_trainable, train_state_shardings


@dataclasses.dataclass
class Abstract:
    """The run's arrays as abstract, placed arrays: what `stjax.train.loop.run` would hold."""

    model_cfg: object
    graphdef: nnx.GraphDef
    state: object  # TrainState
    frozen: nnx.State
    optim: object


def abstract_run(cfg: TrainConfig, mesh) -> Abstract:
    m, lora = cfg.model, cfg.lora
    model_cfg = co.model_config(
        m.model_name_or_path,
        m.arch,
        param_dtype=m.param_dtype,
        compute_dtype=m.compute_dtype,
        attention=m.attention,
        remat=m.gradient_checkpointing,
        quantize_base=lora.quantize_base,
        quantize_targets=lora.quantize_targets,
        double_quant=lora.double_quant,
        lora_rank=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_targets=tuple(lora.target_modules),
        lora_dropout=lora.lora_dropout,
    )
    graphdef, trainable, frozen = split_trainable(abstract_model(model_cfg))
    trainable, frozen = co.abstract_state(trainable, mesh), co.abstract_state(frozen, mesh)
    optim = cfg.optim if cfg.optim.total_steps else dataclasses.replace(cfg.optim, total_steps=max(cfg.max_steps, 1))
    state = jax.eval_shape(lambda p: init_state(p, optim, m.master_dtype, cfg.seed), trainable)
    shardings = train_state_shardings(state, jax.tree.map(lambda x: x.sharding, trainable), optim, mesh)
    return Abstract(model_cfg, graphdef, co.with_shardings(state, shardings), frozen, optim)


def _shardings(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def programs(cfg: TrainConfig, mesh) -> list[co.Program]:
    """Every program of the run, with its abstract arguments and analytic FLOPs."""
    run = abstract_run(cfg, mesh)
    length = max(cfg.data.token_buckets)
    grid = co.largest_grid(run.model_cfg, cfg.data.num_frames, cfg.data.max_pixels)
    one = co.example_inputs(run.model_cfg, 1, length, grid)
    micro = cfg.micro_batch
    builder = _grpo_programs if cfg.stage == "grpo" else _sft_programs
    return builder(cfg, mesh, run, one, micro)


def _patches(one) -> int:
    return 0 if one.vision is None else int(np.asarray(one.vision.frames.lengths).sum())


def _sft_programs(cfg: TrainConfig, mesh, run: Abstract, one, micro: int) -> list[co.Program]:
    accum, length = cfg.gradient_accumulation_steps, one.input_ids.shape[1]
    mask = co.abstract((accum, micro, length), jnp.int32, batch_sharding(mesh, (accum, micro, length), 1))
    batch = Batch(inputs=co.batched_inputs(one, micro, mesh, (accum,)), loss_mask=mask)
    rows = accum * micro
    counts = {"tokens": rows * length, "target_tokens": rows * length, "patches": rows * _patches(one)}
    flops = step_flops(run.model_cfg, batch, counts)
    step = sft.step_function(run.graphdef, run.optim, cfg, _shardings(run.state), mesh)
    return [co.Program("sft step", step, (run.state, run.frozen, batch), flops)]


def _grpo_programs(cfg: TrainConfig, mesh, run: Abstract, one, micro: int) -> list[co.Program]:
    g, model_cfg = cfg.grpo, run.model_cfg
    settings = learner.LossSettings.of(cfg)
    accum, length, t = cfg.gradient_accumulation_steps, one.input_ids.shape[1], g.max_completion_length
    shards = micro // batch_sharding(mesh, (micro,)).shard_shape((micro,))[0]
    run_rows = math.gcd(g.num_generations, micro // shards)
    copies = micro // run_rows  # prompt copies per micro-batch (`learner.update_batch`)
    rows = lambda *shape, dtype=jnp.float32: co.abstract(
        (accum,) + shape, dtype, batch_sharding(mesh, (accum,) + shape, 1)
    )
    batch = learner.GRPOBatch(
        inputs=co.batched_inputs(one, copies, mesh, (accum,)),
        starts=rows(copies, dtype=jnp.int32),
        completions=rows(micro, t, dtype=jnp.int32),
        lengths=rows(micro, dtype=jnp.int32),
        completion_mask=rows(micro, t),
        advantages=rows(micro),
    )
    counts = {
        "prompt_tokens": accum * copies * length,
        "completion_tokens": accum * micro * t,
        "patches": accum * copies * _patches(one),
    }
    update_flops = learner.update_flops(model_cfg, batch, counts)
    state_bytes = co.tree_bytes_per_chip(run.state)
    reference, reference_bytes = None, 0.0
    if g.beta:  # as `learner.reference_params` makes it: the adapters' zeros (LoRA) or the weights in the compute dtype
        compute = (
            run.state.params
            if model_cfg.lora_rank
            else co.replace_dtype(run.state.params, co.is_float, jnp.dtype(model_cfg.compute_dtype))
        )
        reference, reference_bytes = compute, co.tree_bytes_per_chip(compute)
    logps = learner.logps_function(run.graphdef, settings)
    logp_batch = batch.replace(old_logp=None, ref_logp=None)
    found = [
        co.Program(
            "grpo update",
            learner.update_function(run.graphdef, run.optim, settings, _shardings(run.state), mesh),
            (
                run.state,
                run.frozen,
                batch.replace(
                    old_logp=rows(micro, t) if g.num_iterations > 1 else None,
                    ref_logp=rows(micro, t) if g.beta else None,
                ),
            ),
            update_flops,
            runs_per_step=g.num_iterations,
            resident_bytes=reference_bytes,
        )
    ]
    if reference is not None:
        found.append(
            co.Program(
                "grpo reference log-probs",
                logps,
                (reference, run.frozen, logp_batch),
                update_flops / 3,
                resident_bytes=state_bytes,
                passes=1,
            )
        )
    if g.num_iterations > 1:
        opt_bytes = state_bytes - co.tree_bytes_per_chip(run.state.params)
        found.append(
            co.Program(
                "grpo old log-probs",
                logps,
                (run.state.params, run.frozen, logp_batch),
                update_flops / 3,
                resident_bytes=opt_bytes + reference_bytes,
                passes=1,
            )
        )
    found.append(_rollout(cfg, mesh, run, one, state_bytes + reference_bytes))
    return found


def _rollout(cfg: TrainConfig, mesh, run: Abstract, one, resident: float) -> co.Program:
    """The sampler as `Rollout.generate` calls it: the actor's weights in the compute dtype, P prompts."""
    g, model_cfg = cfg.grpo, run.model_cfg
    rollout_mesh = make_mesh(parse_mesh(g.rollout_mesh), list(mesh.devices.flat)) if g.rollout_mesh else mesh
    graphdef, trainable, frozen = split_trainable(abstract_model(model_cfg))
    trainable = co.replace_dtype(trainable, co.is_float, jnp.dtype(model_cfg.compute_dtype))
    graphdef, weights = nnx.split(nnx.merge(graphdef, trainable, frozen))
    weights = co.abstract_state(weights, rollout_mesh)
    prompts = cfg.batch_size // g.num_generations
    inputs = co.batched_inputs(one, prompts, rollout_mesh)
    placed = lambda shape, dtype: co.abstract(shape, dtype, batch_sharding(rollout_mesh, shape))
    keys = placed((prompts * g.num_generations,), jax.random.key(0).dtype)
    sampling = rollout_sampling(g, model_cfg, (model_cfg.eos_token_id,))
    args = (graphdef, sampling, weights, inputs, co.abstract((), jnp.int32, None), placed((prompts,), jnp.int32), keys)
    flops = sampler_flops(model_cfg, one, prompts, g.num_generations, g.max_completion_length)
    return co.Program(
        "grpo rollout (prefill + decoding)",
        sample,
        args,
        flops,
        resident_bytes=resident,
        passes=1 + g.max_completion_length,
        mesh=rollout_mesh,
    )


def sampler_flops(model_cfg, one, prompts: int, samples: int, new_tokens: int) -> float:
    """Forward FLOPs of a sampler run (a third of the training count): each prompt's prefill with its
    vision, then every row decoding all `new_tokens` (an upper bound: rows that end early stop)."""
    length = one.input_ids.shape[1]
    patches = {"patches": prompts * _patches(one)}
    prefill = model_flops_per_token(model_cfg, length) * prompts * length + vision_flops(model_cfg, one, patches)
    decode = model_flops_per_token(model_cfg, length + new_tokens) * prompts * samples * new_tokens
    return (prefill + decode) / 3


def compile_run(cfg: TrainConfig, topology: str | None, echo: Callable[[str], None] = print) -> list[co.Report]:
    """`--compile-only`: compile the run's programs for `topology` and report (`stjax.compile_only`)."""
    tgt = co.target(topology)
    mesh = make_mesh(check(cfg, len(tgt.devices)), tgt.devices)
    echo(f"{cfg.stage} run compiled for {tgt.name} ({len(tgt.devices)} devices), mesh {dict(mesh.shape)}")
    return co.run_programs(programs(cfg, mesh), tgt, mesh, echo)
