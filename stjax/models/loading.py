"""Checkpoints of the model: Hugging Face directories (safetensors) and stjax directories (orbax).

A stjax model directory holds `config.json` (the HF layout, so tools recognise it), `params/` (an
orbax checkpoint of the parameters with layers stacked) and any tokenizer/processor files.
Parameters move as a flat dict {path tuple: array}; `stjax.models.weights` maps it to HF names.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Optional

import jax
import numpy as np
from flax import nnx, traverse_util

from stjax.models.config import QwenVLConfig
from stjax.models.qwen_vl import QwenVLForConditionalGeneration, abstract_model
from stjax.models.safetensors_io import PlannedTensor, SafetensorsReader, write_safetensors
from stjax.models.weights import Rule, canonical_name, hf_names, num_layers, rules, to_hf, to_stjax

Params = dict[tuple[str, ...], np.ndarray]
PARAMS_DIR = "params"
# Files a model directory carries besides weights and config (copied along by the converters).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
              "video_preprocessor_config.json", "processor_config.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing, unexpected or mis-shaped tensors."""


def param_shapes(cfg: QwenVLConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Shape of every parameter (stacked layers first), without allocating anything."""
    state = nnx.to_pure_dict(nnx.state(abstract_model(cfg), nnx.Param))
    return {path: tuple(x.shape) for path, x in traverse_util.flatten_dict(state).items()}


def hf_shape(rule: Rule, shape: tuple[int, ...], cfg: QwenVLConfig) -> tuple[int, ...]:
    """The HF tensor shape of one (per-layer) stjax parameter shape."""
    if rule.kind == "linear":
        return tuple(reversed(shape))
    if rule.kind == "patch":
        v = cfg.vision
        return (shape[1], v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    return shape


def is_stjax_dir(path: str | Path) -> bool:
    return (Path(path) / PARAMS_DIR).is_dir()


def read_hf_params(cfg: QwenVLConfig, directory: str | Path, dtype=None,
                   progress: Optional[Callable[[int], None]] = None) -> Params:
    """Read a HF checkpoint into stacked stjax arrays, one tensor at a time.

    Tensor names may be on-disk (`model.layers.*`) or in-memory (`model.language_model.*`).
    Every tensor must be present, expected, of the expected shape and of one dtype.
    """
    reader = SafetensorsReader(directory)
    names = {canonical_name(n): n for n in reader.tensors}
    expected = hf_names(cfg)
    missing = sorted(set(expected) - names.keys())
    unexpected = sorted(names.keys() - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing tensors: {', '.join(missing[:8])}" if missing else "",
                 f"{len(unexpected)} unexpected tensors: {', '.join(unexpected[:8])}" if unexpected else ""]
        raise CheckpointError(f"{directory} does not match its {cfg.model_type} config: " +
                              "; ".join(p for p in parts if p))
    source = reader.tensors[names["model.embed_tokens.weight"]].dtype
    shapes = param_shapes(cfg)
    params: Params = {}
    for rule in rules(cfg):
        layers = num_layers(cfg, rule) if rule.stacked else None
        full = shapes[rule.path]
        out = np.empty(full, np.dtype(dtype) if dtype is not None else source)
        for i in range(layers) if layers else [None]:
            hf_name = rule.hf.format(i=i)
            info = reader.tensors[names[hf_name]]
            want = hf_shape(rule, full[1:] if layers else full, cfg)
            if info.shape != want:
                raise CheckpointError(f"tensor {hf_name}: expected shape {want}, got {info.shape}")
            if info.dtype != source:
                raise CheckpointError(f"tensor {hf_name}: expected dtype {source}, got {info.dtype}")
            target = out[i] if layers else out
            if rule.kind == "copy" and out.dtype == source:
                reader.read_into(names[hf_name], target)
            else:
                target[...] = to_stjax(rule, reader.read(names[hf_name]))
            if progress is not None:
                progress(info.nbytes)
        params[rule.path] = out
    return params


def plan_hf_tensors(cfg: QwenVLConfig, params: Params, dtype=None) -> list[PlannedTensor]:
    """What `write_safetensors` needs to export `params`, each tensor made only when written."""
    shapes = param_shapes(cfg)
    plan = []
    for rule in rules(cfg):
        if rule.path not in params:
            raise CheckpointError(f"parameter {'/'.join(rule.path)} is missing from the stjax checkpoint")
        array = params[rule.path]
        if tuple(array.shape) != shapes[rule.path]:
            raise CheckpointError(f"parameter {'/'.join(rule.path)}: expected shape {shapes[rule.path]}, "
                                  f"got {tuple(array.shape)}")
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(array.dtype)
        for i in range(array.shape[0]) if rule.stacked else [None]:
            part = array if i is None else array[i]
            make = lambda rule=rule, part=part: np.asarray(to_hf(rule, np.asarray(part), cfg), out_dtype)
            name = rule.hf if i is None else rule.hf.format(i=i)
            plan.append(PlannedTensor(name, hf_shape(rule, part.shape, cfg), out_dtype, make))
    return plan


def save_hf(directory: str | Path, cfg: QwenVLConfig, params: Params, dtype=None,
            max_shard_bytes: int = 5 << 30, progress: Optional[Callable[[int], None]] = None) -> None:
    """Write a HF model directory: safetensors (sharded past `max_shard_bytes`) and config.json."""
    plan = plan_hf_tensors(cfg, params, dtype)
    write_safetensors(directory, plan, max_shard_bytes, progress)
    cfg.replace(param_dtype=str(plan[0].dtype)).save(directory)


def save_stjax(directory: str | Path, cfg: QwenVLConfig, params: Params) -> None:
    """Write a stjax model directory (orbax parameters + config.json)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    tree = traverse_util.unflatten_dict(params)
    with ocp.PyTreeCheckpointer() as ckpt:
        ckpt.save(directory / PARAMS_DIR, tree, force=True)
    dtype = str(np.dtype(next(iter(params.values())).dtype))
    cfg.replace(param_dtype=dtype).save(directory)


def read_stjax_params(directory: str | Path) -> Params:
    """The parameters of a stjax directory as host NumPy arrays."""
    import orbax.checkpoint as ocp

    path = Path(directory).absolute() / PARAMS_DIR
    if not path.is_dir():
        raise CheckpointError(f"{directory} is not a stjax model directory (no {PARAMS_DIR}/)")
    with ocp.PyTreeCheckpointer() as ckpt:
        restored = ckpt.restore(path)  # saved from NumPy arrays, so restored as NumPy arrays
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(restored).items()}


