"""The `cpu_flash` attention backend: a fused attention kernel for XLA:CPU, through the XLA FFI.

XLA's CPU backend has no fused attention; it materialises every score and runs at a third of
the speed of PyTorch's CPU `sdpa`. `cpu_attention.cc` is a flash-attention kernel (forward and
backward) that keeps scores in small tiles. It is compiled on first use with the system C++
compiler (`$CXX`, else `c++`) for this machine's CPU (`-march=native`) into a cache directory
(`$STJAX_CACHE_DIR`, default `~/.cache/stjax`), once per kernel source, jaxlib version and CPU
model. Where it cannot be built, `available()` is False and `attend` falls back to `xla` with a
warning. On a mesh XLA cannot split the custom call: it runs replicated (correct, tested on 8
simulated devices, but without the sharding's speed-up), so it is meant for one-device CPU runs.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w")
MIN_QUERIES = 16  # fewer queries (a decoding step) leave the kernel's 32- or 48-query tiles mostly empty
FORWARD_TARGET, BACKWARD_TARGET = "StjaxFlashForward", "StjaxFlashBackward"  # the FFI handlers in cpu_attention.cc
_log = logging.getLogger(__name__)


def _cpu_model() -> str:
    """What -march=native compiled for: a library built on one CPU model may not run on another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return os.uname().machine
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _build() -> Path:
    """Compiles the kernel into the cache (atomically: concurrent processes may build at once)."""
    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256(
        "\n".join([_SOURCE.read_text(), jaxlib.__version__, compiler, *_FLAGS, _cpu_model()]).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("STJAX_CACHE_DIR", Path.home() / ".cache" / "stjax"))
    library = cache / f"cpu_attention-{key}.so"
    if library.exists():
        return library
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(dir=cache, suffix=".so.partial")
    os.close(fd)
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", partial]
    _log.info("compiling the cpu_flash attention kernel for this CPU (once): %s", library)
    try:
        subprocess.run(command, check=True, capture_output=True, text=True)
        os.replace(partial, library)
    finally:
        Path(partial).unlink(missing_ok=True)
    return library


@functools.cache
def available() -> bool:
    """Builds (once) and registers the kernel; False, with a warning, where that fails."""
    try:
        library = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", "") or e
        _log.warning("cpu_flash attention unavailable, using xla: could not build %s: %s", _SOURCE, detail)
        return False
    for name in (FORWARD_TARGET, BACKWARD_TARGET):
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return True


def supports(q: jax.Array) -> bool:
    """Whether the kernel serves these queries (B, L, H, D) on this platform."""
    from stjax.models.attention import platform  # (attention imports this module)

    return platform() == "cpu" and q.shape[-1] % 16 == 0 and q.shape[1] >= MIN_QUERIES and available()


def _forward(q, k, v, segment_q, segment_k, q_offset, causal):
    b, l, h, d = q.shape
    out_types = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, l), jnp.float32))
    call = jax.ffi.ffi_call(FORWARD_TARGET, out_types, vmap_method="sequential")
    return call(q, k, v, segment_q, segment_k, q_offset, causal=causal, scale=np.float32(d**-0.5))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(q, k, v, segment_q, segment_k, q_offset, causal):
    return _forward(q, k, v, segment_q, segment_k, q_offset, causal)[0]


def _attention_fwd(q, k, v, segment_q, segment_k, q_offset, causal):
    out, lse = _forward(q, k, v, segment_q, segment_k, q_offset, causal)
    return out, (q, k, v, segment_q, segment_k, q_offset, out, lse)


def _attention_bwd(causal, residuals, d_out):
    q, k, v, segment_q, segment_k, q_offset, out, lse = residuals
    delta = jnp.einsum("blhd,blhd->bhl", d_out, out)  # the softmax gradient's row term
    out_types = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    call = jax.ffi.ffi_call(BACKWARD_TARGET, out_types, vmap_method="sequential")
    dq, dk, dv = call(
        q, k, v, segment_q, segment_k, q_offset, d_out, lse, delta, causal=causal, scale=np.float32(q.shape[-1] ** -0.5)
    )
    return dq, dk, dv, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_q: jax.Array, segment_k: jax.Array, causal: bool, q_offset=0
) -> jax.Array:
    """The function of `attention._xla` (see `attend`), computed in float32 by the fused kernel."""
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    segments = [jnp.asarray(s, jnp.int32) for s in (segment_q, segment_k)]
    out = _attention(*f32, *segments, jnp.asarray(q_offset, jnp.int32), causal)
    return out.astype(q.dtype)
