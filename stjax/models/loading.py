"""Checkpoints of the model: Hugging Face directories (safetensors) and stjax directories (orbax).

A stjax model directory holds `config.json` (the HF layout, so tools recognise it), `params/` (one
orbax checkpoint per parameter, named by its path, layers stacked: writing and reading one parameter
at a time bounds host memory during conversion) and any tokenizer/processor files.
Parameters move as a flat dict {path tuple: array}; `stjax.models.weights` maps it to HF names.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

from stjax.io import atomic_dir
from stjax.models.config import ConfigError, QwenVLConfig
from stjax.models.quant import quantize
from stjax.models.qwen_vl import QwenVLForConditionalGeneration, abstract_model
from stjax.models.safetensors_io import PlannedTensor, SafetensorsReader, write_safetensors
from stjax.models.weights import Rule, canonical_name, hf_names, num_layers, rules, to_hf, to_stjax

Params = dict[tuple[str, ...], np.ndarray]
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float16), np.dtype(np.float64))
PARAMS_DIR = "params"
# Files a model directory carries besides weights and config (copied along by the converters).
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


# What a model directory needs from a hub repository (HF or stjax layout); other weight formats are not fetched.
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", f"{PARAMS_DIR}/*"]


class CheckpointError(ValueError):
    """A checkpoint that does not match its config: missing, unexpected or mis-shaped tensors."""


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a directory nor a Hugging Face Hub model we can have."""


def resolve_model_dir(name: str | Path, revision: str | None = None) -> Path:
    """The local directory of a model given as a directory or as a hub id (`owner/name`).

    A directory that exists wins. Anything else goes to `huggingface_hub.snapshot_download`, so the hub's
    own rules hold: its cache (`HF_HOME`, `HF_HUB_CACHE`), offline mode (`HF_HUB_OFFLINE=1`: the cache
    only), the token (`HF_TOKEN` or a stored login) and `revision` (a branch, tag or commit; default main).
    """
    if Path(name).is_dir():
        return Path(name)
    what = f"{name}" + (f" (revision {revision})" if revision else "")
    try:
        return Path(snapshot_download(str(name), revision=revision, allow_patterns=HUB_FILES))
    except HFValidationError:
        raise ModelNotFoundError(f"{name}: no such directory, and not a hub id (owner/name)") from None
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise ModelNotFoundError(
                f"{what}: no such directory, and not in the Hugging Face cache "
                f"{constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1: nothing is downloaded)"
            ) from None
        raise ModelNotFoundError(
            f"{what}: no such directory, and the Hugging Face Hub could not be reached "
            f"(nor is it in the cache {constants.HF_HUB_CACHE})"
        ) from None
    except HfHubHTTPError as e:  # not found, gated or private (a token is missing), a revision that does not exist
        reason = str(e).strip().splitlines()[0]
        raise ModelNotFoundError(f"{what}: no such directory, and the Hugging Face Hub refused it: {reason}") from None


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


def model_fingerprints(directory: str | Path) -> dict[str, str]:
    """{name: "size:mtime_ns"} of a model directory's weight and JSON files (a stjax directory's
    params/ folder as one): what tells that a model changed without hashing gigabytes. The evaluator
    and a training run record it, and each refuses to resume on a model that changed since."""
    directory = Path(directory)
    out = {}
    for path in sorted(directory.iterdir()) if directory.is_dir() else []:
        if (path.is_file() and path.suffix in (".json", ".safetensors")) or path.name == PARAMS_DIR:
            stat = path.stat()
            out[path.name] = f"{stat.st_size}:{stat.st_mtime_ns}"
    return out


@dataclass(frozen=True)
class HFParam:
    """One stjax parameter backed by tensors of a HF checkpoint, read on demand by rows of its
    first axis (layers for stacked parameters), so callers can place it shard by shard."""

    rule: Rule
    shape: tuple[int, ...]
    dtype: np.dtype
    names: tuple[str, ...]  # file tensor names, one per layer (one for an unstacked parameter)
    reader: SafetensorsReader
    progress: Callable[[int], None] | None = None

    def read(self, rows: slice = slice(None)) -> np.ndarray:
        if not self.rule.stacked:
            return np.asarray(to_stjax(self.rule, self._tensor(self.names[0])), self.dtype)[rows]
        layers = range(*rows.indices(self.shape[0]))
        out = np.empty((len(layers),) + self.shape[1:], self.dtype)
        for k, i in enumerate(layers):
            info = self.reader.tensors[self.names[i]]
            if self.rule.kind == "copy" and info.dtype == self.dtype:
                self.reader.read_into(self.names[i], out[k])
                self._count(info.nbytes)
            else:
                out[k] = to_stjax(self.rule, self._tensor(self.names[i]))
        return out

    def _tensor(self, name: str) -> np.ndarray:
        array = self.reader.read(name)
        self._count(array.nbytes)
        return array

    def _count(self, nbytes: int) -> None:
        if self.progress is not None:
            self.progress(nbytes)


