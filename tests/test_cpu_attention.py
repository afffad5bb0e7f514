"""The fused CPU attention kernel (`cpu_flash`) against the `xla` reference: values and gradients.

Tolerance: 1e-5 relative to the largest reference value (both are float32; the kernel's exp is a
polynomial good to about 1 ulp, its sums run in another order).
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stjax.models import cpu_attention
from stjax.models.attention import attend

# (batch, queries, keys, heads, kv heads, head size, causal, q_offset): lengths that are not
# multiples of the kernel's 48- or 32-wide tiles, GQA, head size 80 (the Qwen vision towers), and
# queries placed inside a longer key sequence as a prefill after a cached prefix would be.
CASES = {
    "vision groups": (3, 100, 100, 4, 4, 32, False, 0),  # 32-wide tiles (they pad less here)
    "windows": (4, 64, 64, 2, 2, 16, False, 0),  # Qwen2.5-VL's 64-patch windows: 32-wide tiles
    "causal gqa": (2, 130, 130, 8, 2, 16, True, 0),
    "head size 80": (2, 70, 70, 6, 3, 80, True, 0),
    "offset": (1, 40, 90, 4, 2, 64, True, 50),
    "one tile": (2, 48, 48, 2, 1, 16, True, 0),
}


def _inputs(b, l, s, h, kv, d, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(b, l, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, s, kv, d)), jnp.float32) for _ in range(2))
    seg_q, seg_k = np.ones((b, l), np.int32), np.ones((b, s), np.int32)
    seg_q[0, : l // 3], seg_k[0, : s // 3] = 2, 2  # two segments in row 0
    if b > 1:  # padding (segment 0) at the end of row 1
        seg_q[1, l - 11 :], seg_k[1, s - 11 :] = 0, 0
    return q, k, v, jnp.asarray(seg_q), jnp.asarray(seg_k)


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients_match_xla(case):
    b, l, s, h, kv, d, causal, offset = CASES[case]
    q, k, v, seg_q, seg_k = _inputs(b, l, s, h, kv, d)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def loss(q, k, v, backend, offset):
        return jnp.sum(attend(q, k, v, seg_q, seg_k, causal, backend, q_offset=offset) * weights)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    # The offset goes in traced, as the sampler's cache position does.
    (ref_loss, ref_grads), (loss_, grads) = (
        grad(q, k, v, backend, jnp.int32(offset)) for backend in ("xla", "cpu_flash")
    )
    assert abs(float(loss_ - ref_loss)) <= 1e-5 * abs(float(ref_loss)) + 1e-4
    for name, g, ref in zip("qkv", grads, ref_grads):
        assert _rel(g, ref) <= 1e-5, name
    out = attend(q, k, v, seg_q, seg_k, causal, "cpu_flash", q_offset=offset)
    assert _rel(out, attend(q, k, v, seg_q, seg_k, causal, "xla", q_offset=offset)) <= 1e-5


def test_the_comparison_can_fail():
    """A key moved to another segment changes the outputs far beyond the tolerance."""
    q, k, v, seg_q, seg_k = _inputs(1, 60, 60, 2, 2, 16)
    moved = seg_k.at[0, 50].set(2)
    out = attend(q, k, v, seg_q, moved, False, "cpu_flash")
    assert _rel(out, attend(q, k, v, seg_q, seg_k, False, "xla")) > 1e-2


def _lowered(backend, l):
    q, k, v, seg_q, seg_k = _inputs(1, l, 64, 4, 2, 16)
    fn = jax.jit(lambda q, k, v: attend(q, k, v, seg_q, seg_k, True, backend, q_offset=64 - l))
    return fn.lower(q, k, v).as_text()


def test_kernel_serves_prefill_and_xla_serves_decoding():
    assert cpu_attention.FORWARD_TARGET in _lowered("cpu_flash", 64)
    assert cpu_attention.FORWARD_TARGET not in _lowered("cpu_flash", cpu_attention.MIN_QUERIES - 1)
    assert cpu_attention.FORWARD_TARGET not in _lowered("xla", 64)


def test_bfloat16_inputs_give_bfloat16_outputs():
    q, k, v, seg_q, seg_k = _inputs(2, 50, 50, 4, 2, 16)
    out = attend(*(x.astype(jnp.bfloat16) for x in (q, k, v)), seg_q, seg_k, True, "cpu_flash")
    assert out.dtype == jnp.bfloat16
    assert _rel(out.astype(jnp.float32), attend(q, k, v, seg_q, seg_k, True, "xla")) <= 2e-2


def test_without_a_compiler_the_backend_falls_back_to_xla(tmp_path):
    """No C++ compiler: a warning naming the kernel source, and the xla function."""
    script = """
