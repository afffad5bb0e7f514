"""Precision policy, attention backends and sharded execution against the single-device fp32 model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import make_batch

from stjax import sharding
from stjax.models import attention
from stjax.models.attention import BACKENDS, attend
from stjax.models.inputs import is_right_padded, prepare_inputs
from stjax.models.loading import load_pretrained
from stjax.models.qwen_vl import compiled_forward

PROMPT = [[3, ("video", 2, 8, 12), 5]]
BATCH_OF_FOUR = [[3, ("video", 2, 4, 4), 9], [5, ("image", 1, 4, 8), 2], [11], [2, ("video", 3, 4, 8), 1]]


def rel(a, b, mask):
    real = np.asarray(mask, bool)
    return float(np.abs(a - b)[real].max() / np.abs(b[real]).max())


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_bf16_forward_is_within_2e_2_of_fp32(hf_dirs, arch):
    path = hf_dirs(arch)[0]
    fp32, cfg = load_pretrained(path)
    bf16, _ = load_pretrained(path, dtype="bfloat16")
    batch = make_batch(cfg, PROMPT)
    assert rel(np.asarray(bf16(**batch)), np.asarray(fp32(**batch)), batch["attention_mask"]) <= 2e-2


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "xla"])
def test_attention_kernels_agree_with_xla(backend):
    """GQA (8 query heads on 2 KV heads), padding segments, causal and not."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 40, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32) for _ in range(2))
    seg = jnp.asarray((np.arange(40)[None] >= np.array([[0], [13]])).astype(np.int32))
    for causal in (True, False):
        ref = attend(q, k, v, seg, seg, causal, "xla")
        out = attend(q, k, v, seg, seg, causal, backend)
        assert float(jnp.abs(out - ref).max()) <= 1e-5


def test_right_padded_rows_need_no_mask_for_dot_product(monkeypatch):
    """Rows whose padding comes last: `dot_product` drops the padding mask (cuDNN then runs with no
    bias), and the real queries' outputs are still those of `xla`; any other layout keeps it."""
    assert is_right_padded(np.array([[1, 1, 0], [1, 1, 1], [0, 0, 0]]))
    assert not is_right_padded(np.array([[0, 1, 1], [1, 1, 1]]))
    assert not is_right_padded(np.array([[1, 0, 1]]))
    masks = []
    inner = attention._dot_product
    monkeypatch.setattr(
        attention,
        "_dot_product",
        lambda q, k, v, mask, is_causal, lengths=None: (masks.append(mask), inner(q, k, v, mask, is_causal, lengths))[
            1
        ],
    )
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(2, 40, 8, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 40, 2, 16)), jnp.float32) for _ in range(2))
    seg = (np.arange(40)[None] < np.array([[40], [27]])).astype(np.int32)
    ref = attend(q, k, v, seg, seg, True, "xla")
    out = attend(q, k, v, seg, seg, True, "dot_product", right_padded=True)
    assert masks.pop() is None
    real = seg.astype(bool)
    assert float(jnp.abs(out - ref)[real].max()) <= 1e-5
    assert float(jnp.abs(out - ref)[~real].max()) > 1e-3  # the padding queries do see real keys now
    attend(q, k, v, seg, seg, True, "dot_product")
    assert masks.pop() is not None


