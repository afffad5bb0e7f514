"""`--compile-only`: compile every program a run would compile, for a target it need not have, and
say whether each fits.

    python -m stjax.train --config configs/grpo/qwen2.5-vl-7b-tpu-v5p-64.yaml --compile-only --topology v5p:4x4x2

From the config alone (abstract weights with their shardings, optimizer state, the reference copy,
a quantized base, batches of the config's largest buckets; no checkpoint, data, tokenizer or lock)
each program is lowered and compiled for the target's devices: a TPU topology (libtpu compiles for
TPUs this machine does not have), a GPU mesh from XLA's target description of the card (jax's CUDA
plugin), or the devices present. Per program it prints the per-chip bytes of `memory_analysis()`
against the chip's memory, the collective bytes per step read from the compiled HLO (ops inside
while loops multiplied by their trip counts), the analytic FLOPs (`stjax.train.metrics`;
`cost_analysis()` counts a loop body once), a roofline step time and the MFU it allows. A program
that does not fit raises `DoesNotFit` naming it and the shortfall.

The roofline is the largest of three times: FLOPs at the chips' bf16 peak, the collective bytes at
the chip's interconnect bandwidth, and the program's arguments read `passes` times at the HBM
bandwidth (once per decoding step for a sampler). It bounds a step from below; it is not a forecast.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from stjax.models.config import PRESETS_DIR, QwenVLConfig, presets
from stjax.models.config import ConfigError as ModelConfigError
from stjax.models.families import family
from stjax.models.inputs import ModelInputs, prepare_inputs
from stjax.sharding import batch_sharding, input_shardings, state_shardings

GIB = 1024**3
GPU_TARGETS_DIR = Path(__file__).resolve().parent / "gpu_targets"


class DoesNotFit(RuntimeError):
    """A program needs more memory per chip than the target has."""


class TargetError(ValueError):
    """A topology name this machine cannot compile for."""


@dataclass(frozen=True)
class Chip:
    """One accelerator: memory (GiB), dense bf16 peak FLOP/s, HBM and interconnect bytes/s (public
    per-chip figures: ICI for TPUs, NVLink for GPUs)."""

    name: str
    memory_gib: float
    peak_flops: float
    hbm_bandwidth: float
    link_bandwidth: float


# Keyed by the topology name's prefix (v5p:4x4x2 -> v5p, h100x8 -> h100).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32, 275e12, 1.2e12, 300e9),
    "v5e": Chip("TPU v5e", 16, 197e12, 0.82e12, 200e9),
    "v5p": Chip("TPU v5p", 95, 459e12, 2.76e12, 600e9),
    "v6e": Chip("TPU v6e", 32, 918e12, 1.64e12, 448e9),
    "h100": Chip("H100 SXM", 80, 989e12, 3.35e12, 450e9),
    "h200": Chip("H200", 141, 989e12, 4.8e12, 450e9),
}
GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# `jax.Device.device_kind` (lower case) pieces -> chip, for the devices present (the longest piece wins)
DEVICE_KINDS = {
    "tpu v4": "v4",
    "tpu v5 lite": "v5e",
    "tpu v5e": "v5e",
    "tpu v5": "v5p",
    "tpu v5p": "v5p",
    "tpu v6 lite": "v6e",
    "tpu v6e": "v6e",
    "h100": "h100",
    "h200": "h200",
}


@dataclass(frozen=True)
class Target:
    name: str
    devices: list
    chip: Chip | None  # None: the devices present, of unknown capacity (a CPU)


def target(topology: str | None) -> Target:
    """The devices to compile for: a TPU topology (`v5p:4x4x2`), a GPU mesh (`h100x8`), or (None)
    the devices present."""
    if not topology:
        devices = jax.devices()
        kind = devices[0].device_kind.lower()
        piece = max((k for k in DEVICE_KINDS if k in kind), key=len, default=None)
        return Target(f"{len(devices)}x {devices[0].device_kind}", devices, piece and CHIPS[DEVICE_KINDS[piece]])
    gpu = re.fullmatch(r"(h100|h200)x(\d+)", topology.lower())
    if gpu:
        return Target(topology, _gpu_devices(gpu[1], int(gpu[2])), CHIPS[gpu[1]])
    prefix = topology.split(":")[0].lower()
    if prefix not in CHIPS or ":" not in topology:
        raise TargetError(
            f"unknown topology {topology!r}; use a TPU topology such as v4:2x2x1, v5e:4x4, "
            f"v5p:4x4x2, v6e:2x4, or a GPU mesh such as h100x8, h200x8"
        )
    return Target(topology, _tpu_devices(topology), CHIPS[prefix])


def _tpu_devices(topology: str) -> list:
    try:
        import libtpu  # noqa: F401  (the [tpu] extra)
    except ImportError:
        raise TargetError(f'compiling for {topology} needs libtpu: pip install -e ".[tpu]"') from None
    from jax.experimental import topologies

    # Compiling claims no TPU: other processes holding libtpu (tests, a second preflight) must not stop it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def _gpu_devices(card: str, count: int) -> list:
    try:
        import jax_plugins.xla_cuda12  # noqa: F401  (the [cuda] extra)
    except ImportError:
        raise TargetError(f'compiling for {card}x{count} needs jax\'s CUDA plugin: pip install -e ".[cuda]"') from None
    from jax.experimental import topologies

    spec = (GPU_TARGETS_DIR / GPU_SPECS[card]).read_text()
    return list(topologies.get_topology_desc(card, "cuda", target_config=spec, topology=f"1x1x{count}").devices)


# ---------------------------------------------------------------- collectives in the compiled HLO

_COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "reduce-scatter",
    "all-to-all",
    "collective-permute",
    "collective-broadcast",
    "ragged-all-to-all",
)
_BYTES = {
    "pred": 1,
    "s8": 1,
    "u8": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s4": 0.5,
    "u4": 0.5,
}
_SHAPE = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_CALLEES = re.compile(r"(?:body|condition|calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _trips_from_condition(bodies: dict[str, list[str]], line: str) -> int:
    """A while loop's trip count where XLA did not record it (TPU HLO does not): the largest integer
    constant its condition compares against (scans count from 0; a sampler's loop stops at most there)."""
    condition = re.search(r"condition=%?([\w.\-]+)", line)
    text = "\n".join(bodies.get(condition[1], ())) if condition else ""
    return max((int(n) for n in re.findall(r"s32\[\]\S* constant\((\d+)\)", text)), default=1)


@dataclass(frozen=True)
class Collective:
    op: str
    bytes: float  # per chip, one execution
    count: int  # executions per run of the program (trip counts of the loops around it)
    shape: str

    @property
    def total(self) -> float:
        return self.bytes * self.count


def _shape_bytes(text: str) -> list[tuple[float, str]]:
    return [
        (_BYTES[d] * math.prod(int(n) for n in dims.split(",") if n), f"{d}[{dims}]")
        for d, dims in _SHAPE.findall(text)
    ]


def collectives(hlo: str) -> list[Collective]:
    """Every collective of a compiled (partitioned) HLO module with its per-chip bytes and how often
    it runs: a while loop's body runs its known trip count times (1 when unknown), nested loops
    multiply. Bytes are the op's result (the largest array of an async start's result tuple)."""
    bodies: dict[str, list[str]] = {}
    name, entry = None, None
    for line in hlo.splitlines():
        match = _COMPUTATION.match(line)
        if match and "=" not in line.split("{")[0].split("(")[0]:
            name = match[1]
            bodies[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name is not None and line.strip() and line.strip() != "}":
            bodies[name].append(line)
    counts: dict[str, int] = {}

    def visit(computation: str, count: int) -> None:
        counts[computation] = counts.get(computation, 0) + count
        for line in bodies.get(computation, ()):
            trip = _TRIP.search(line)
            callees = _CALLEES.findall(line)
            for branches in _BRANCHES.findall(line):
                callees += [b.strip().lstrip("%") for b in branches.split(",")]
            trips = 1
            if " while(" in line:
                trips = int(trip[1]) if trip else _trips_from_condition(bodies, line)
            for callee in callees:
                if callee in bodies:
                    visit(callee, count * trips)

    if entry is not None:
        visit(entry, 1)
    found = []
    for computation, count in counts.items():
        for line in bodies[computation]:
            op = re.search(r"=\s*(?:\([^=]*\)|\S+)\s+([\w\-]+)\(", line)
            if not op:
                continue
            kind = op[1].removesuffix("-start")
            if kind not in _COLLECTIVES or op[1].endswith("-done"):
                continue
            result = line.split("=", 1)[1].split(op[1] + "(")[0]
            shapes = _shape_bytes(result)
            if shapes:
                size, shape = max(shapes)
                found.append(Collective(kind, size, count, shape))
    return found


# ---------------------------------------------------------------- one program


@dataclass(frozen=True)
class Program:
    """A jitted function, its abstract arguments, its analytic FLOPs per run, how many times a step
    runs it, the per-chip bytes of resident arrays that live beside it but are not its arguments,
    and how many times a run reads its arguments from HBM (the roofline's memory term)."""

    name: str
    fn: Callable
    args: tuple
    flops: float
    runs_per_step: int = 1
    resident_bytes: float = 0.0
    passes: float = 3.0
    mesh: Any = None  # the mesh it runs under when not the run's (a GRPO rollout on `grpo.rollout_mesh`)


@dataclass(frozen=True)
class Report:
    name: str
    target: str
    argument: int
    output: int
    alias: int
    temp: int
    peak: int  # memory_analysis().peak_memory_in_bytes
    resident: float  # other resident arrays of the run, per chip
    memory: float | None  # the chip's memory in bytes
    collective_bytes: float  # per chip per step
    flops: float  # per step, all chips
    roofline_s: float | None
    mfu_ceiling: float | None
    compile_s: float
    largest_loop_collective: Collective | None

    @property
    def need(self) -> float:
        """Per-chip bytes the program needs while it runs: its live buffers at most (arguments, outputs
        not aliased to them, temporaries; at least XLA's peak) and the run's other resident arrays."""
        return max(self.peak, self.argument + self.output - self.alias + self.temp) + self.resident

    @property
    def headroom(self) -> float | None:
        return None if self.memory is None else self.memory - self.need


def tree_bytes_per_chip(tree) -> float:
    """Bytes per chip of a tree of (abstract) arrays with shardings: the largest shard of each leaf."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(shape) * leaf.dtype.itemsize
    return total


def compile_program(program: Program, tgt: Target, mesh) -> tuple[Report, Any]:
    """Lower and compile `program` under `mesh` (so the attention backend follows its devices)."""
    began = time.perf_counter()
    with jax.set_mesh(program.mesh or mesh):
        compiled = program.fn.lower(*program.args).compile()
    seconds = time.perf_counter() - began
    memory = compiled.memory_analysis()
    found = collectives(compiled.as_text())
    per_run = sum(c.total for c in found)
    in_loops = [c for c in found if c.count > 1]
    chips = len(tgt.devices)
    flops = program.flops * program.runs_per_step
    comm = per_run * program.runs_per_step
    roofline = mfu = None
    if tgt.chip is not None:
        compute = flops / (chips * tgt.chip.peak_flops)
        hbm = memory.argument_size_in_bytes * program.passes * program.runs_per_step / tgt.chip.hbm_bandwidth
        roofline = max(compute, comm / tgt.chip.link_bandwidth, hbm)
        mfu = compute / roofline if roofline > 0 else None
    report = Report(
        name=program.name,
        target=tgt.name,
        argument=memory.argument_size_in_bytes,
        output=memory.output_size_in_bytes,
        alias=memory.alias_size_in_bytes,
        temp=memory.temp_size_in_bytes,
        peak=memory.peak_memory_in_bytes,
        resident=program.resident_bytes,
        memory=None if tgt.chip is None else tgt.chip.memory_gib * GIB,
        collective_bytes=comm,
        flops=flops,
        roofline_s=roofline,
        mfu_ceiling=mfu,
        compile_s=seconds,
        largest_loop_collective=max(in_loops, key=lambda c: c.bytes, default=None),
    )
    return report, compiled


def format_report(r: Report) -> str:
    gib = lambda x: f"{x / GIB:.2f}"
    lines = [
        f"{r.name} on {r.target}: compiled in {r.compile_s:.1f} s",
        f"  bytes per chip: arguments {r.argument}, outputs {r.output} (aliased {r.alias}), temp {r.temp}, "
        f"peak {r.peak}; other resident arrays {r.resident:.0f}",
    ]
    if r.memory is not None:
        lines.append(f"  needs {gib(r.need)} of {gib(r.memory)} GiB: headroom {gib(r.headroom)} GiB")
    lines.append(f"  collectives {gib(r.collective_bytes)} GiB per chip per step; {r.flops:.3g} model FLOPs per step")
    if r.roofline_s is not None:
        lines.append(f"  roofline step time {r.roofline_s * 1e3:.1f} ms: MFU at most {r.mfu_ceiling:.0%}")
    return "\n".join(lines)


def check_fits(reports: Sequence[Report]) -> None:
    short = [r for r in reports if r.headroom is not None and r.headroom < 0]
    if short:
        raise DoesNotFit(
            "; ".join(
                f"{r.name} needs {r.need / GIB:.2f} GiB per chip on {r.target}, "
                f"{-r.headroom / GIB:.2f} GiB more than its {r.memory / GIB:.0f} GiB"
                for r in short
            )
        )


def run_programs(programs: Sequence[Program], tgt: Target, mesh, echo: Callable[[str], None] = print) -> list[Report]:
    """Compile each program, print its report, then raise `DoesNotFit` for those that do not fit."""
    reports = []
    for program in programs:
        report, _ = compile_program(program, tgt, mesh)
        echo(format_report(report))
        reports.append(report)
    check_fits(reports)
    return reports


def abstract(shape: Sequence[int], dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def with_shardings(tree, shardings):
    """Abstract arrays (ShapeDtypeStruct) of `tree`'s shapes and dtypes placed as `shardings` say."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def replace_dtype(tree, predicate: Callable[[Any], bool], dtype):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding) if predicate(x) else x, tree
    )


def is_float(x) -> bool:
    return jnp.issubdtype(x.dtype, jnp.floating)


# ---------------------------------------------------------------- abstract models and inputs


def model_config(init: str, arch: str = "qwen2_vl", **changes) -> QwenVLConfig:
    """The model config a run's `model.model_name_or_path` names, without its weights: a preset, a model directory
    that exists here, else the preset whose name the id or path contains (Qwen/Qwen2.5-VL-7B-Instruct,
    runs/sft-qwen2.5-vl-7b/hf -> qwen2.5-vl-7b); empty, the embedded default's tiny model."""
    if not init:
        name = family(arch).tiny_preset
    elif Path(init).is_dir() or (PRESETS_DIR / f"{init}.json").exists():
        name = init
    else:
        name = next((p for p in sorted(presets(), key=len, reverse=True) if p in init.lower()), None)
        if name is None:
            raise ModelConfigError(
                f"model.model_name_or_path={init!r} is not here and names no preset "
                f"({', '.join(presets())}); compile with --set model.model_name_or_path=PRESET"
            )
    return QwenVLConfig.from_file(name).replace(**changes)


def abstract_state(state, mesh):
    """An `nnx.State` of abstract arrays (from `nnx.eval_shape`) placed by its logical axes on `mesh`."""
    return with_shardings(state, state_shardings(state, mesh))


def largest_grid(model_cfg: QwenVLConfig, num_frames: int, max_pixels: int) -> np.ndarray:
    """(1, 3) grid of the largest video a run admits: `num_frames` frames of a square of at most
    `max_pixels` pixels (sides multiples of the merged patch)."""
    v = model_cfg.vision
    unit = v.patch_size * v.spatial_merge_size
    side = max(1, math.isqrt(max_pixels) // unit) * v.spatial_merge_size
    return np.array([[max(1, num_frames // v.temporal_patch_size), side, side]])


def example_inputs(model_cfg: QwenVLConfig, rows: int, length: int, grid: np.ndarray) -> ModelInputs:
    """Host inputs of `rows` prompts of `length` tokens, each holding one video of `grid` (flat vision
    layout, as `prepare_inputs` makes them): the shapes a batch of the largest buckets has."""
    v = model_cfg.vision
    merged = int(grid.prod()) // v.spatial_merge_size**2
    if merged + 2 > length:
        raise ModelConfigError(
            f"a video of grid {grid[0].tolist()} takes {merged} tokens, more than the {length}-token bucket holds"
        )
    ids = np.zeros((rows, length), np.int64)
    ids[:, 0] = model_cfg.vision_start_token_id
    ids[:, 1 : 1 + merged] = model_cfg.video_token_id
    pixels = np.zeros((rows * int(grid.prod()), v.patch_dim), np.float32)
    # Positions are given (any values give the same shapes): the video is one block, not every family's layout.
    positions = np.broadcast_to(np.arange(length), (3, rows, length))
    return prepare_inputs(
        model_cfg,
        ids,
        np.ones((rows, length), np.int32),
        pixel_values_videos=pixels,
        video_grid_thw=np.repeat(grid, rows, axis=0),
        position_ids=positions,
        length=length,
    )


def batched_inputs(one: ModelInputs, batch: int, mesh, lead: tuple[int, ...] = ()) -> ModelInputs:
    """Abstract per-sample inputs of `batch` rows like `one` (a single row from `example_inputs`), under
    `lead` leading axes (micro-batches), placed as `stjax.train.batch.global_batch` places them."""
    axis = len(lead)
    place = lambda shape, batch_axis, dtype: abstract(shape, dtype, batch_sharding(mesh, shape, batch_axis))
    text = lambda x: place(lead + (batch,) + x.shape[1:], axis, x.dtype)
    vision = None
    if one.vision is not None:
        vision = one.vision.replace(token_index=one.vision.token_index[0], token_mask=one.vision.token_mask[0])
        vision = jax.tree.map(lambda x: place(lead + (batch,) + np.shape(x), axis, np.asarray(x).dtype), vision)
    return ModelInputs(
        input_ids=text(one.input_ids),
        attention_mask=text(one.attention_mask),
        position_ids=place(lead + (3, batch) + one.position_ids.shape[2:], axis + 1, one.position_ids.dtype),
        vision=vision,
        right_padded=one.right_padded,
    )


def placed_inputs(inputs: ModelInputs, mesh) -> ModelInputs:
    """Abstract flat-layout inputs placed as `stjax.sharding.shard_inputs` places them."""
    like = lambda x, sharding: abstract(np.shape(x), np.asarray(x).dtype, sharding)
    return jax.tree.map(like, inputs, input_shardings(inputs, mesh))
