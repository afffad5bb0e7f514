"""A frozen base stored quantized (QLoRA): NF4 or int8 weights, dequantized right before their matmul.

The storage is bitsandbytes', bit for bit, for torch's weight W (out, in) = kernel.T of one layer
(stacked layers add a leading axis):

- `nf4` (QLoRA, `bitsandbytes.functional.quantize_4bit(W, blocksize=64, quant_type="nf4")`): W
  flattened row-major, in blocks of `BLOCKSIZE` = 64 values; each block is scaled by its absolute
  maximum into [-1, 1] and every value rounded to the nearest of the 16 NormalFloat values `NF4`.
  `codes` (out * in / 2,) uint8 packs two codes per byte, the first in the high nibble; `absmax`
  (out * in / 64,) float32. With `double_quant` (bitsandbytes' `compress_statistics`, transformers'
  `bnb_4bit_use_double_quant`) absmax less its mean is itself quantized, in blocks of 256, to the
  8-bit `DYNAMIC` map: `absmax` becomes uint8 codes, `absmax_scale` (one per 256 blocks) and
  `absmax_offset` (the mean) float32; 0.516 instead of 0.5625 bytes per weight. Both steps follow
  bitsandbytes' CPU backend bit for bit: the mean is torch's float32 sum in its order (`_torch_sum`)
  and the codes come from its kernel's 65536-point table (`_dynamic_codes`), not a nearest search.
- `int8` (LLM.int8's weight storage, `bitsandbytes.functional.int8_vectorwise_quant`): `codes`
  (out, in) int8 = round(W x 127 / absmax of its row), `absmax` (out,) float32.

`QuantizedKernel` holds one linear's arrays as `QuantizedArray`s: not `nnx.Param`s, so no optimizer
or parameter filter takes them, with logical axes so they shard on a mesh like the rest (nf4's flat
arrays over `quant_blocks`, int8's rows and columns like the kernel's). Its matmul dequantizes the
weight to the compute dtype inside the layer scan, a tile of output rows at a time (at most
`TILE_VALUES` weights: a 72B MLP projection is 77 tiles), and under `jax.checkpoint`: the backward
pass dequantizes again instead of keeping dequantized weights as residuals (which would hold the
whole base in the compute dtype during a training step).

Why not qwix (Google's JAX quantization library, Tunix's QLoRA): qwix quantizes a model by
intercepting the `dot_general` calls of a traced forward and rewriting the module's parameters in
place. Our layers are stacked and run by `lax.scan` over a `nnx.split` state (`layers.scan_layers`),
so a rewrite inside the scan body never reaches the stacked state; it starts from a full-precision
model in memory, not from one checkpoint tensor at a time; its quantized parameters carry none of our
logical axes; and its NF4 (one 4-bit code per element, nearest-value search) is not bitsandbytes'
packed layout, which the release's QLoRA used and which we check against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BLOCKSIZE = 64  # values per NF4 scale (bitsandbytes' and QLoRA's blocksize)
SCALE_BLOCKSIZE = 256  # absmax values per second-level scale under double quantization
TILE_VALUES = 1 << 22  # weights dequantized at a time inside a matmul (8 MB in bf16)

# bitsandbytes' NF4 code book (`get_4bit_type("nf4")`; QLoRA, appendix E), float32.
NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
INT8_SCALE = np.float32(7.874015718698502e-3)  # 1 / 127, as bitsandbytes' int8 dequantization writes it


def _linspace(start: float, end: float, count: int) -> np.ndarray:
    """torch.linspace in float32 as its CPU kernel computes it: from both ends towards the middle,
    each value one fused multiply-add of a float32 step (exact in float64, then rounded once)."""
    start, end = np.float32(start), np.float32(end)
    step = np.float64(np.float32(end - start) / np.float32(count - 1))
    i = np.arange(count)
    return np.where(i < count // 2, start + step * i, end - step * (count - 1 - i)).astype(np.float32)


def _dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), bit for bit: for
    e = 0..6, the midpoints of 2^e + 1 points evenly spaced on [0.1, 1], times 10^(e - 6), with both
    signs; then 0 and 1. Every step in float32, as bitsandbytes makes it with torch."""
    values = [np.float32(0.0), np.float32(1.0)]
    for e in range(7):
        bounds = _linspace(0.1, 1.0, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2)
        values += list(np.float32(10.0 ** (e - 6)) * means) + list(np.float32(-(10.0 ** (e - 6))) * means)
    return np.sort(np.asarray(values, np.float32))


