"""`--compile-only` (stjax.compile_only): the run's programs compile for a TPU topology this machine does
not have, the report's bytes are memory_analysis()'s, collectives are counted through loops, a program
that does not fit is named, and the attention backend follows the mesh's devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from stjax import compile_only as co
from stjax.train import config
from stjax.train.compile_only import programs

TOPOLOGY = "v5p:2x2x1"  # 4 chips


@pytest.fixture(scope="module")
def tpu():
    pytest.importorskip("libtpu")
    target = co.target(TOPOLOGY)
    return target, Mesh(np.asarray(target.devices).reshape(1, -1, 1), ("data", "fsdp", "tensor"))


HLO = """HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %ag = f32[8,16]{1,0} all-gather(f32[2,16]{1,0} %x), replica_groups=[1,4]<=[4], dimensions={0}
  %inner = (s32[], bf16[4]) while((s32[], bf16[4]) %t), condition=%cond2, body=%body2
}

%body2 (q: (s32[], bf16[4])) -> (s32[], bf16[4]) {
  %ars = bf16[4]{0} all-reduce-start(bf16[4]{0} %y), replica_groups={{0,1,2,3}}, to_apply=%add
  %ard = bf16[4]{0} all-reduce-done(bf16[4]{0} %ars)
}

%cond (p: (s32[], f32[8,16])) -> pred[] {
  %c = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

%cond2 (q: (s32[], bf16[4])) -> pred[] {
  %three = s32[]{:T(128)} constant(3)
  %c2 = pred[] compare(s32[] %j, s32[]{:T(128)} %three), direction=LT
}

ENTRY %main (a: f32[8,16]) -> f32[8,16] {
  %rs = f32[2,16]{1,0} reduce-scatter(f32[8,16]{1,0} %a), replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
  %w = (s32[], f32[8,16]) while((s32[], f32[8,16]) %t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"28"}}
}
"""


def test_collectives_counted_through_nested_loops():
    """By hand: the entry's reduce-scatter once (128 B), the outer body's all-gather 28 times (512 B), the
    inner body's all-reduce 28 x 3 times (8 B: its loop's trip count read from its condition, as TPU HLO
    records none); the -done half of an async pair is not counted again."""
    found = {c.op: c for c in co.collectives(HLO)}
    assert set(found) == {"reduce-scatter", "all-gather", "all-reduce"}
    assert (found["reduce-scatter"].bytes, found["reduce-scatter"].count) == (128, 1)
    assert (found["all-gather"].bytes, found["all-gather"].count) == (512, 28)
    assert (found["all-reduce"].bytes, found["all-reduce"].count) == (8, 84)
    assert sum(c.total for c in found.values()) == 128 + 512 * 28 + 8 * 84


def _check_programs(cfg, target, mesh, names):
    found = programs(cfg, mesh)
    assert [p.name for p in found] == names
    for program in found:
        report, compiled = co.compile_program(program, target, mesh)
        stats = compiled.memory_analysis()
        text = co.format_report(report)
        for field in ("argument", "output", "alias", "temp"):
            value = getattr(stats, f"{field}_size_in_bytes")
            assert getattr(report, field) == value and str(value) in text
        assert report.peak == stats.peak_memory_in_bytes and f"peak {stats.peak_memory_in_bytes}" in text
        assert report.flops == program.flops > 0 and report.headroom > 0


@pytest.mark.slow  # about a minute per program on 2 cores: the TPU compiler
def test_tiny_sft_and_grpo_compile_for_a_tpu_topology(tpu):
    target, mesh = tpu
    sft = config.load("configs/sft/tiny-cpu.yaml", ["data.token_buckets=[256]"])
    _check_programs(sft, target, mesh, ["sft step"])
    grpo = config.load("configs/grpo/tiny-cpu.yaml", ["data.token_buckets=[256]", "grpo.max_completion_length=8"])
    _check_programs(
        grpo, target, mesh, ["grpo update", "grpo reference log-probs", "grpo rollout (prefill + decoding)"]
    )


def test_a_program_that_does_not_fit_is_named(tpu):
    target, mesh = tpu
    small = co.Target(target.name, target.devices, co.Chip("small", 1 / 1024, 1e12, 1e12, 1e9))  # 1 MiB
    x = co.abstract((4096, 1024), jnp.float32, NamedSharding(mesh, PartitionSpec("fsdp")))  # 4 MiB per chip
    program = co.Program("doubling", jax.jit(lambda a: a * 2), (x,), flops=4096 * 1024)
    with pytest.raises(co.DoesNotFit, match=r"doubling needs 0\.01 GiB per chip on v5p:2x2x1"):
        co.run_programs([program], small, mesh, echo=lambda _: None)


def test_topology_without_libtpu_says_what_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "libtpu", None)  # import libtpu now fails
    with pytest.raises(co.TargetError, match=r'pip install -e "\.\[tpu\]"'):
        co.target("v5p:2x2x1")
    with pytest.raises(co.TargetError, match="unknown topology"):
        co.target("v9z:2x2")


def test_attention_backend_follows_the_mesh_devices(tpu):
    """`auto` and `cpu_flash` traced under a TPU mesh take the TPU's path (no CPU kernel's custom call),
    while the same call under the CPU devices' mesh uses the CPU kernel."""
    from stjax.models import cpu_attention
    from stjax.models.attention import attend

    if not cpu_attention.available():
        pytest.skip("the CPU attention kernel cannot be built here")
    _, tpu_mesh = tpu
    q = jax.ShapeDtypeStruct((4, 64, 4, 16), jnp.float32)
    seg = jax.ShapeDtypeStruct((4, 64), jnp.int32)
    fn = jax.jit(lambda q, s: attend(q, q, q, s, s, True, "auto"))
    cpu_mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(cpu_mesh):
        assert "StjaxFlash" in fn.lower(q, seg).as_text()
    with jax.set_mesh(tpu_mesh):
        assert "StjaxFlash" not in fn.lower(q, seg).as_text()


@pytest.mark.slow  # about a minute and a half on 2 cores
def test_tiny_sft_compiles_for_a_gpu_target():
    """The [cuda] extra's plugin compiles for 8 H100s from the target description in the package."""
    pytest.importorskip("jax_plugins.xla_cuda12")
    target = co.target("h100x8")
    assert target.devices[0].platform == "gpu" and "H100" in target.devices[0].device_kind
    mesh = Mesh(np.asarray(target.devices).reshape(1, -1, 1), ("data", "fsdp", "tensor"))
    sft = config.load("configs/sft/tiny-cpu.yaml", ["data.token_buckets=[256]", "batch_size=8"])
    _check_programs(sft, target, mesh, ["sft step"])


def test_eval_sampler_compiles_for_a_tpu_topology(tpu, capsys):
    """`python -m stjax.eval.mcq --compile-only --topology ...` on the embedded default's tiny model."""
    from stjax.eval import mcq

    mcq.main(
        [
            "--compile-only",
            "--topology",
            TOPOLOGY,
            "--max-prompt-tokens",
            "256",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "4",
            "--max-pixels",
            "12544",
        ]
    )
    out = capsys.readouterr().out
    assert "eval sampler (prefill + decoding) on v5p:2x2x1" in out and "headroom" in out
