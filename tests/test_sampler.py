"""The jitted sampler against transformers' `generate` and against full forwards of its own output."""

import jax
import numpy as np
import pytest
import torch
from reference import make_batch, rope_index

from stjax.models.inputs import prepare_inputs
from stjax.models.loading import load_pretrained
from stjax.models.qwen_vl import compiled_forward
from stjax.sampling.sampler import SamplingConfig, generate, sampling_logits

ARCHS = ["qwen2_vl", "qwen2_5_vl"]
# Videos whose time steps stay within their spatial size, at 4 fps (Qwen2.5-VL time step 1): the
# original M-RoPE rule and transformers 5.x's agree on these, so generate() is a fair reference.
PROMPTS = [[3, ("video", 2, 8, 8), 5], [2, ("video", 2, 4, 8), 9], [6], [1, ("video", 2, 8, 4), 2]]


@pytest.fixture(scope="module")
def models(hf_dirs):
    return {arch: (load_pretrained(hf_dirs(arch)[0])[0], hf_dirs(arch)[1]) for arch in ARCHS}


def hf_generate(model, cfg, batch, new_tokens: int) -> np.ndarray:
    ids = batch["input_ids"]
    kwargs = {k: torch.from_numpy(v) for k, v in batch.items() if k not in ("position_ids", "second_per_grid_ts")}
    kwargs["mm_token_type_ids"] = torch.from_numpy(
        np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
    )
    if cfg.model_type == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.from_numpy(batch["second_per_grid_ts"])
    with torch.no_grad():
        out = model.generate(
            **kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=0
        )
    return out.numpy()[:, ids.shape[1] :]


def run(model, batch, cfg: SamplingConfig, seed: int = 0):
    inputs = prepare_inputs(model.config, **batch)
    return generate(model, inputs, batch["input_ids"].shape[1], jax.random.key(seed), cfg)


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["batch1", "left_padded_batch4"])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_equal_transformers_generate(models, arch, prompts):
    model, ref = models[arch]
    batch = make_batch(model.config, prompts, fps=4.0)
    out = run(model, batch, SamplingConfig(max_new_tokens=32, eos_ids=(model.config.eos_token_id,)))
    expected = hf_generate(ref, model.config, batch, 32)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(len(prompts)):
        n = lengths[row]
        np.testing.assert_array_equal(tokens[row, :n], expected[row, :n])
        # after its end a row is padding, and it ended exactly where generate() stopped
        assert n == 32 or expected[row, n - 1] == model.config.eos_token_id
    assert (lengths == 32).any()


def completion_logits(model, batch, tokens: np.ndarray) -> np.ndarray:
    """(B, T, V) logits predicting each completion token, from one forward over prompt + completion."""
    cfg = model.config
    prompt_len = batch["input_ids"].shape[1]
    ids = np.concatenate([batch["input_ids"], tokens], axis=1)
    mask = np.concatenate([batch["attention_mask"], np.ones_like(tokens)], axis=1)
    full = dict(batch, input_ids=ids, attention_mask=mask)
    full["position_ids"], _ = rope_index(
        ids, mask, batch.get("image_grid_thw"), batch.get("video_grid_thw"), batch.get("second_per_grid_ts"), cfg
    )
    logits = np.asarray(compiled_forward(model, prepare_inputs(cfg, **full)))[:, : ids.shape[1]]
    return logits[:, prompt_len - 1 : -1]