def test_right_padded_groups_are_masked_by_key_counts_for_dot_product(monkeypatch):
    """Vision groups (no causal mask, real slots first): `dot_product` gets each group's count of
    real keys instead of a mask (cuDNN's padding mask, no bias), at least 1 for a group of padding
    alone; the real queries' outputs are those of `xla`."""
    calls = []
    inner = attention._dot_product
    monkeypatch.setattr(
        attention,
        "_dot_product",
        lambda q, k, v, mask, is_causal, lengths=None: (
            calls.append((mask, lengths)),
            inner(q, k, v, mask, is_causal, lengths),
        )[1],
    )
    rng = np.random.default_rng(2)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 24, 4, 16)), jnp.float32) for _ in range(3))
    seg = (np.arange(24)[None] < np.array([[24], [9], [0]])).astype(np.int32)
    ref = attend(q, k, v, seg, seg, False, "xla")
    out = attend(q, k, v, seg, seg, False, "dot_product", right_padded=True)
    mask, lengths = calls.pop()
    assert mask is None and np.asarray(lengths).tolist() == [24, 9, 1]
    real = seg.astype(bool)
    assert float(jnp.abs(out - ref)[real].max()) <= 1e-5
    assert bool(jnp.isfinite(out).all())
    assert float(jnp.abs(out - ref)[1, 9:].max()) > 1e-3  # the padding queries do see real keys now
    attend(q, k, v, seg, seg, False, "dot_product")
    assert calls.pop()[0] is not None


