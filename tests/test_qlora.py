"""QLoRA: a frozen base stored as bitsandbytes stores it (NF4, LLM.int8's int8), adapters trained over
it, exported merged. Checked against bitsandbytes itself (run on the CPU), against a LoRA step whose
base holds the dequantized weights, and by the tiny SFT config learning as its bf16 run does."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util
from reference import tiny_config
from test_train_step import sft_batch, stack

import stjax.eval.mcq as mcq
from stjax.models import quant
from stjax.models.inputs import prepare_inputs
from stjax.models.layers import LoRAParam
from stjax.models.loading import (
    HFParam,
    load_pretrained,
    param_shapes,
    quantize_model,
    quantize_params,
    quantized_paths,
)
from stjax.models.qwen_vl import compiled_forward, init_model
from stjax.sampling.sampler import SamplingConfig, generate
from stjax.sharding import make_mesh
from stjax.train import config as train_config
from stjax.train import stages
from stjax.train.loop import export_hf
from stjax.train.lora import merge_lora, with_lora
from stjax.train.step import Batch, sft_micro_loss, split_trainable


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip(
        "bitsandbytes.functional", reason="bitsandbytes (the reference) cannot load its CPU backend here"
    )


def weights(shape, dtype, seed=0):
    import torch

    w = np.random.default_rng(seed).standard_normal(shape, np.float32) * 0.02
    return torch.from_numpy(w).to(getattr(torch, dtype))


@pytest.mark.parametrize("shape, dtype", [((96, 128), "float32"), ((40, 72), "bfloat16"), ((1280, 3420), "bfloat16")])
def test_nf4_storage_and_dequantization_equal_bitsandbytes(bnb, shape, dtype):
    """bitsandbytes' quantize_4bit(nf4, blocksize 64) and ours on the same weights: the same code book,
    packed bytes and absmax; our dequantized weights equal its dequantize_4bit's, bit for bit. Shapes:
    whole blocks per row, rows that straddle blocks (72 inputs), and Qwen2.5-VL's vision MLP down
    projection (3420 inputs). (bitsandbytes' CPU dequantization kernel reads rows shorter than a block,
    fewer than 64 inputs, otherwise than its own quantize_4bit lays them out, so none is used here.)"""
    np.testing.assert_array_equal(quant.NF4, bnb.get_4bit_type("nf4", device="cpu").numpy())
    w = weights(shape, dtype)
    packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
    ours = quant.quantize(np.asarray(w.float().numpy(), jnp.dtype(dtype)), "nf4")
    np.testing.assert_array_equal(ours["codes"], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(ours["absmax"], state.absmax.numpy())
    dequantized = np.asarray(quant.dequantize(ours, "nf4", shape, dtype), np.float32)
    np.testing.assert_array_equal(dequantized, bnb.dequantize_4bit(packed, state).float().numpy())


def test_nf4_codes_at_ties_equal_bitsandbytes(bnb):
    """Weights exactly on the midpoints between NF4 codes, and one float32 step either side, in blocks
    of absmax 1 and 0.37 of both signs: the same codes as bitsandbytes' quantize_4bit (ties go to the
    lower code), bit for bit."""
    import torch

    middle = (quant.NF4[:-1] + quant.NF4[1:]) / np.float32(2)
    ties = np.concatenate([middle, np.nextafter(middle, np.float32(-2)), np.nextafter(middle, np.float32(2))])
    block = np.zeros(64, np.float32)
    block[0], block[1 : 1 + ties.size] = 1.0, ties
    w = np.stack([block, block * np.float32(0.37), -block, -block * np.float32(0.37)])
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4")
    ours = quant.quantize(w, "nf4")
    np.testing.assert_array_equal(ours["codes"], packed.numpy().reshape(-1))
    np.testing.assert_array_equal(ours["absmax"], state.absmax.numpy())


def test_int8_storage_and_dequantization_equal_bitsandbytes_llm_int8(bnb):
    """int8_vectorwise_quant (LLM.int8's weight storage, no outlier threshold) and ours: the same codes
    and row absmax (this draw has a value at exactly half a step, rounded as torch computes it), and
    our dequantized weights equal int8_vectorwise_dequant's."""
    import torch

    w = np.random.default_rng(0).standard_normal((1280, 3420), np.float32)
    codes, absmax, _ = bnb.int8_vectorwise_quant(torch.from_numpy(w.copy()))
    ours = quant.quantize(w, "int8")
    np.testing.assert_array_equal(ours["codes"], codes.numpy())
    np.testing.assert_array_equal(ours["absmax"], absmax.numpy())
    np.testing.assert_array_equal(
        np.asarray(quant.dequantize(ours, "int8", w.shape, "float32")),
        bnb.int8_vectorwise_dequant(codes, absmax).numpy(),
    )


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_values_are_within_half_a_code_gap_of_the_weights_without_bitsandbytes(double_quant):
    """Checked in NumPy, without bitsandbytes: each block of 64 weights (a few outliers among them)
    dequantizes within its absmax x half the largest NF4 gap of the weights, each weight on its
    nearest code; under double quantization the block scales decode within half the largest 8-bit
    map gap x their second-level scale of the true absmax (the offset the float64 mean, 1e-6), and
    the weights within the first bound plus that scale error."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((96, 384)).astype(np.float32) * 0.02
    w.reshape(-1)[rng.choice(w.size, 40, replace=False)] *= 30  # outliers: scales over two decades
    stored = quant.quantize(w, "nf4", double_quant=double_quant)
    got = np.asarray(quant.dequantize(stored, "nf4", w.shape, jnp.float32)).reshape(-1, 64)
    blocks = w.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1)
    decoded = np.asarray(quant.block_absmax(stored))
    scale_error = np.zeros_like(absmax)
    if double_quant:
        np.testing.assert_allclose(stored["absmax_offset"], absmax.astype(np.float64).mean(), rtol=1e-6)
        centred = absmax - absmax.astype(np.float64).mean()
        second = np.abs(np.pad(centred, (0, -centred.size % 256)).reshape(-1, 256)).max(axis=1)
        scale_error = np.repeat(second, 256)[: absmax.size] * np.diff(quant.DYNAMIC).max() / 2 * (1 + 1e-5)
    assert np.all(np.abs(decoded - absmax) <= scale_error + 1e-6 * absmax)
    bound = absmax * np.diff(quant.NF4).max() / 2 * (1 + 1e-6) + scale_error
    assert np.all(np.abs(got - blocks) <= bound[:, None])
    packed = stored["codes"]
    codes = np.stack([packed >> 4, packed & 15], axis=-1).reshape(-1, 64)
    distance = np.abs((blocks / absmax[:, None])[..., None] - quant.NF4)
    np.testing.assert_allclose(
        np.take_along_axis(distance, codes[..., None].astype(int), -1)[..., 0], distance.min(-1), atol=1e-6
    )


def test_int8_values_are_within_half_a_step_of_the_weights_without_bitsandbytes():
    """Each row's int8 codes are round(w x 127 / absmax): the dequantized weights are within
    absmax / 254 of the weights (plus float32 rounding)."""
    w = np.random.default_rng(5).standard_normal((48, 80)).astype(np.float32) * 0.05
    got = np.asarray(quant.dequantize(quant.quantize(w, "int8"), "int8", w.shape, jnp.float32))
    absmax = np.abs(w).max(axis=1, keepdims=True)
    assert np.all(np.abs(got - w) <= absmax / 254 * (1 + 1e-5))


@pytest.fixture
def one_torch_thread():
    """torch on one thread: above 32768 values its float32 sum (bitsandbytes' offset) depends on how many
    threads split it (see `quant._torch_sum`), so bitsandbytes on two threads disagrees with itself on one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def near_tie_weights(rows: int = 512, cols: int = 256, seed: int = 6) -> np.ndarray:
    """Weights whose block absmax, once double-quantized, lands on or within a few float32 ulps of the
    midpoints between 8-bit map codes and of the edges between bitsandbytes' table points: each block's
    largest weight is set to offset + s x scale for targets s in ± pairs (so the mean stays the offset) and
    ±1 in each group of 256 blocks (so the scale stays the scale)."""
    rng = np.random.default_rng(seed)
    blocks = rows * cols // 64
    offset, scale = np.float32(0.05), np.float32(0.01)
    middles = (quant.DYNAMIC[:-1] + quant.DYNAMIC[1:]) / np.float32(2)
    edges = (np.arange(quant.DYNAMIC_POINTS - 1) + 0.5) / 32767.5 - 1  # where table points change
    targets = np.concatenate([rng.choice(middles, blocks // 4), rng.choice(edges, blocks // 4)])
    targets = targets * (1 + rng.choice([-2, -1, 0, 1, 2], targets.size) * 2.0**-23)
    targets = np.clip(targets, -1, 1)
    targets = np.stack([targets, -targets], axis=1).reshape(-1)[:blocks]
    targets.reshape(-1, 256)[:, :2] = [1, -1]
    absmax = (offset + targets * scale).astype(np.float32)
    w = rng.uniform(-1, 1, (blocks, 64)).astype(np.float32) * absmax[:, None] * np.float32(0.99)
    w[np.arange(blocks), rng.integers(0, 64, blocks)] = absmax * rng.choice([-1, 1], blocks).astype(np.float32)
    return w.reshape(rows, cols)


@pytest.mark.parametrize("case", ["random", "near ties", "equal scales"])
def test_double_quantization_equals_bitsandbytes_bit_for_bit(bnb, one_torch_thread, case):
    """compress_statistics=True: bitsandbytes' 4-bit codes, 8-bit scale codes, second-level scales and
    offset equal ours, bit for bit, on: random weights (Qwen2.5-VL's vision MLP down projection, 68400
    blocks: the offset's sum is split in torch's way above 32768); weights whose block scales sit at
    near-ties of the 8-bit map and of bitsandbytes' 65536-point table (where the nearest code and its
    table's code differ, checked below so the case keeps its teeth); and weights whose blocks all share
    one absmax 0.5 (every scale less the mean is 0: blocks of zeros get code 0). Our map is its map, and
    its state through our dequantize gives its dequantize_4bit to 1e-6."""
    import torch

    np.testing.assert_array_equal(quant.DYNAMIC, bnb.create_dynamic_map(signed=True).numpy())
    w = {
        "random": lambda: weights((1280, 3420), "float32").numpy(),
        "near ties": near_tie_weights,
        "equal scales": lambda: np.where(np.arange(64 * 600) % 3, 0.25, -0.5).astype(np.float32).reshape(300, 128),
    }[case]()
    packed, state = bnb.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    theirs = {
        "codes": packed.numpy().reshape(-1),
        "absmax": state.absmax.numpy(),
        "absmax_scale": state.state2.absmax.numpy(),
        "absmax_offset": state.offset.numpy(),
    }
    ours = quant.quantize(w, "nf4", double_quant=True)
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
        assert ours[name].dtype == theirs[name].dtype, name
    np.testing.assert_allclose(
        quant.dequantize(theirs, "nf4", w.shape, "float32"),
        bnb.dequantize_4bit(packed, state).numpy(),
        rtol=1e-6,
        atol=0,
    )
    if case == "near ties":  # the nearest map value (float64) is not bitsandbytes' code for some of them
        absmax = quant.quantize(w, "nf4")["absmax"].astype(np.float64)
        scaled = (absmax - theirs["absmax_offset"]) / np.repeat(theirs["absmax_scale"], 256)[: absmax.size]
        nearest = np.abs(scaled[:, None] - quant.DYNAMIC[None, :].astype(np.float64)).argmin(axis=1)
        assert np.sum(nearest != theirs["absmax"]) > 10
    if case == "equal scales":
        assert np.all(theirs["absmax"] == 0)


def test_double_quantization_equals_transformers_load_in_4bit(bnb, hf_dirs, one_torch_thread):
    """transformers' `BitsAndBytesConfig(load_in_4bit, nf4, bnb_4bit_use_double_quant)` loading a tiny
    Qwen2-VL on the CPU: every linear it quantizes (vision and decoder) holds our storage of its weight,
    bit for bit. transformers refuses any bitsandbytes quantization without accelerate (its
    `validate_environment`), which is not a test dependency: skipped without it."""
    pytest.importorskip("accelerate", reason="transformers' load_in_4bit needs accelerate")
    import bitsandbytes
    import torch
    import transformers

    path, model = hf_dirs("qwen2_vl")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    loaded = type(model).from_pretrained(path, quantization_config=config, dtype=torch.float32)
    weights = dict(model.named_parameters())
    linears = [(n, m) for n, m in loaded.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert len(linears) == 24  # 2 vision blocks x 4, 2 decoder layers x 7, the merger's 2 (lm_head is kept)
    for name, linear in linears:
        state = linear.weight.quant_state
        theirs = {
            "codes": linear.weight.data.numpy().reshape(-1),
            "absmax": state.absmax.numpy(),
            "absmax_scale": state.state2.absmax.numpy(),
            "absmax_offset": state.offset.numpy(),
        }
        ours = quant.quantize(weights[f"{name}.weight"].detach().numpy(), "nf4", double_quant=True)
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("size", [1, 7, 8, 33, 300, 4097, 40_000, (1 << 20) + 77])
def test_the_offsets_sum_is_torchs_float32_sum_on_one_thread(one_torch_thread, size):
    """`quant._torch_sum` against torch.sum on one thread, bit for bit: lengths with a tail of single
    values, whole vectors left over, and enough rows (32768 at 2^20) to carry through all 4 levels of
    ATen's cascade; values of mixed sign and scale, so the order of additions shows in the last bits."""
    import torch

    x = np.random.default_rng(size).standard_normal(size).astype(np.float32) * np.float32(3.3)
    x[::7] *= np.float32(1e3)
    assert quant._torch_sum(x) == torch.from_numpy(x).sum().item()


def test_a_weight_that_does_not_divide_into_blocks_is_named():
    """A vision tower 36 wide: its attention's output projection (36 x 36 = 1296 values) does not divide
    into blocks of 64."""
    cfg = tiny_config("qwen2_vl")
    cfg = cfg.replace(vision=dataclasses.replace(cfg.vision, hidden_size=36, num_heads=3, intermediate_size=64))
    params = {path: np.zeros(shape, np.float32) for path, shape in param_shapes(cfg).items()}
    with pytest.raises(quant.QuantizationError) as error:
        quantize_params(cfg.replace(quantize_base="nf4", quantize_targets="all"), params)
    assert str(error.value) == (
        "visual.blocks.0.attn.proj.weight: its 36 x 36 = 1296 values do not divide into nf4 blocks of 64"
    )


def largest_intermediate(jaxpr) -> int:
    """The most elements of any floating-point value a jaxpr, or a jaxpr inside it (scan,
    checkpoint), makes."""
    sizes = [0]
    for e in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in e.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating)]
        for param in e.params.values():
            for inner in param if isinstance(param, (tuple, list)) else [param]:
                inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's Jaxpr
                if hasattr(inner, "eqns"):
                    sizes.append(largest_intermediate(inner))
    return max(sizes)


@pytest.mark.parametrize("fmt, double_quant", [("nf4", False), ("nf4", True), ("int8", False)])
def test_the_matmul_dequantizes_a_tile_of_rows_at_a_time(monkeypatch, fmt, double_quant):
    """With tiles of 4096 weights, a 256 x 128 kernel is dequantized 32 output rows at a time: x @ kernel
    and its gradient with respect to x equal those over the whole dequantized weight (1e-6), and no
    floating-point value the forward or the backward makes holds as many elements as the weight (32768)."""
    monkeypatch.setattr(quant, "TILE_VALUES", 4096)
    din, dout = 128, 256
    assert quant.tile_rows(dout, din) == 32
    w = np.random.default_rng(0).standard_normal((dout, din)).astype(np.float32) * 0.02
    kernel = quant.QuantizedKernel(din, dout, ("embed", "mlp"), fmt, double_quant)
    for name, value in quant.quantize(w, fmt, double_quant).items():
        getattr(kernel, name)[...] = jnp.asarray(value)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, din)), jnp.float32)
    whole = quant.dequantize(kernel.arrays(), fmt, (dout, din), jnp.float32)
    tiled = jax.grad(lambda x: jnp.sum(jnp.sin(kernel.matmul(x))))
    np.testing.assert_allclose(kernel.matmul(x), x @ whole.T, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tiled(x), jax.grad(lambda x: jnp.sum(jnp.sin(x @ whole.T)))(x), rtol=1e-6, atol=1e-6)
    made = largest_intermediate(jax.make_jaxpr(tiled)(x).jaxpr)
    assert 0 < made < dout * din, made


def random_adapters(model, seed: int = 1) -> nnx.State:
    """Adapters with lora_b non-zero too, so that every adapter weight has a gradient."""
    state = nnx.state(model, LoRAParam)
    keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(state))))
    return jax.tree.map(lambda x: 0.1 * jax.random.normal(next(keys), x.shape, x.dtype), state)