def full_forward_logp(model, batch, tokens: np.ndarray, temperature: float = 1.0, suppress=()) -> np.ndarray:
    """log_softmax(logits / T) of each generated token from one forward over prompt + completion,
    with the `suppress` tokens removed from the distribution."""
    logits = completion_logits(model, batch, tokens) / temperature
    logits[..., list(suppress)] = -np.inf
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    return np.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_log_probs_equal_a_full_forward_over_the_samples(models, arch):
    model, _ = models[arch]
    batch = make_batch(model.config, PROMPTS[:2], fps=4.0)
    vision = (model.config.image_token_id, model.config.video_token_id)  # a sampled pad would need pixels
    cfg = SamplingConfig(max_new_tokens=12, temperature=0.7, num_samples=2, suppress_ids=vision)
    out = run(model, batch, cfg, seed=3)
    tokens = np.asarray(out.tokens)
    assert (np.asarray(out.lengths) == 12).all()  # no EOS configured
    repeated = {
        k: (np.repeat(v, 2, axis=1) if k == "position_ids" else np.repeat(v, 2, axis=0))
        for k, v in batch.items()
        if k in ("input_ids", "attention_mask", "position_ids")
    }
    full = dict(batch, **repeated)
    full["video_grid_thw"] = np.repeat(batch["video_grid_thw"], 2, axis=0)
    full["second_per_grid_ts"] = np.repeat(batch["second_per_grid_ts"], 2, axis=0)
    full["pixel_values_videos"] = np.concatenate(
        [
            p
            for p in np.split(batch["pixel_values_videos"], np.cumsum(batch["video_grid_thw"].prod(1))[:-1])
            for _ in (0, 1)
        ]
    )
    np.testing.assert_allclose(np.asarray(out.logp_model), full_forward_logp(model, full, tokens), atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(out.logp_sampling), full_forward_logp(model, full, tokens, 0.7, vision), atol=1e-4
    )