DYNAMIC = _dynamic_map()
DYNAMIC_POINTS = 65536  # bitsandbytes' CPU kernel rounds a scaled value to one of this many points on [-1, 1]


def _points_to_codes(table: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU quantization table (`build_quantize_lut`): for each of `DYNAMIC_POINTS` points
    -1 + 2i / 65535 (float32), the nearest code, ties to the lower (the count of float32 midpoints
    below the point)."""
    midpoints = np.float32(0.5) * (table[:-1] + table[1:])
    points = np.float32(-1) + np.float32(2) * np.arange(DYNAMIC_POINTS, dtype=np.float32) / np.float32(65535)
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


DYNAMIC_CODES = _points_to_codes(DYNAMIC)


class QuantizationError(ValueError):
    """A weight that cannot be stored in the asked format."""


class QuantizedArray(nnx.Variable):
    """Codes or scales of a quantized frozen weight: never trained, never cast."""


def _midpoints(table: np.ndarray) -> jax.Array:
    return jnp.asarray((table[:-1] + table[1:]) / np.float32(2))


def _nearest(scaled: jax.Array, table: np.ndarray) -> jax.Array:
    """Index of the nearest table value, ties to the lower (torch.bucketize on the midpoints)."""
    return jnp.searchsorted(_midpoints(table), scaled, side="left", method="compare_all").astype(jnp.uint8)


def _blockwise(values: jax.Array, size: int, table: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """(codes, absmax) of `values` (flat) in blocks of `size`, a short last block padded with zeros,
    each scaled by the reciprocal of its absolute maximum, as bitsandbytes does."""
    blocks = jnp.pad(values, (0, -values.size % size)).reshape(-1, size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    scaled = jnp.clip(blocks * jnp.where(absmax > 0, 1 / absmax, 0)[:, None], -1, 1)
    return _nearest(scaled.reshape(-1)[: values.size], table), absmax


@functools.partial(jax.jit, static_argnums=1)
def _quantize(weight: jax.Array, fmt: str) -> dict[str, jax.Array]:
    w = weight.astype(jnp.float32)
    if fmt == "int8":
        absmax = jnp.max(jnp.abs(w), axis=1)
        scale = 127 * jnp.where(absmax > 0, 1 / absmax, 0)  # torch's 127 / absmax: a reciprocal, then a product
        return {"codes": jnp.round(w * scale[:, None]).astype(jnp.int8), "absmax": absmax}
    codes, absmax = _blockwise(w.reshape(-1), BLOCKSIZE, NF4)
    return {"codes": (codes[0::2] << 4) | codes[1::2], "absmax": absmax}


def _cascade(rows: np.ndarray) -> np.ndarray:
    """Column sums of `rows` in float32 as ATen's `multi_row_sum` adds them: one by one within steps of
    2^p rows (p = 4 up to 2^19 rows), each step's sum carried through 4 levels, a level passed on to the
    next when its count of steps is a multiple of 2^p."""
    count = len(rows)
    power = max(4, (1 if count <= 2 else (count - 1).bit_length()) // 4)
    step = 1 << power
    levels = np.zeros((4, rows.shape[1]), np.float32)
    i = 0
    while i + step <= count:
        levels[0] = np.cumsum(rows[i : i + step], axis=0, dtype=np.float32)[-1]  # one by one (np.sum pairs)
        i += step
        for j in range(1, 4):
            levels[j] += levels[j - 1]
            levels[j - 1] = 0
            if i & ((step - 1) << (j * power)):
                break
    for row in rows[i:]:
        levels[0] += row
    for j in range(1, 4):
        levels[0] += levels[j]
    return levels[0]


def _torch_sum(values: np.ndarray) -> np.float32:
    """torch's float32 sum on the CPU, bit for bit, as one thread computes it (ATen's `cascade_sum`,
    whose AVX2 kernel torch runs on AVX-512 machines too): 4 vectors of 8 lanes summed over rows of 32
    values (`_cascade`), the whole vectors left over added to the first, the 4 folded into one, then
    the values after the last whole vector and the 8 lanes added one by one. torch splits a sum of
    32768 values or more (ATen's grain size) between its threads, so there its result depends on the
    thread count; below that, and on one thread, it is this."""
    x = np.asarray(values, np.float32).reshape(-1)
    lanes, rows = 8, x.size // 32
    vectors = x[: rows * 32].reshape(rows, 32)
    sums = _cascade(vectors).reshape(4, lanes)
    for start in range(rows * 32, x.size // lanes * lanes, lanes):
        sums[0] += x[start : start + lanes]
    for k in range(1, 4):
        sums[0] += sums[k]
    total = np.float32(0)
    for value in [*x[x.size // lanes * lanes :], *sums[0]]:
        total = np.float32(total + value)
    return total


def _dynamic_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, absmax) of `values` on the `DYNAMIC` map in blocks of `SCALE_BLOCKSIZE`, as bitsandbytes'
    CPU `quantize_blockwise` makes them: each value times its block's float32 reciprocal absmax, clipped
    to [-1, 1], rounded to a table point by float32 steps ((v + 1) x 0.5 x 65535 + 0.5, truncated) and
    given that point's code (`DYNAMIC_CODES`); a block of zeros gets code 0."""
    one, half = np.float32(1), np.float32(0.5)
    blocks = np.pad(values, (0, -values.size % SCALE_BLOCKSIZE)).reshape(-1, SCALE_BLOCKSIZE)
    absmax = np.abs(blocks).max(axis=1)
    scaled = np.clip(blocks * (one / np.where(absmax > 0, absmax, one))[:, None], -one, one)
    points = (((scaled + one) * half) * np.float32(DYNAMIC_POINTS - 1) + half).astype(np.int64)
    codes = np.where(absmax[:, None] > 0, DYNAMIC_CODES[points], 0).astype(np.uint8)
    return codes.reshape(-1)[: values.size], absmax


def quantize(
    weight: np.ndarray | jax.Array, fmt: str, double_quant: bool = False, name: str = "weight"
) -> dict[str, np.ndarray]:
    """The host arrays storing one weight in torch's layout (out, in) as `fmt`; `name` is the
    tensor's name in the error raised when nf4's blocks do not divide it."""
    if fmt == "nf4" and np.size(weight) % BLOCKSIZE:
        out, din = np.shape(weight)
        raise QuantizationError(
            f"{name}: its {out} x {din} = {out * din} values do not divide into nf4 blocks of {BLOCKSIZE}"
        )
    out = {k: np.asarray(v) for k, v in _quantize(weight, fmt).items()}
    if fmt == "nf4" and double_quant:  # on the host, in bitsandbytes' order (its torch mean, its CPU kernel's table)
        offset = np.float32(_torch_sum(out["absmax"]) / np.float32(out["absmax"].size))
        out["absmax"], out["absmax_scale"] = _dynamic_codes(out["absmax"] - offset)
        out["absmax_offset"] = np.asarray(offset)
    return out


def dequantize(arrays: dict[str, jax.Array], fmt: str, shape: tuple[int, int], dtype) -> jax.Array:
    """One layer's weight (out, in) in `dtype` from its stored arrays (bitsandbytes' dequantize_4bit
    and int8_vectorwise_dequant, in float32, then cast)."""
    if fmt == "int8":
        w = arrays["codes"].astype(jnp.float32) * arrays["absmax"][:, None] * INT8_SCALE
        return w.astype(dtype)
    packed = arrays["codes"]
    codes = jnp.stack([packed >> 4, packed & 15], axis=-1).reshape(-1, BLOCKSIZE)
    return (jnp.asarray(NF4)[codes] * block_absmax(arrays)[:, None]).reshape(shape).astype(dtype)


def block_absmax(arrays: dict[str, jax.Array]) -> jax.Array:
    """nf4's float32 scale of each block: stored so, or under double quantization decoded from its
    8-bit codes, their second-level scales and offset."""
    absmax = arrays["absmax"]
    if "absmax_scale" not in arrays:
        return absmax
    scale = jnp.repeat(arrays["absmax_scale"], SCALE_BLOCKSIZE)[: absmax.size]
    return jnp.asarray(DYNAMIC)[absmax] * scale + arrays["absmax_offset"]


def storage_layout(
    fmt: str, double_quant: bool, din: int, dout: int, axes: tuple[str, str]
) -> dict[str, tuple[tuple[int, ...], np.dtype, tuple]]:
    """{array name: (shape, dtype, logical axes)} of one layer's storage of an (in, out) kernel."""
    if fmt == "int8":
        return {"codes": ((dout, din), np.int8, (axes[1], axes[0])), "absmax": ((dout,), np.float32, (axes[1],))}
    blocks = din * dout // BLOCKSIZE
    if not double_quant:
        return {
            "codes": ((din * dout // 2,), np.uint8, ("quant_blocks",)),
            "absmax": ((blocks,), np.float32, ("quant_blocks",)),
        }
    return {
        "codes": ((din * dout // 2,), np.uint8, ("quant_blocks",)),
        "absmax": ((blocks,), np.uint8, ("quant_blocks",)),
        "absmax_scale": ((-(-blocks // SCALE_BLOCKSIZE),), np.float32, (None,)),
        "absmax_offset": ((), np.float32, ()),
    }


def tile_rows(out: int, din: int) -> int:
    """Output rows dequantized at a time: the most that divide `out`, hold whole nf4 blocks and at
    most `TILE_VALUES` weights (all of them for a small weight), a multiple of 128 where one
    exists (the width matrix units tile by)."""
    fits = [r for r in range(min(out, max(1, TILE_VALUES // din)), 0, -1) if out % r == 0 and r * din % BLOCKSIZE == 0]
    return next((r for r in fits if r % 128 == 0), fits[0]) if fits else out


def _tiles(arrays: dict[str, jax.Array], fmt: str, count: int) -> dict[str, jax.Array]:
    """The arrays split into `count` tiles of whole output rows (a leading tile axis); nf4's
    double-quantized block scales are dequantized first (a 64th of the weights' count)."""
    if fmt == "int8":
        return {k: v.reshape(count, -1, *v.shape[1:]) for k, v in arrays.items()}
    return {"codes": arrays["codes"].reshape(count, -1), "absmax": block_absmax(arrays).reshape(count, -1)}


def _project(x: jax.Array, arrays: dict[str, jax.Array], fmt: str, shape: tuple[int, int]) -> jax.Array:
    """x @ kernel, the weight dequantized a tile of output rows at a time (`tile_rows`): never the
    whole layer in the compute dtype. Each tile is checkpointed too, so that the backward pass
    dequantizes it again instead of keeping every tile as a residual."""
    out, din = shape
    rows = tile_rows(out, din)
    if rows == out:
        return jnp.dot(x, dequantize(arrays, fmt, shape, x.dtype).T)
    one = jax.checkpoint(lambda tile: jnp.dot(x, dequantize(tile, fmt, (rows, din), x.dtype).T))
    y = jax.lax.map(one, _tiles(arrays, fmt, out // rows))  # (tiles, ..., rows)
    return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], out)


# x @ kernel with the kernel dequantized again in the backward pass rather than kept (module docstring).
_checkpointed_project = jax.checkpoint(_project, static_argnums=(2, 3))


class QuantizedKernel(nnx.Module):
    """The frozen (in, out) kernel of a `Linear`, stored as `fmt` (the arrays start at zero:
    `loading.quantize_params` fills them from a checkpoint or a model)."""

    def __init__(self, din: int, dout: int, axes: tuple[str, str], fmt: str, double_quant: bool):
        layout = storage_layout(fmt, double_quant, din, dout, axes)
        for name, (shape, dtype, names) in layout.items():
            setattr(self, name, QuantizedArray(jnp.zeros(shape, dtype), axes=names))
        self.names = tuple(layout)
        self.fmt = fmt
        self.shape = (dout, din)  # torch's layout, which the storage follows

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in self.names}

    def matmul(self, x: jax.Array) -> jax.Array:
        """x @ kernel, the kernel dequantized to x's dtype."""
        return _checkpointed_project(x, self.arrays(), self.fmt, self.shape)
