"""Logical-axis sharding: one rules table from parameter axis names to mesh axes.

Every parameter names its dimensions (`embed`, `mlp`, `heads`, `vocab`, ...). The mesh has three
axes: `data` (pure data parallel, parameters replicated), `fsdp` (data parallel with parameters
and optimizer state split) and `tensor` (matrices split across heads / MLP columns / vocab).
Changing the parallelism of a run is changing the mesh shape, never the model code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or a tuple of mesh axes, or None for replicated)
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vision_patch", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_merge", "fsdp"),
    ("quant_blocks", ("fsdp", "tensor")),  # nf4's flat codes and scales (stjax.models.quant): as finely as possible
)


class MeshError(ValueError):
    """A mesh shape that does not fit the devices."""


def mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Resolve a {axis: size} request; one size may be -1, meaning "the remaining devices"."""
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise MeshError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % known:
            raise MeshError(f"mesh {shape} does not divide {num_devices} devices")
        sizes[free[0]] = num_devices // known
    if math.prod(sizes.values()) != num_devices:
        raise MeshError(f"mesh {sizes} needs {math.prod(sizes.values())} devices, but {num_devices} are available")
    return sizes


def parse_mesh(text: str) -> dict[str, int]:
    """'fsdp=4,tensor=2' (a command-line or config value) -> {'fsdp': 4, 'tensor': 2}."""
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        return {name.strip(): int(size) for name, size in pairs}
    except ValueError:
        raise MeshError(f"cannot read mesh {text!r}; write e.g. fsdp=4,tensor=2 (-1: the remaining devices)") from None


def make_mesh(shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; by default every device on `fsdp`."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_shape(shape or {"fsdp": -1}, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)


def partition_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, object]] | None = None,
) -> PartitionSpec:
    """Mesh partitioning of one array from its logical axes.

    A dimension stays replicated when its rule names no mesh axis, when the mesh axes are of size
    one or an earlier dimension took them; of several mesh axes, the longest prefix whose size
    divides the dimension is used.
    """
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(axes, shape):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = tuple(n for n in names if n not in used and mesh.shape[n] > 1)
        while names and dim % math.prod(mesh.shape[n] for n in names):
            names = names[:-1]  # keep the longest prefix of mesh axes that divides the dimension
        if not names:
            spec.append(None)
            continue
        used.update(names)
        spec.append(names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int], rules=None) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh, rules))


def _variable_sharding(var: nnx.Variable, mesh: Mesh, rules) -> NamedSharding:
    axes = tuple(var.get_metadata().get("axes", ()))
    axes = ("layers",) * (len(var.shape) - len(axes)) + axes  # stacked layers lead
    return named_sharding(mesh, axes, var.shape, rules)


def model_shardings(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.State:
    """The model's state with a NamedSharding in place of every variable's value."""
    return state_shardings(nnx.state(model), mesh, rules)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None) -> nnx.State:
    """`state` (of a model, or a part of one from `nnx.split`) with a NamedSharding in place of every value."""
    return jax.tree.map(
        lambda v: v.replace(value=_variable_sharding(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Place every parameter of `model` on the mesh by its logical axes."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(
        lambda v: v.replace(value=jax.device_put(v[...], _variable_sharding(v, mesh, rules))),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    return nnx.merge(graphdef, state)


def batch_mesh_axes(size: int) -> tuple[str, ...]:
    """The axes of the current mesh (`jax.set_mesh`) that a batch dimension of `size` is split over
    (`partition_spec`'s rule for "batch"); () outside a mesh of these axes."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return ()
    axes = partition_spec(("batch",), (size,), mesh)[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def constrain_batch(x: jax.Array, batch_axis: int = 0) -> jax.Array:
    """`x` with its batch axis split over the current mesh's (data, fsdp) axes, the other axes left to
    XLA. Activations carry this (the residual stream, final hidden states, logits, the KV cache), so
    that an FSDP program gathers weights and keeps activations split by rows; without it XLA may
    all-reduce whole-batch activations inside the layer loop instead. A no-op outside a mesh."""
    axes = batch_mesh_axes(x.shape[batch_axis])
    if not axes:
        return x
    spec = [PartitionSpec.UNCONSTRAINED] * x.ndim
    spec[batch_axis] = axes
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def on_mesh(fn, mesh: Mesh):
    """`fn` (a jitted function) called, and so traced, under `jax.set_mesh(mesh)`: the activation
    constraints (`constrain_batch`) and the attention backend (`stjax.models.attention.platform`)
    then see the mesh."""

    def call(*args, **kwargs):
        with jax.set_mesh(mesh):
            return fn(*args, **kwargs)

    return call


def batch_sharding(mesh: Mesh, shape: Sequence[int], batch_axis: int = 0, rules=None) -> NamedSharding:
    """Shard an input array's batch dimension over (data, fsdp); replicate the rest."""
    axes = [None] * len(shape)
    axes[batch_axis] = "batch"
    return named_sharding(mesh, axes, shape, rules)


def input_shardings(inputs, mesh: Mesh, rules=None):
    """Where `shard_inputs` places a `ModelInputs`: a tree like it of shardings."""
    batch = lambda x, axis=0: batch_sharding(mesh, np.shape(x), axis, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    vision = inputs.vision
    if vision is not None:
        vision = jax.tree.map(lambda _: replicated, vision).replace(
            token_index=batch(vision.token_index), token_mask=batch(vision.token_mask)
        )
    return inputs.replace(
        input_ids=batch(inputs.input_ids),
        attention_mask=batch(inputs.attention_mask),
        position_ids=batch(inputs.position_ids, 1),
        vision=vision,
    )


def shard_inputs(inputs, mesh: Mesh, rules=None):
    """Place a `ModelInputs` on the mesh: batch dimensions over (data, fsdp), vision data replicated."""
    return jax.device_put(inputs, input_shardings(inputs, mesh, rules))