def test_cudnn_vision_groups_trace_under_the_per_sample_vmap(monkeypatch):
    """The vision tower attends by groups inside a per-sample `vmap` (`qwen_vl.embed`). On a GPU in
    bf16 that is cuDNN with each group's key count; its batching rule reshapes the query lengths
    together with the key lengths, so both must be batched (a constant query length made every
    H100 config fail at tracing). Traced here for a GPU: the rule runs at trace time, not on a GPU."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention  # no cuDNN here: say 9.28

    monkeypatch.setattr(attention, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda: 92800)

    def groups(q, k, v, seg):
        return attend(q, k, v, seg, seg, False, "dot_product", right_padded=True, split_batch=False)

    x = jax.ShapeDtypeStruct((2, 4, 128, 2, 64), jnp.bfloat16)  # (samples, groups, slots, heads, dim)
    out = jax.eval_shape(jax.vmap(groups), x, x, x, jax.ShapeDtypeStruct((2, 4, 128), jnp.int32))
    assert out.shape == x.shape


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_right_padded_batch_keeps_the_logits(hf_dirs, arch):
    """A right-padded batch (the trainer's layout) through `dot_product` gives `xla`'s logits at
    the real positions, which are the left-padded batch's."""
    path = hf_dirs(arch)[0]
    ref_model, cfg = load_pretrained(path, attention="xla")
    model, _ = load_pretrained(path, attention="dot_product")
    left = make_batch(cfg, BATCH_OF_FOUR[:2])
    right = make_batch(cfg, BATCH_OF_FOUR[:2], padding_side="right")
    inputs = prepare_inputs(cfg, **right)
    assert inputs.right_padded and not prepare_inputs(cfg, **left).right_padded
    out = np.asarray(compiled_forward(model, inputs))[:, : right["input_ids"].shape[1]]
    ref = np.asarray(ref_model(**left))
    np.testing.assert_allclose(out[right["attention_mask"] == 1], ref[left["attention_mask"] == 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "xla"])
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_model_backends_agree(hf_dirs, arch, backend):
    path = hf_dirs(arch)[0]
    ref_model, cfg = load_pretrained(path, attention="xla")  # the default (`auto`) is a fused kernel
    model, _ = load_pretrained(path, attention=backend)
    batch = make_batch(cfg, BATCH_OF_FOUR[:2])
    assert np.abs(np.asarray(model(**batch)) - np.asarray(ref_model(**batch))).max() <= 1e-5


@pytest.mark.parametrize("mesh_shape", [{"fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 4}])
@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_sharded_forward_matches_single_device(hf_dirs, arch, mesh_shape):
    assert jax.device_count() == 8, "conftest sets 8 simulated CPU devices"
    path = hf_dirs(arch)[0]
    single, cfg = load_pretrained(path)
    mesh = sharding.make_mesh(mesh_shape)
    sharded, _ = load_pretrained(path, mesh=mesh)
    batch = make_batch(cfg, BATCH_OF_FOUR * 2)
    inputs = prepare_inputs(cfg, **{k: v for k, v in batch.items()})
    ref = np.asarray(compiled_forward(single, inputs))
    placed = sharding.shard_inputs(inputs, mesh)
    out = compiled_forward(sharded, placed)
    assert np.abs(np.asarray(out) - ref).max() <= 1e-5

    # The large weights really are split.
    t = cfg.text
    fsdp, tensor = mesh.shape["fsdp"], mesh.shape["tensor"]
    layers = sharded.model.layers
    assert layers.q_proj.kernel[...].addressable_shards[0].data.shape == (
        t.num_layers,
        t.hidden_size // fsdp,
        t.num_heads * t.head_dim // tensor,
    )
    assert layers.down_proj.kernel[...].addressable_shards[0].data.shape == (
        t.num_layers,
        t.intermediate_size // tensor,
        t.hidden_size // fsdp,
    )
    assert sharded.model.embed_tokens[...].addressable_shards[0].data.shape == (
        t.vocab_size // tensor,
        t.hidden_size // fsdp,
    )
    assert sharded.visual.blocks.qkv.kernel[...].addressable_shards[0].data.shape[1:] == (
        cfg.vision.hidden_size // fsdp,
        3 * cfg.vision.hidden_size // tensor,
    )
    # a model made in memory is placed by the same rules
    from stjax.models.qwen_vl import init_model

    placed_model = sharding.shard_model(init_model(cfg), mesh)
    assert placed_model.model.layers.q_proj.kernel[...].addressable_shards[0].data.shape == (
        t.num_layers,
        t.hidden_size // fsdp,
        t.num_heads * t.head_dim // tensor,
    )
    # and the batch of 8 is split over the data-parallel axes
    assert placed.input_ids.addressable_shards[0].data.shape[0] == 8 // (mesh.shape["data"] * fsdp)


def test_mesh_errors_are_clear():
    with pytest.raises(sharding.MeshError, match="needs 6 devices"):
        sharding.make_mesh({"fsdp": 3, "tensor": 2})
    with pytest.raises(sharding.MeshError, match="does not divide 8 devices"):
        sharding.make_mesh({"fsdp": -1, "tensor": 3})
    with pytest.raises(sharding.MeshError, match="unknown mesh axes"):
        sharding.make_mesh({"model": 8})


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_fp32_weights_with_bf16_compute_is_within_2e_2_of_fp32(hf_dirs, arch):
    """The dtype policy: fp32 parameters (master weights) computed in bf16."""
    path = hf_dirs(arch)[0]
    fp32, cfg = load_pretrained(path)
    mixed, mixed_cfg = load_pretrained(path, compute_dtype="bfloat16")
    assert mixed.model.layers.q_proj.kernel[...].dtype == jnp.float32
    batch = make_batch(cfg, PROMPT)
    err = rel(np.asarray(mixed(**batch)), np.asarray(fp32(**batch)), batch["attention_mask"])
    assert 0 < err <= 2e-2  # nonzero: the compute really ran in bf16


@pytest.mark.parametrize("remat", ["full", "dots", "dots_attention"])
def test_remat_policies_give_the_same_gradients(hf_dirs, remat):
    from flax import nnx

    path = hf_dirs("qwen2_5_vl")[0]
    base, cfg = load_pretrained(path)
    other, _ = load_pretrained(path, remat=remat)
    inputs = prepare_inputs(cfg, **make_batch(cfg, PROMPT))

    def loss_and_params(model):
        graphdef, params = nnx.split(model, nnx.Param)
        return (lambda p: jnp.mean(nnx.merge(graphdef, p).forward(inputs) ** 2)), params

    def grads(model):
        loss, params = loss_and_params(model)
        return jax.grad(loss)(params)

    is_remat = lambda model: "remat" in str(jax.make_jaxpr(loss_and_params(model)[0])(loss_and_params(model)[1]))
    assert is_remat(other) and not is_remat(base)  # the policy is really applied
    for a, b in zip(jax.tree.leaves(grads(base)), jax.tree.leaves(grads(other))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