def first_step_logits(model, batch) -> np.ndarray:
    logits = np.asarray(compiled_forward(model, prepare_inputs(model.config, **batch)))
    return logits[0, batch["input_ids"].shape[1] - 1]


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty), so a correct sampler fails 1 run in 1000."""
    return df * (1 - 2 / (9 * df) + z * np.sqrt(2 / (9 * df))) ** 3


def test_samples_follow_softmax_of_logits_over_temperature(models):
    model, _ = models["qwen2_vl"]
    batch = make_batch(model.config, PROMPTS[:1], fps=4.0)
    temperature, draws = 0.5, 4000
    out = run(model, batch, SamplingConfig(max_new_tokens=1, temperature=temperature, num_samples=draws), seed=1)
    counts = np.bincount(np.asarray(out.tokens)[:, 0], minlength=model.config.text.vocab_size)
    logits = first_step_logits(model, batch) / temperature
    expected = np.exp(logits - logits.max())
    expected = expected / expected.sum() * draws
    big = expected >= 5  # pool the rare tokens into one bin
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(expected[big], expected[~big].sum())
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < chi_square_critical(len(observed) - 1)
    # and a wrong temperature is rejected by the same test
    wrong = np.exp(logits * temperature - (logits * temperature).max())
    wrong = np.append((wrong / wrong.sum() * draws)[big], (wrong / wrong.sum() * draws)[~big].sum())
    assert float(((observed - wrong) ** 2 / wrong).sum()) > chi_square_critical(len(observed) - 1)


def test_the_second_token_follows_its_own_distribution_given_the_first(models):
    """Each token is drawn with its own key: among 3000 two-token samples, those whose first token is
    the most frequent one have second tokens that follow softmax(logits / T) of prompt + that token
    (chi-square at the 0.1% level; a key reused for both tokens ties the second draw to the first)."""
    model, _ = models["qwen2_vl"]
    batch = make_batch(model.config, PROMPTS[:1], fps=4.0)
    temperature, draws = 0.5, 3000
    out = run(model, batch, SamplingConfig(max_new_tokens=2, temperature=temperature, num_samples=draws), seed=2)
    tokens = np.asarray(out.tokens)
    first = np.bincount(tokens[:, 0]).argmax()
    second = tokens[tokens[:, 0] == first, 1]
    assert len(second) > 100
    logits = completion_logits(model, batch, np.array([[first, 0]]))[0, 1] / temperature
    expected = np.exp(logits - logits.max())
    expected = expected / expected.sum() * len(second)
    counts = np.bincount(second, minlength=len(expected))
    big = expected >= 5
    observed, expected = np.append(counts[big], counts[~big].sum()), np.append(expected[big], expected[~big].sum())
    assert big.sum() >= 3
    assert float(((observed - expected) ** 2 / expected).sum()) < chi_square_critical(len(observed) - 1)


def test_top_k_and_top_p_stay_inside_their_sets(models):
    model, _ = models["qwen2_5_vl"]
    batch = make_batch(model.config, PROMPTS[:1], fps=4.0)
    logits = first_step_logits(model, batch)
    order = np.argsort(-logits)
    out = run(model, batch, SamplingConfig(max_new_tokens=1, temperature=1.0, top_k=5, num_samples=500), seed=2)
    drawn = set(np.asarray(out.tokens)[:, 0].tolist())
    assert drawn <= set(order[:5].tolist()) and len(drawn) > 1

    probs = np.exp(logits - logits.max())
    probs = probs[order] / probs.sum()
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs), 0.3)) + 1].tolist())
    out = run(model, batch, SamplingConfig(max_new_tokens=1, temperature=1.0, top_p=0.3, num_samples=500), seed=4)
    drawn = set(np.asarray(out.tokens)[:, 0].tolist())
    assert drawn <= nucleus and len(nucleus) > 1 and drawn == nucleus
    # the same cut, computed by the library on the logits, keeps exactly the nucleus
    kept = np.isfinite(
        np.asarray(sampling_logits(jax.numpy.asarray(logits[None]), SamplingConfig(temperature=1.0, top_p=0.3)))
    )[0]
    assert set(np.flatnonzero(kept).tolist()) == nucleus


def test_samples_per_prompt_share_one_prefill_and_continue_their_prompt(models):
    model, _ = models["qwen2_vl"]
    batch = make_batch(model.config, PROMPTS[:2], fps=4.0)
    single = run(model, batch, SamplingConfig(max_new_tokens=8))
    triple = run(model, batch, SamplingConfig(max_new_tokens=8, num_samples=3))
    # greedy: the 3 samples of each prompt equal the single sample, prompt by prompt
    np.testing.assert_array_equal(np.asarray(triple.tokens), np.repeat(np.asarray(single.tokens), 3, axis=0))


def test_the_prefill_runs_once_whatever_the_number_of_samples(models):
    """Count the vision tower's patch embedding (the only product with the 1176-wide patches) in
    the compiled program, and its size: one prefill over the prompts' patches (not n times as
    many), then the cache is broadcast to the samples."""
    from flax import nnx

    from stjax.sampling.sampler import sample

    model, _ = models["qwen2_vl"]
    batch = make_batch(model.config, PROMPTS[:2], fps=4.0)
    inputs = prepare_inputs(model.config, **batch)
    graphdef, state = nnx.split(model)
    patch_dim = model.config.vision.patch_dim
    rows = inputs.vision.patches.shape[0]
    for n in (1, 4):
        hlo = sample.lower(
            graphdef,
            SamplingConfig(max_new_tokens=4, num_samples=n),
            state,
            inputs,
            jax.numpy.int32(0),
            jax.numpy.zeros((2,), jax.numpy.int32),
            jax.random.key(0),
        ).as_text()
        dots = [line for line in hlo.splitlines() if "dot_general" in line and f"x{patch_dim}x" in line]
        assert len(dots) == 1 and f"<{rows}x{patch_dim}x" in dots[0], dots


def test_sharded_sampling_gives_the_same_tokens(hf_dirs):
    from stjax import sharding

    path = hf_dirs("qwen2_5_vl")[0]
    single, cfg = load_pretrained(path)
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    sharded, _ = load_pretrained(path, mesh=mesh)
    batch = make_batch(cfg, PROMPTS, fps=4.0)
    inputs = prepare_inputs(cfg, **batch)
    length = batch["input_ids"].shape[1]
    sampling = SamplingConfig(max_new_tokens=16, eos_ids=(cfg.eos_token_id,))
    ref = generate(single, inputs, length, jax.random.key(0), sampling)
    out = generate(sharded, sharding.shard_inputs(inputs, mesh), length, jax.random.key(0), sampling)
    assert sharded.model.layers.q_proj.kernel[...].addressable_shards[0].data.shape[1:] == (
        cfg.text.hidden_size // 4,
        cfg.text.hidden_size // 2,
    )
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_array_equal(np.asarray(out.lengths), np.asarray(ref.lengths))


def test_new_weights_reuse_the_compiled_program(models):
    from flax import nnx

    from stjax.sampling.sampler import sample

    model, _ = models["qwen2_5_vl"]
    batch = make_batch(model.config, PROMPTS[:1], fps=4.0)
    sampling = SamplingConfig(max_new_tokens=6)
    first = run(model, batch, sampling)
    compiled = sample._cache_size()
    changed = nnx.clone(model)
    changed.lm_head.kernel[...] = changed.lm_head.kernel[...] * -1.0  # other weights, same shapes
    second = run(changed, batch, sampling)
    assert sample._cache_size() == compiled
    assert not np.array_equal(np.asarray(first.tokens), np.asarray(second.tokens))


# Sampling under truncation, against an independent float64 NumPy statement of transformers'
# `generate` warpers: TemperatureLogitsWarper, then TopKLogitsWarper, then TopPLogitsWarper.
TRUNCATIONS = {
    "temperature_0.6_top_p_0.8": dict(temperature=0.6, top_p=0.8),
    "temperature_1.7_top_p_0.5": dict(temperature=1.7, top_p=0.5),
    "top_k_12_top_p_0.6": dict(temperature=1.0, top_k=12, top_p=0.6),
    "temperature_1.4_top_k_20_top_p_0.75": dict(temperature=1.4, top_k=20, top_p=0.75),
    "temperature_0.8_top_k_6": dict(temperature=0.8, top_k=6),
}


def truncated_logp(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """log-probabilities of the truncated, renormalised distribution (-inf outside it), float64:
    logits / T; drop what is below the k-th largest; sort ascending and drop the tokens whose
    cumulative probability is <= 1 - top_p, always keeping the most likely one."""
    x = logits.astype(np.float64) / temperature
    if top_k:
        x = np.where(x < np.sort(x, axis=-1)[..., -top_k, None], -np.inf, x)
    if top_p < 1.0:
        order = np.argsort(x, axis=-1)
        ascending = np.take_along_axis(x, order, axis=-1)
        p = np.exp(ascending - ascending.max(-1, keepdims=True))
        cumulative = np.cumsum(p / p.sum(-1, keepdims=True), axis=-1)
        drop = cumulative <= 1 - top_p
        drop[..., -1] = False  # min_tokens_to_keep = 1
        np.put_along_axis(x, order, np.where(drop, -np.inf, ascending), axis=-1)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))


def truncation_logits(seed: int = 0, rows: int = 3, vocab: int = 64) -> np.ndarray:
    """Distinct random logits (no ties at a cut) of a peaked and a flat-ish row and one between."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, vocab)) * np.array([[3.0], [1.0], [2.0]])[:rows]).astype(np.float32)


