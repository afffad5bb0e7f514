"""The SFT stage (the cold start): next-token loss on the reference replies, on the shared loop.

Each step draws `batch_size` samples as `gradient_accumulation_steps` micro-batches, makes them one global batch
(`stjax.train.batch`) and runs the compiled step (`stjax.train.step.train_step`).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator

import jax
from jax.sharding import NamedSharding, PartitionSpec

from stjax.sharding import on_mesh
from stjax.train import loop
from stjax.train.batch import global_batch, host_batch
from stjax.train.config import TrainConfig
from stjax.train.metrics import mfu, step_flops
from stjax.train.step import TrainState, train_step


def step_function(graphdef, optim, cfg: TrainConfig, shardings: TrainState, mesh) -> Callable:
    """The jitted SFT step (state, frozen, batch) -> (state, metrics): the state donated and kept where
    `shardings` puts it, the metrics replicated."""
    return jax.jit(
        functools.partial(train_step, graphdef, optim, average=cfg.loss_average, loss_chunk=cfg.loss_chunk),
        out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())),
        donate_argnums=0,
    )


class SFT:
    @staticmethod
    def samples_per_step(cfg: TrainConfig) -> int:
        return cfg.batch_size

    @staticmethod
    def loader_batch(cfg: TrainConfig) -> int:
        return cfg.micro_batch

    @staticmethod
    def updates_per_step(cfg: TrainConfig) -> int:
        return 1

    def __init__(self, context: loop.Context, model, state: TrainState):
        self.context = context
        self.step_fn = on_mesh(
            step_function(
                context.graphdef, context.optim, context.cfg, jax.tree.map(lambda x: x.sharding, state), context.mesh
            ),
            context.mesh,
        )

    def step(self, state: TrainState, data: Iterator, step: int) -> tuple[TrainState, dict[str, float]]:
        context = self.context
        micro_batches = [next(data) for _ in range(context.cfg.gradient_accumulation_steps)]
        batch = global_batch(host_batch(context.model_cfg, micro_batches), context.mesh)
        began = time.perf_counter()
        state, metrics = self.step_fn(state, context.frozen, batch)
        metrics = {k: float(v) for k, v in metrics.items()}
        seconds = time.perf_counter() - began
        metrics.update(step_time=seconds, tokens_per_s=metrics["tokens"] / seconds)
        if context.peak_flops:
            metrics["mfu"] = mfu(
                step_flops(context.model_cfg, batch, metrics), seconds, jax.device_count(), context.peak_flops
            )
        return state, metrics
