"""FSDP on a mesh: the compiled SFT step and GRPO update for 8 devices gather weights and keep
activations split by rows. Read from the partitioned HLO (`stjax.compile_only.collectives`): no
collective inside a loop (the layer scans, the logits slices) moves a whole-batch activation, and the
collective bytes of a step stay within a small multiple of the parameter bytes (gather for the forward,
again for the backward, reduce the gradients). Without the activation constraints XLA all-reduces
whole-batch residual streams and MLP activations inside the layer loop (43x and 67x the parameters)."""

import jax
import pytest

from stjax import compile_only as co
from stjax.sharding import make_mesh
from stjax.train import config
from stjax.train.compile_only import programs

LENGTH = 256


def _check(cfg, rows: int) -> None:
    mesh = make_mesh({"fsdp": 8})
    assert len(mesh.devices.flat) == 8
    program = programs(cfg, mesh)[0]
    _, compiled = co.compile_program(program, co.Target("8 CPU devices", jax.devices(), None), mesh)
    found = co.collectives(compiled.as_text())
    hidden = program.args[0].params["model"]["embed_tokens"].shape[1]
    activation = rows * LENGTH * hidden * 4  # one whole-batch float32 residual stream
    in_loops = [c for c in found if c.count > 1]
    assert in_loops, "no collective inside the layer loops: the weights are not gathered there"
    assert max(c.bytes for c in in_loops) < activation / 2, max(in_loops, key=lambda c: c.bytes)
    params = co.tree_bytes_per_chip(program.args[0].params) * 8  # the whole model once, float32
    assert sum(c.total for c in found) < 4 * params


@pytest.mark.slow  # about a minute and a half on 2 cores (compiling for 8 devices)
def test_sft_step_gathers_weights_not_activations():
    cfg = config.load(
        "configs/sft/tiny-cpu.yaml", [f"data.token_buckets=[{LENGTH}]", "batch_size=8", "model.attention=xla"]
    )
    _check(cfg, rows=8)


@pytest.mark.slow  # about two minutes on 2 cores
def test_grpo_update_gathers_weights_not_activations():
    cfg = config.load(
        "configs/grpo/tiny-cpu.yaml",
        [f"data.token_buckets=[{LENGTH}]", "batch_size=64", "grpo.max_completion_length=32", "model.attention=xla"],
    )
    _check(cfg, rows=8)  # 8 prompt copies of LENGTH tokens (and 64 completions of 32: as many positions)