def hf_params(
    cfg: QwenVLConfig, directory: str | Path, dtype=None, progress: Callable[[int], None] | None = None
) -> dict[tuple[str, ...], HFParam]:
    """Check a HF checkpoint against its config and return a lazy reader for every parameter.

    Tensor names may be on-disk (`model.layers.*`) or in-memory (`model.language_model.*`).
    Every tensor must be present, expected, of the expected shape and of one dtype; all of this
    is checked from the headers before any data is read.
    """
    reader = SafetensorsReader(directory)
    names = {canonical_name(n): n for n in reader.tensors}
    expected = hf_names(cfg)
    missing = sorted(set(expected) - names.keys())
    unexpected = sorted(names.keys() - set(expected))
    if missing or unexpected:
        parts = [
            f"{len(missing)} missing tensors: {', '.join(missing[:8])}" if missing else "",
            f"{len(unexpected)} unexpected tensors: {', '.join(unexpected[:8])}" if unexpected else "",
        ]
        raise CheckpointError(
            f"{directory} does not match its {cfg.model_type} config: " + "; ".join(p for p in parts if p)
        )
    source = reader.tensors[names["model.embed_tokens.weight"]].dtype
    shapes = param_shapes(cfg)
    out = {}
    for rule in rules(cfg):
        full = shapes[rule.path]
        layers = range(num_layers(cfg, rule)) if rule.stacked else [0]
        want = hf_shape(rule, full[1:] if rule.stacked else full, cfg)
        for i in layers:
            name = rule.hf.format(i=i)
            info = reader.tensors[names[name]]
            if info.shape != want:
                raise CheckpointError(f"tensor {name}: expected shape {want}, got {info.shape}")
            if info.dtype != source:
                raise CheckpointError(f"tensor {name}: expected dtype {source}, got {info.dtype}")
        out[rule.path] = HFParam(
            rule,
            full,
            float_dtype(dtype) if dtype is not None else source,
            tuple(names[rule.hf.format(i=i)] for i in layers),
            reader,
            progress,
        )
    return out


class _OneAtATime:
    """Reads a parameter source when first asked and keeps only the last one read, so exporting
    holds one parameter (plus the tensor being written) at a time."""

    def __init__(self, sources: dict):
        self.sources, self.path, self.array = sources, None, None

    def __call__(self, path: tuple[str, ...]) -> np.ndarray:
        if path != self.path:
            self.path, self.array = None, None  # free the previous parameter first
            source = self.sources[path]
            self.path, self.array = path, source.read() if hasattr(source, "read") else np.asarray(source)
        return self.array


def plan_hf_tensors(cfg: QwenVLConfig, params: dict, dtype=None) -> list[PlannedTensor]:
    """What `write_safetensors` needs to export `params`, each tensor made only when written.

    `params` maps paths to arrays or to lazy sources (with .shape, .dtype and .read()).
    """
    shapes = param_shapes(cfg)
    load = _OneAtATime(params)
    plan = []
    for rule in rules(cfg):
        if rule.path not in params:
            raise CheckpointError(f"parameter {'/'.join(rule.path)} is missing from the stjax checkpoint")
        shape = tuple(params[rule.path].shape)
        if shape != shapes[rule.path]:
            raise CheckpointError(f"parameter {'/'.join(rule.path)}: expected shape {shapes[rule.path]}, got {shape}")
        out_dtype = np.dtype(dtype) if dtype is not None else np.dtype(params[rule.path].dtype)
        for i in range(shape[0]) if rule.stacked else [None]:

            def make(rule=rule, i=i, out_dtype=out_dtype):
                array = load(rule.path)
                return np.asarray(to_hf(rule, array if i is None else array[i], cfg), out_dtype)

            name = cfg.family.hf_name(rule.hf if i is None else rule.hf.format(i=i))
            plan.append(PlannedTensor(name, hf_shape(rule, shape if i is None else shape[1:], cfg), out_dtype, make))
    return plan


def float_dtype(dtype) -> np.dtype | None:
    """`dtype` as a NumPy floating dtype (None stays None); integer or bool casts would destroy weights."""
    if dtype is None:
        return None
    try:
        result = np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None
    if result not in FLOAT_DTYPES:
        raise ConfigError(f"dtype {dtype} is not a floating type; use float32, bfloat16 or float16")
    return result