def copy_side_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy tokenizer / processor / generation files from one model directory to another."""
    copied = []
    for name in SIDE_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def model_from_params(cfg: QwenVLConfig, params: Params, mesh: Optional[jax.sharding.Mesh] = None,
                      rules=None) -> QwenVLForConditionalGeneration:
    """Fill an abstract model with host arrays, placing each on the mesh by its logical axes."""
    from stjax.sharding import model_shardings

    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    shapes = param_shapes(cfg)
    for path, shape in shapes.items():
        if path not in params:
            raise CheckpointError(f"parameter {'/'.join(path)} is missing")
        if tuple(params[path].shape) != shape:
            raise CheckpointError(f"parameter {'/'.join(path)}: expected shape {shape}, got {params[path].shape}")
    shardings = {} if mesh is None else traverse_util.flatten_dict(
        nnx.to_pure_dict(model_shardings(model, mesh, rules)))
    placed = {path: jax.device_put(np.asarray(params[path], cfg.param_dtype), shardings.get(path))
              for path in shapes}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(placed))
    return nnx.merge(graphdef, state)


def load_pretrained(path: str | Path, dtype=None, mesh: Optional[jax.sharding.Mesh] = None,
                    **policy) -> tuple[QwenVLForConditionalGeneration, QwenVLConfig]:
    """Load a HF model directory or a stjax model directory.

    `dtype` sets the parameter dtype (default: the checkpoint's); `policy` may set
    compute_dtype (default: the parameter dtype), attention and remat.
    Returns (model, config); with `mesh`, parameters are sharded by the logical-axis rules.
    """
    path = Path(path)
    cfg = QwenVLConfig.from_file(path)
    params = read_stjax_params(path) if is_stjax_dir(path) else read_hf_params(cfg, path, dtype)
    param_dtype = str(np.dtype(dtype)) if dtype is not None else str(next(iter(params.values())).dtype)
    cfg = cfg.replace(param_dtype=param_dtype, compute_dtype=policy.pop("compute_dtype", param_dtype), **policy)
    return model_from_params(cfg, params, mesh), cfg