@pytest.mark.parametrize("case", TRUNCATIONS)
def test_the_numpy_reference_is_transformers_warpers(case):
    """The reference above equals transformers' own warpers, applied in generate()'s order."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    c = TRUNCATIONS[case]
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(c["temperature"])]
        + ([TopKLogitsWarper(c["top_k"])] if c.get("top_k") else [])
        + ([TopPLogitsWarper(c["top_p"])] if c.get("top_p", 1.0) < 1 else [])
    )
    logits = truncation_logits()
    theirs = torch.log_softmax(warpers(None, torch.from_numpy(logits).double()), dim=-1).numpy()
    ours = truncated_logp(logits, **c)
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))
    np.testing.assert_allclose(ours[np.isfinite(ours)], theirs[np.isfinite(theirs)], rtol=0, atol=1e-12)


@pytest.mark.parametrize("case", TRUNCATIONS)
def test_truncated_log_probs_equal_the_reference(case):
    """The kept set exactly, the renormalised log-probabilities to 1e-6 (float32 logits / T)."""
    c = TRUNCATIONS[case]
    logits = truncation_logits()
    expected = truncated_logp(logits, **c)
    ours = np.asarray(jax.nn.log_softmax(sampling_logits(jax.numpy.asarray(logits), SamplingConfig(**c)), axis=-1))
    kept = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(ours), kept)
    assert 1 < kept.sum(-1).min() and kept.sum(-1).max() < logits.shape[-1]  # every row really cut
    np.testing.assert_allclose(ours[kept], expected[kept], rtol=0, atol=1e-6)


def test_the_truncations_apply_in_generates_order():
    """Temperature before top-p and top-k before top-p keep other sets than the reverse orders,
    so the test above tells the orders apart."""
    logits = truncation_logits()
    t_then_p = np.isfinite(truncated_logp(logits, temperature=1.7, top_p=0.5))
    p_then_t = np.isfinite(truncated_logp(logits, temperature=1.0, top_p=0.5))
    assert (t_then_p != p_then_t).any()
    k_then_p = np.isfinite(truncated_logp(logits, temperature=1.0, top_k=12, top_p=0.6))
    p_then_k = np.isfinite(truncated_logp(logits, temperature=1.0, top_p=0.6)) & np.isfinite(
        truncated_logp(logits, temperature=1.0, top_k=12)
    )
    assert (k_then_p != p_then_k).any()


@pytest.mark.parametrize("case", TRUNCATIONS)
def test_choose_samples_the_truncated_distribution(case):
    """`choose` on many copies of each row (a key each): every token inside the kept set, `logp_sampling` equal to
    the reference's log-probability of the drawn token (1e-6), `logp_model` to the untruncated
    log_softmax, and a chi-square of the counts under the critical value of false-failure
    probability 1e-6 (fixed seed: deterministic). The same statistic rejects a 50% wrong temperature."""
    from stjax.sampling.sampler import choose

    c = TRUNCATIONS[case]
    logits = truncation_logits()
    draws = 20000
    expected = truncated_logp(logits, **c)
    tokens, logp_s, logp_m = jax.jit(choose, static_argnums=2)(
        jax.numpy.asarray(np.repeat(logits, draws, axis=0)),
        jax.random.split(jax.random.key(7), len(logits) * draws),
        SamplingConfig(**c),
    )
    tokens = np.asarray(tokens).reshape(len(logits), draws)
    rows = np.arange(len(logits))[:, None]
    np.testing.assert_allclose(np.asarray(logp_s).reshape(tokens.shape), expected[rows, tokens], rtol=0, atol=1e-6)
    model_logp = truncated_logp(logits, 1.0)
    np.testing.assert_allclose(np.asarray(logp_m).reshape(tokens.shape), model_logp[rows, tokens], rtol=0, atol=1e-6)
    for row in range(len(logits)):
        counts = np.bincount(tokens[row], minlength=logits.shape[-1])
        kept = np.isfinite(expected[row])
        assert counts[~kept].sum() == 0

        def chi2(logp, kept=kept, counts=counts):
            e = np.exp(logp[kept]) * draws
            return float(((counts[kept] - e) ** 2 / e).sum())

        critical = chi_square_critical(int(kept.sum()) - 1, z=4.753)  # upper 1e-6 point
        assert chi2(expected[row]) < critical
        hotter = np.where(kept, truncated_logp(logits[row], 1.5 * c["temperature"]), -np.inf)
        assert chi2(hotter - np.log(np.exp(hotter).sum())) > critical  # a 50% wrong temperature is seen
