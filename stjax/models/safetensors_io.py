"""Streaming safetensors reading and writing, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte offsets of
every tensor) and the raw bytes. Reading straight into a caller's buffer and writing tensor by
tensor keeps peak host memory at one model copy plus one tensor, and copies bytes unchanged, so a
conversion is bit-exact by construction. (The `safetensors` package's NumPy API has no bfloat16.)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
    """A checkpoint file that is missing, corrupt or inconsistent."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """The file's tensors, its header checked as the safetensors library checks it (`_check_offsets`)."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{file}: too short to be a safetensors file")
        (size,) = struct.unpack("<Q", raw)
        data_bytes = file.stat().st_size - 8 - size
        if data_bytes < 0:
            raise SafetensorsError(f"{file}: its header length {size} runs past the end of the file (truncated?)")
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{file}: corrupt safetensors header ({e})") from None
    start = 8 + size
    out, ranges = {}, []
    if not isinstance(header, dict):
        raise SafetensorsError(f"{file}: corrupt safetensors header (not a JSON object)")
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            if not all(isinstance(x, int) and x >= 0 for x in (*shape, begin, end)):
                raise ValueError("shape and data_offsets must be non-negative integers")
        except (TypeError, KeyError, ValueError) as e:
            raise SafetensorsError(f"{file}: corrupt safetensors header entry for {name} ({e!r})") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{file}: tensor {name} has unsupported dtype {dtype}")
        out[name] = TensorInfo(file, DTYPES[dtype], shape, start + begin)
        ranges.append((begin, end, name))
    _check_offsets(file, out, ranges, data_bytes)
    return out


def _check_offsets(
    file: Path, tensors: dict[str, TensorInfo], ranges: list[tuple[int, int, str]], data_bytes: int
) -> None:
    """The safetensors library's rule: the tensors' byte ranges, in order of their offsets, follow one
    another with no gap and no overlap, each as long as its shape x dtype, and together fill the
    data exactly (`data_bytes`: the file's bytes after the header)."""
    expected = 0
    for begin, end, name in sorted(ranges):
        if begin != expected:
            problem = (
                "overlap the previous tensor's"
                if begin < expected
                else f"leave a gap of {begin - expected} bytes after the previous tensor's"
            )
            raise SafetensorsError(
                f"{file}: tensor {name}'s bytes [{begin}, {end}) {problem} (which end at {expected})"
            )
        info = tensors[name]
        if end - begin != info.nbytes:
            raise SafetensorsError(
                f"{file}: tensor {name} spans {end - begin} bytes [{begin}, {end}), but its "
                f"shape {list(info.shape)} of {NAMES[info.dtype]} needs {info.nbytes}"
            )
        expected = end
    if expected > data_bytes:
        raise SafetensorsError(
            f"{file}: the tensors' bytes run to {expected}, past the file's {data_bytes} bytes of data (truncated?)"
        )
    if expected < data_bytes:
        raise SafetensorsError(f"{file}: {data_bytes - expected} bytes after the last tensor belong to none")


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor -> file map, or a SafetensorsError saying what is wrong with it."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (ValueError, AttributeError) as e:  # not JSON (or not text), or not a JSON object
        raise SafetensorsError(f"{index} is not a safetensors index: {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise SafetensorsError(f'{index} has no "weight_map" of tensor names to file names')
    return weight_map


class SafetensorsReader:
    """All tensors of a HF model directory: one `model.safetensors`, or shards with an index."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / INDEX_FILE
        if index.exists():
            files = sorted({directory / f for f in _weight_map(index).values()})
        else:
            files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise SafetensorsError(f"no safetensors files in {directory}")
        self.tensors: dict[str, TensorInfo] = {}
        for file in files:
            if not file.exists():
                raise SafetensorsError(f"{index} names {file.name}, which does not exist")
            self.tensors.update(_read_header(file))

    def read(self, name: str) -> np.ndarray:
        """A fresh array holding the tensor's bytes."""
        info = self.tensors[name]
        out = np.empty(info.shape, info.dtype)
        self.read_into(name, out)
        return out

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Read a tensor into a C-contiguous buffer of its shape and dtype."""
        info = self.tensors[name]
        with open(info.file, "rb") as f:
            f.seek(info.offset)
            got = f.readinto(memoryview(out.reshape(-1).view(np.uint8)))
        if got != info.nbytes:
            raise SafetensorsError(f"{info.file}: tensor {name} is truncated ({got} of {info.nbytes} bytes)")


def differing_tensors(a: str | Path, b: str | Path) -> list[str]:
    """Names of the tensors that differ between two model directories in name, shape, dtype or bytes
    (empty when they hold the same tensors), read one tensor at a time."""
    ra, rb = SafetensorsReader(a), SafetensorsReader(b)
    differ = sorted(set(ra.tensors) ^ set(rb.tensors))
    for name in sorted(set(ra.tensors) & set(rb.tensors)):
        x, y = ra.read(name), rb.read(name)
        if x.dtype != y.dtype or x.shape != y.shape or x.tobytes() != y.tobytes():
            differ.append(name)
    return differ


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write: its metadata now, its bytes from `make()` when its turn comes."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    make: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def _write_file(file: Path, tensors: list[PlannedTensor]) -> None:
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            array = np.ascontiguousarray(t.make())
            if array.shape != t.shape or array.dtype != t.dtype:
                raise SafetensorsError(f"{t.name}: planned {t.shape} {t.dtype}, produced {array.shape} {array.dtype}")
            f.write(memoryview(array.reshape(-1).view(np.uint8)))


def write_safetensors(
    directory: str | Path,
    tensors: Iterable[PlannedTensor],
    max_shard_bytes: int = 5 << 30,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards plus the index
    when the total exceeds `max_shard_bytes`. Tensors are produced and written one at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    for name, shard in zip(names, shards):
        wrapped = [PlannedTensor(t.name, t.shape, t.dtype, _counted(t, progress)) for t in shard]
        _write_file(directory / name, wrapped)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in shards for t in s)},
            "weight_map": {t.name: name for name, s in zip(names, shards) for t in s},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [directory / n for n in names]


def _counted(t: PlannedTensor, progress: Callable[[int], None] | None) -> Callable[[], np.ndarray]:
    def make() -> np.ndarray:
        array = t.make()
        if progress is not None:
            progress(t.nbytes)
        return array

    return make