import logging, jax.numpy as jnp, numpy as np
from stjax.models import cpu_attention
from stjax.models.attention import attend
logging.basicConfig()
q = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 2, 16)), jnp.float32)
seg = jnp.ones((1, 32), jnp.int32)
assert not cpu_attention.available()
assert float(jnp.abs(attend(q, q, q, seg, seg, True, "cpu_flash") - attend(q, q, q, seg, seg, True, "xla")).max()) == 0
print("fell back")
"""
    env = {
        "CXX": str(tmp_path / "no-such-compiler"),
        "STJAX_CACHE_DIR": str(tmp_path / "cache"),
        "JAX_PLATFORMS": "cpu",
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "fell back" in done.stdout
    assert "cpu_flash attention unavailable" in done.stderr and "cpu_attention.cc" in done.stderr


def test_on_a_mesh_the_kernel_runs_replicated_and_agrees():
    """XLA cannot split the custom call: on 8 devices it runs replicated, with the same values."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    q, k, v, seg_q, seg_k = _inputs(8, 40, 40, 4, 2, 16)
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    placed = [put(x, "data", None, "tensor") for x in (q, k, v)] + [put(s, "data") for s in (seg_q, seg_k)]

    def loss(q, k, v, seg_q, seg_k, backend):
        return jnp.sum(attend(q, k, v, seg_q, seg_k, True, backend) ** 2)

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=5)(*placed, "cpu_flash")
    ref = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, seg_q, seg_k, "xla")
    for g, r in zip(grads, ref):
        assert _rel(g, r) <= 1e-5


def test_dots_attention_remat_keeps_the_kernel_outputs():
    """Under `dots` the backward pass of a scanned stack runs each layer's attention forward again;
    `dots_attention` saves the kernel's outputs, so the gradient holds as many forward calls as
    without remat, and the same gradients."""
    from flax import nnx

    from stjax.models.layers import scan_layers, stack_layers

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Param(jax.random.normal(rngs.params(), (64, 64)) * 0.1)

        def __call__(self, x):
            q = (x @ self.w[...]).reshape(1, 48, 4, 16)
            return x + attend(q, q[:, :, :2], q[:, :, 2:], seg, seg, True, "cpu_flash").reshape(1, 48, 64)

    seg = jnp.ones((1, 48), jnp.int32)
    layers = stack_layers(Layer, 3, nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 48, 64)), jnp.float32)
    graphdef, state = nnx.split(layers)

    def grad(remat):
        loss = lambda s: jnp.sum(jnp.sin(scan_layers(nnx.merge(graphdef, s), x, lambda l, c, _: l(c), remat=remat)))
        forward_calls = str(jax.make_jaxpr(jax.grad(loss))(state)).count(cpu_attention.FORWARD_TARGET)
        return forward_calls, jax.grad(loss)(state)

    (plain, g0), (dots, g1), (saved, g2) = grad("none"), grad("dots"), grad("dots_attention")
    assert saved == plain < dots, (plain, dots, saved)
    for a, b, c in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-5, atol=1e-7)
