"""LoRA: adapters start as the base, training moves only them, merging gives W + scale * B @ A."""

import numpy as np
import pytest
from flax import nnx, traverse_util
from reference import tiny_config
from test_train_step import sft_batch, stack

from stjax.models.inputs import prepare_inputs
from stjax.models.layers import LoRAParam
from stjax.models.qwen_vl import compiled_forward, init_model
from stjax.models.weights import hf_tensors
from stjax.train.lora import merge_lora, with_lora
from stjax.train.step import Batch, OptimConfig, compiled_train_step, init_state, split_trainable


def flat(model, kind=nnx.Param):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, kind))).items()}


def test_lora_trains_only_the_adapters_and_merges_into_the_base():
    cfg = tiny_config("qwen2_5_vl")
    base = init_model(cfg, seed=0)
    lora = with_lora(base, rank=4, alpha=8.0)
    adapters = flat(lora, LoRAParam)
    assert {p[-2:] for p in adapters} == {
        (name, part) for name in ("q_proj", "k_proj", "v_proj", "o_proj") for part in ("lora_a", "lora_b")
    }
    prompt, _, inputs, loss_mask = sft_batch(cfg)
    model_inputs = prepare_inputs(cfg, **prompt)
    np.testing.assert_array_equal(
        np.asarray(compiled_forward(lora, model_inputs)), np.asarray(compiled_forward(base, model_inputs))
    )  # lora_b starts at 0

    optim = OptimConfig(learning_rate=1e-2, total_steps=3, warmup_ratio=0.0)
    graphdef, params, frozen = split_trainable(lora)
    state = init_state(params, optim)
    batch = Batch(inputs=stack(inputs), loss_mask=stack(loss_mask))
    for _ in range(3):
        state, metrics = compiled_train_step(graphdef, optim, state, frozen, batch)
    trained = nnx.merge(graphdef, state.params, frozen)
    before, after = flat(lora), flat(trained)
    for path, value in after.items():
        if path[-1] in ("lora_a", "lora_b"):
            assert not np.array_equal(value, before[path]), path  # the adapters moved
        else:
            np.testing.assert_array_equal(value, before[path])  # the base did not

    merged = merge_lora(trained)
    assert merged.config.lora_rank == 0 and not flat(merged, LoRAParam)
    exported = dict(hf_tensors(merged.config, flat(merged)))
    original = dict(hf_tensors(cfg, flat(base)))
    scale = 8.0 / 4
    for layer in range(cfg.text.num_layers):
        for name in ("q_proj", "v_proj", "o_proj"):
            a = after[("model", "layers", name, "lora_a")][layer].T  # HF layout A: (r, in)
            b = after[("model", "layers", name, "lora_b")][layer].T  # HF layout B: (out, r)
            key = f"model.layers.{layer}.self_attn.{name}.weight"
            np.testing.assert_allclose(exported[key], original[key] + scale * b @ a, rtol=1e-5, atol=1e-7)
    untouched = "model.layers.0.mlp.up_proj.weight"
    np.testing.assert_array_equal(exported[untouched], original[untouched])
    # and the merged model computes what the adapted one computes
    ours = np.asarray(compiled_forward(trained, model_inputs))
    np.testing.assert_allclose(np.asarray(compiled_forward(merged, model_inputs)), ours, atol=1e-5 * np.abs(ours).max())


@pytest.mark.parametrize("p", [0.1, 0.25])  # 0.1: every shipped LoRA config
def test_lora_dropout_drops_the_adapter_input_only_and_only_in_training(p):
    """With A = B = I and scale 1 the adapter path returns dropout(x): each entry 0 or x / (1 - p),
    a fraction p of them 0 (binomial, 4 sigma); the base path and calls without a key are untouched."""
    import jax

    from stjax.models.layers import Linear

    d, n = 16, 4000
    layer = Linear(
        d,
        d,
        ("embed", "embed"),
        bias=False,
        std=0.1,
        param_dtype="float32",
        compute_dtype="float32",
        rngs=nnx.Rngs(0),
        lora_rank=d,
        lora_alpha=float(d),
        lora_dropout=p,
    )
    layer.lora_a[...] = np.eye(d, dtype=np.float32)
    layer.lora_b[...] = np.eye(d, dtype=np.float32)
    x = np.random.default_rng(0).uniform(1.0, 2.0, (n, d)).astype(np.float32)
    base = x @ np.asarray(layer.kernel[...])
    np.testing.assert_allclose(np.asarray(layer(x)) - base, x, rtol=1e-5)  # no key: no dropout
    adapter = np.asarray(layer(x, jax.random.key(1))) - base
    dropped = np.abs(adapter) < 1e-3
    np.testing.assert_allclose(adapter[~dropped], x[~dropped] / (1 - p), rtol=1e-4)
    sigma = np.sqrt(p * (1 - p) / dropped.size)
    assert abs(dropped.mean() - p) < 4 * sigma, dropped.mean()
    other = np.abs(np.asarray(layer(x, jax.random.key(2))) - base) < 1e-3
    assert (other != dropped).any()  # a new key draws a new mask


def test_lora_dropout_in_the_compiled_step_draws_a_fresh_mask_per_layer_micro_batch_and_step(monkeypatch):
    """Every mask the compiled step draws (recorded from inside the jitted scan by a callback on
    `jax.random.bernoulli`): one per adapted projection, layer, micro-batch and step, no two alike,
    a fraction 0.9 of the entries kept (binomial, 5 sigma), and the same masks again from the same
    seed (another seed: other masks)."""
    import jax

    from stjax.train.step import train_step

    p, steps, accum = 0.1, 2, 2
    cfg = tiny_config("qwen2_vl")
    lora = with_lora(init_model(cfg, seed=0), rank=4, alpha=8.0, dropout=p)
    _, _, inputs, loss_mask = sft_batch(cfg)
    batch = Batch(inputs=stack(*[inputs] * accum), loss_mask=stack(*[loss_mask] * accum))  # the same rows twice
    optim = OptimConfig(learning_rate=1e-3, total_steps=steps, warmup_ratio=0.0)
    graphdef, params, frozen = split_trainable(lora)

    drawn = []
    bernoulli = jax.random.bernoulli

    def recorded(key, p=0.5, shape=None, **kw):
        mask = bernoulli(key, p, shape, **kw)
        jax.debug.callback(lambda m: drawn.append(np.asarray(m)), mask)
        return mask

    step = jax.jit(train_step, static_argnums=(0, 1), static_argnames=("average", "loss_chunk"))  # traced anew

    def run(seed: int) -> list[np.ndarray]:
        drawn.clear()
        state = init_state(params, optim, seed=seed)
        for _ in range(steps):
            state, _ = step(graphdef, optim, state, frozen, batch)
        jax.effects_barrier()
        return list(drawn)

    monkeypatch.setattr(jax.random, "bernoulli", recorded)
    masks = run(seed=0)
    assert len(masks) == 4 * cfg.text.num_layers * accum * steps  # q, k, v, o in every layer
    flat_masks = [m.tobytes() for m in masks]
    assert len(set(flat_masks)) == len(masks)  # no mask repeats: per projection, layer, micro-batch, step
    kept = np.concatenate([m.ravel() for m in masks])
    assert abs(kept.mean() - (1 - p)) < 5 * np.sqrt(p * (1 - p) / kept.size), kept.mean()
    again = run(seed=0)
    assert sorted(flat_masks) == sorted(m.tobytes() for m in again)  # reproducible from the seed
    other = run(seed=1)
    assert not set(flat_masks) & {m.tobytes() for m in other}