def save_hf(
    directory: str | Path,
    cfg: QwenVLConfig,
    params: dict,
    dtype=None,
    max_shard_bytes: int = 5 << 30,
    progress: Callable[[int], None] | None = None,
    side_files: str | Path | None = None,
    overwrite: bool = False,
    files: dict[str, str] | None = None,
) -> None:
    """Write a HF model directory: safetensors (sharded past `max_shard_bytes`), config.json, the
    side files of the `side_files` directory and the text `files` (name: text), all built beside
    `directory` and put in place when complete (`stjax.io.atomic_dir`: an occupied `directory` is
    refused unless `overwrite`)."""
    plan = plan_hf_tensors(cfg, params, float_dtype(dtype))
    with atomic_dir(directory, overwrite) as partial:
        write_safetensors(partial, plan, max_shard_bytes, progress)
        cfg.replace(param_dtype=str(plan[0].dtype)).save(partial)
        if side_files is not None:
            copy_side_files(side_files, partial)
        for name, text in (files or {}).items():
            (partial / name).write_text(text)


def _param_dir(directory: Path, path: tuple[str, ...]) -> Path:
    return directory / PARAMS_DIR / ".".join(path)


def save_stjax(
    directory: str | Path,
    cfg: QwenVLConfig,
    params: dict,
    side_files: str | Path | None = None,
    overwrite: bool = False,
) -> None:
    """Write a stjax model directory: config.json, one orbax checkpoint per parameter and the side files
    of the `side_files` directory, built beside `directory` and put in place when complete (as `save_hf`).

    `params` maps paths to arrays or lazy sources (.read()). Each parameter is read, written and
    released before the next, so saving never holds more than one parameter beyond the caller's.
    """
    import orbax.checkpoint as ocp

    with atomic_dir(directory, overwrite) as partial:
        (partial / PARAMS_DIR).mkdir()
        dtype = None
        with ocp.PyTreeCheckpointer() as ckpt:
            for path, source in params.items():
                array = source.read() if hasattr(source, "read") else np.asarray(source)
                ckpt.save(_param_dir(partial, path), {"value": array}, force=True)
                dtype = dtype or str(array.dtype)
                del array
        cfg.replace(param_dtype=dtype).save(partial)
        if side_files is not None:
            copy_side_files(side_files, partial)


@dataclass(frozen=True)
class StjaxParam:
    """One parameter of a stjax directory, read on demand."""

    directory: Path
    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self) -> np.ndarray:
        import orbax.checkpoint as ocp

        with ocp.PyTreeCheckpointer() as ckpt:
            args = {"value": ocp.RestoreArgs(restore_type=np.ndarray)}
            return np.asarray(ckpt.restore(self.directory, args=ocp.args.PyTreeRestore(restore_args=args))["value"])


def stjax_params(directory: str | Path) -> dict[tuple[str, ...], StjaxParam]:
    """Lazy readers for the parameters of a stjax directory (shapes and dtypes from metadata)."""
    import orbax.checkpoint as ocp

    root = Path(directory).absolute() / PARAMS_DIR
    if not root.is_dir():
        raise CheckpointError(f"{directory} is not a stjax model directory (no {PARAMS_DIR}/)")
    out = {}
    with ocp.PyTreeCheckpointer() as ckpt:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            meta = ckpt.metadata(sub).item_metadata.tree["value"]
            out[tuple(sub.name.split("."))] = StjaxParam(sub, tuple(meta.shape), np.dtype(meta.dtype))
    return out


def copy_side_files(source: str | Path, target: str | Path) -> list[str]:
    """Copy tokenizer / processor / generation files from one model directory to another."""
    copied = []
    for name in SIDE_FILES:
        if (Path(source) / name).exists():
            shutil.copy2(Path(source) / name, Path(target) / name)
            copied.append(name)
    return copied


def quantized_paths(cfg: QwenVLConfig) -> set[tuple[str, ...]]:
    """Parameter paths (`.../kernel`) of the linears `cfg` stores quantized (`QwenVLConfig.quantization`)."""
    return {r.path for r in rules(cfg) if r.kind == "linear" and cfg.quantization(r.path[:-1]) != "none"}


def _layers(source, stacked: bool) -> Iterator[np.ndarray]:
    """A kernel one layer at a time (a kernel that is not stacked: whole). A Hugging Face checkpoint
    reads one layer's tensor at a time; an array, or a stjax parameter (orbax reads it whole), is sliced."""
    if not stacked:
        yield source.read() if hasattr(source, "read") else np.asarray(source)
    elif isinstance(source, HFParam):
        for i in range(source.shape[0]):
            yield source.read(slice(i, i + 1))[0]
    else:
        yield from source.read() if hasattr(source, "read") else np.asarray(source)