@pytest.mark.parametrize("fmt, double_quant", [("nf4", True), ("int8", False)])
def test_a_qlora_step_has_the_loss_and_gradients_of_a_lora_step_on_the_dequantized_base(fmt, double_quant):
    """The train step's micro-batch loss (`step.sft_micro_loss`, what `update` differentiates) and its
    gradient with respect to the adapters, over the quantized base and over a base holding the
    dequantized weights as float32 parameters, with the same adapters: equal to 1e-5. That base is
    checked against the weights before quantization, not against our dequantization: every quantized
    layer within its largest weight x half the format's largest step (NF4's code gap, int8's 1/127;
    5% slack for double quantization's scales), and none exact."""
    cfg = tiny_config("qwen2_5_vl")
    original = init_model(cfg, seed=0)
    before = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(original)))
    quantized = quantize_model(original, quantize_base=fmt, quantize_targets="all", double_quant=double_quant)
    stored = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(quantized, quant.QuantizedArray)))
    assert {p[:-2] for p in stored} == {p[:-1] for p in quantized_paths(quantized.config)}
    dequantized = merge_lora(quantized)
    after = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(dequantized)))
    half_step = {"nf4": np.diff(quant.NF4).max() / 2, "int8": 1 / 254}[fmt] * 1.05
    for path in quantized_paths(quantized.config):
        w, got = np.asarray(before[path], np.float32), np.asarray(after[path], np.float32)
        error = np.abs(got - w).max()
        assert 0 < error <= np.abs(w).max() * half_step, path
    qlora = with_lora(quantized, rank=4, alpha=8.0)
    lora = with_lora(dequantized, rank=4, alpha=8.0)
    adapters = random_adapters(qlora)
    nnx.update(qlora, adapters)
    nnx.update(lora, adapters)

    _, _, inputs, loss_mask = sft_batch(cfg)
    batch = Batch(inputs=stack(inputs), loss_mask=stack(loss_mask))
    micro = jax.tree.map(lambda x: x[0], batch)
    results = []
    for model in (qlora, lora):
        graphdef, params, frozen = split_trainable(model)
        variables = jax.tree.leaves(params, is_leaf=lambda v: isinstance(v, nnx.Variable))
        assert all(isinstance(v, LoRAParam) for v in variables)  # the optimizer sees the adapters alone
        grad = jax.jit(jax.value_and_grad(sft_micro_loss, argnums=1, has_aux=True), static_argnums=0)
        (loss, _), grads = grad(graphdef, params, frozen, micro, batch, jax.random.key(0))
        results.append((loss, grads))
    (q_loss, q_grads), (loss, grads) = results
    np.testing.assert_allclose(q_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(q_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_quantize_on_load_reads_one_layer_at_a_time_and_shards_on_a_mesh(hf_dirs, monkeypatch):
    path, _ = hf_dirs("qwen2_5_vl")
    reads = []
    read = HFParam.read

    def recorded(self, rows=slice(None)):
        array = read(self, rows)
        reads.append((self.rule.path, self.rule.stacked, array.shape[0]))
        return array

    monkeypatch.setattr(HFParam, "read", recorded)
    settings = dict(quantize_base="nf4", quantize_targets="all")
    model, cfg = load_pretrained(path, mesh=make_mesh({"fsdp": 4, "tensor": 2}), **settings)
    quantized = quantized_paths(cfg)
    assert {("model", "layers", "down_proj", "kernel"), ("visual", "merger", "mlp_0", "kernel")} <= quantized
    for param, stacked, rows in reads:
        if param in quantized and stacked:
            assert rows == 1, param  # one layer read (and quantized) at a time
    codes = model.model.layers.q_proj.kernel.codes[...]
    assert codes.sharding.spec == jax.sharding.PartitionSpec(None, ("fsdp", "tensor"))  # layers, blocks

    single, _ = load_pretrained(path, **settings)
    prompt, _, _, _ = sft_batch(cfg)
    inputs = prepare_inputs(cfg, **prompt)
    np.testing.assert_allclose(compiled_forward(model, inputs), compiled_forward(single, inputs), rtol=1e-5, atol=1e-5)
    from stjax.models.safetensors_io import SafetensorsReader

    layer = SafetensorsReader(path).read("model.layers.1.self_attn.q_proj.weight")
    np.testing.assert_array_equal(
        np.asarray(single.model.layers.q_proj.kernel.codes[...])[1], quant.quantize(layer, "nf4")["codes"]
    )


def test_export_merges_the_adapters_into_the_dequantized_base_and_the_sampler_runs_either(tmp_path):
    cfg = tiny_config("qwen2_vl")
    quantized = quantize_model(init_model(cfg, seed=0), quantize_base="nf4", quantize_targets="all")
    qlora = with_lora(quantized, rank=4, alpha=8.0)
    nnx.update(qlora, random_adapters(qlora))
    export_hf(qlora, tmp_path / "hf", tokenizer=tmp_path)
    exported, exported_cfg = load_pretrained(tmp_path / "hf")
    assert (exported_cfg.quantize_base, exported_cfg.lora_rank) == ("none", 0)

    layers = qlora.model.layers
    stored = {name: getattr(layers.v_proj.kernel, name)[...][1] for name in layers.v_proj.kernel.names}
    a, b = (np.asarray(x[...][1], np.float64) for x in (layers.v_proj.lora_a, layers.v_proj.lora_b))
    base = np.asarray(quant.dequantize(stored, "nf4", layers.v_proj.kernel.shape, "float32"), np.float64)
    expected = base + 8.0 / 4 * (a @ b).T  # torch's layout: W + scale * B @ A
    merged = np.asarray(exported.model.layers.v_proj.kernel[...][1]).T
    np.testing.assert_allclose(merged, expected, rtol=1e-6, atol=1e-7)

    prompt, _, _, _ = sft_batch(cfg)
    inputs = prepare_inputs(cfg, **prompt)
    ours = np.asarray(compiled_forward(qlora, inputs))
    np.testing.assert_allclose(compiled_forward(exported, inputs), ours, rtol=1e-5, atol=1e-5 * np.abs(ours).max())
    # and the sampler decodes the quantized model as it decodes the export
    length, sampling = prompt["input_ids"].shape[1], SamplingConfig(max_new_tokens=8)
    np.testing.assert_array_equal(
        generate(qlora, inputs, length, jax.random.key(0), sampling).tokens,
        generate(exported, inputs, length, jax.random.key(0), sampling).tokens,
    )


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_the_evaluator_runs_a_quantized_model(tmp_path, monkeypatch, fmt):
    """`--quantize`: the model the evaluator answers with holds every linear layer's weight as `fmt`
    codes (none as a float weight), and the run records the format."""
    import stjax.models.loading

    loaded = []
    load = stjax.models.loading.load_pretrained
    monkeypatch.setattr(
        stjax.models.loading, "load_pretrained", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1]
    )
    mcq.main(["--out", str(tmp_path), "--walks", "1", "--max-new-tokens", "8", "--quantize", fmt])
    assert len(mcq.load_records(tmp_path / "predictions.jsonl")) == 6
    assert json.loads((tmp_path / mcq.RUN).read_text())["quantize"] == fmt
    codes = [
        x for x in jax.tree.leaves(nnx.state(loaded[0][0], quant.QuantizedArray)) if x.dtype in (jnp.uint8, jnp.int8)
    ]
    assert codes and {x.dtype for x in codes} == {jnp.dtype(jnp.int8 if fmt == "int8" else jnp.uint8)}


def test_the_sft_demo_config_learns_over_an_nf4_base_as_over_a_bf16_one(synthetic_assets, tmp_path):
    """configs/sft/tiny-cpu.yaml with LoRA r8 (16 steps, lr 2e-2) over a bf16 base and over the same
    base in NF4: both losses fall by more than a nat, within 0.15 nat of each other; the QLoRA run
    exports a bf16 Hugging Face directory, adapters merged."""
    data, models = synthetic_assets
    falls = {}
    for name, quantize in (("bf16", "none"), ("nf4", "nf4")):
        out = tmp_path / name
        cfg = train_config.load(
            "configs/sft/tiny-cpu.yaml",
            [
                f"output_dir={out}",
                "max_steps=16",
                f"model.model_name_or_path={models['qwen2_vl']}",
                f"data.path={data}",
                "data.synthetic_walks=2",
                "model.param_dtype=bfloat16",
                "lora.r=8",
                f"lora.quantize_base={quantize}",
                "optim.learning_rate=2e-2",
                "mesh=fsdp=4,tensor=2",
                "checkpoint.save_steps=0",
                f"checkpoint.export_hf={quantize == 'nf4'}",
            ],
        )
        stages.train(cfg)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        falls[name] = losses[0] - np.mean(losses[-4:])
    assert falls["bf16"] > 1.0 and falls["nf4"] > 1.0 and abs(falls["nf4"] - falls["bf16"]) < 0.15, falls
    exported, exported_cfg = load_pretrained(tmp_path / "nf4" / "hf")
    assert exported_cfg.param_dtype == "bfloat16" and exported_cfg.quantize_base == "none"
    assert json.loads((tmp_path / "nf4" / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