def quantize_params(cfg: QwenVLConfig, sources: dict) -> Params:
    """Every parameter of `cfg`'s model from `sources` (host arrays or lazy readers), the kernels `cfg`
    stores quantized made so one layer at a time (`quant.quantize`): from a Hugging Face checkpoint,
    at most one layer of such a kernel is ever held in full precision."""
    rule_of = {r.path: r for r in rules(cfg)}
    quantized = quantized_paths(cfg)
    out = {}
    for path, source in sources.items():
        if path not in quantized:
            out[path] = source.read() if hasattr(source, "read") else np.asarray(source)
            continue
        rule, stored = rule_of[path], {}
        count = np.shape(source)[0] if rule.stacked else 1
        for i, kernel in enumerate(_layers(source, rule.stacked)):
            for name, value in quantize(
                kernel.T, cfg.quantization(path[:-1]), cfg.double_quant, rule.hf.format(i=i)
            ).items():
                stored.setdefault(name, np.empty((count,) + value.shape, value.dtype))[i] = value
        out.update({path + (name,): value if rule.stacked else value[0] for name, value in stored.items()})
    return out


def model_from_params(
    cfg: QwenVLConfig, params: Params, mesh: jax.sharding.Mesh | None = None, rules=None
) -> QwenVLForConditionalGeneration:
    """Fill an abstract model with host arrays (parameters, and the arrays of quantized kernels), each
    in the model's dtype for it and placed on the mesh by its logical axes."""
    from stjax.sharding import model_shardings

    model = abstract_model(cfg)
    graphdef, state = nnx.split(model)
    leaves = traverse_util.flatten_dict(nnx.to_pure_dict(state))
    for path, leaf in leaves.items():
        if path not in params:
            raise CheckpointError(f"parameter {'/'.join(path)} is missing")
        if tuple(params[path].shape) != leaf.shape:
            raise CheckpointError(f"parameter {'/'.join(path)}: expected shape {leaf.shape}, got {params[path].shape}")
    shardings = (
        {} if mesh is None else traverse_util.flatten_dict(nnx.to_pure_dict(model_shardings(model, mesh, rules)))
    )
    placed = {
        path: jax.device_put(np.asarray(params[path], leaf.dtype), shardings.get(path)) for path, leaf in leaves.items()
    }
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(placed))
    return nnx.merge(graphdef, state)


def load_pretrained(
    path: str | Path, dtype=None, mesh: jax.sharding.Mesh | None = None, revision: str | None = None, **policy
) -> tuple[QwenVLForConditionalGeneration, QwenVLConfig]:
    """Load a HF or stjax model directory, or a hub id such as "Qwen/Qwen2-VL-7B-Instruct" (see
    `resolve_model_dir`; `revision` picks a branch, tag or commit).

    `dtype` sets the parameter dtype (default: the checkpoint's); `policy` may set
    compute_dtype (default: the parameter dtype), attention, remat and any other run-time field of
    `QwenVLConfig`: with `quantize_base` the targeted kernels are quantized as they are read, one
    layer at a time (`quantize_params`; a stjax directory is read one parameter at a time).
    Returns (model, config); with `mesh`, parameters are sharded by the logical-axis rules.
    """
    if Path(path).is_file():
        raise ConfigError(f"{path} is not a model directory (it is a file)")
    path = resolve_model_dir(path, revision)
    dtype = float_dtype(dtype)
    cfg = QwenVLConfig.from_file(path)
    sources = stjax_params(path) if is_stjax_dir(path) else hf_params(cfg, path, dtype)
    param_dtype = str(np.dtype(dtype)) if dtype is not None else str(next(iter(sources.values())).dtype)
    cfg = cfg.replace(param_dtype=param_dtype, compute_dtype=policy.pop("compute_dtype", param_dtype), **policy)
    return model_from_params(cfg, quantize_params(cfg, sources), mesh), cfg


def quantize_model(
    model: QwenVLForConditionalGeneration, mesh: jax.sharding.Mesh | None = None, **settings
) -> QwenVLForConditionalGeneration:
    """`model` with its frozen base stored as `settings` (quantize_base, quantize_targets,
    double_quant) say, e.g. a randomly initialised model of a preset's shape."""
    cfg = model.config.replace(**settings)
    params = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model)))
    return model_from_params(cfg, quantize_params(cfg, params), mesh)
