"""Logits of the stjax model against transformers' PyTorch Qwen2-VL / Qwen2.5-VL (fp32, eager).

Tolerance: max |stjax - torch| <= 1e-4 * max |torch logit| over real (non-padding) positions.
Position ids are given to both models from the independent NumPy rule in reference.py.
"""

import numpy as np
import pytest
from flax import nnx
from reference import hf_logits, make_batch, tiny_config

from stjax.models.loading import load_pretrained

ARCHS = ["qwen2_vl", "qwen2_5_vl"]
CASES = {
    "text_only": [[12]],
    "one_image": [[4, ("image", 1, 6, 8), 5]],
    "one_video": [[3, ("video", 2, 8, 8), 6]],
    "image_and_video": [[2, ("image", 1, 4, 6), 3, ("video", 2, 6, 4), 4]],
    "padded_batch_of_two": [[3, ("video", 2, 4, 4), 9], [5, ("image", 1, 4, 8), 2]],
    # merged grid 5 x 7: not a multiple of the 4 x 4 window
    "video_grid_off_window": [[2, ("video", 2, 10, 14), 3]],
    # 5 sampled frames, padded to 6 by the processor: an odd temporal grid of 3
    "odd_frames": [[2, ("video", 3, 8, 12), 3]],
}
TOLERANCE = 1e-4


def relative_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours - ref)[real].max() / np.abs(ref[real]).max())


@pytest.fixture(scope="module")
def models(hf_dirs):
    return {arch: (load_pretrained(hf_dirs(arch)[0])[0], hf_dirs(arch)[1]) for arch in ARCHS}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(models, arch, case):
    ours_model, ref_model = models[arch]
    batch = make_batch(ours_model.config, CASES[case], seed=list(CASES).index(case))
    ref = hf_logits(ref_model, batch)
    ours = np.asarray(ours_model(**batch))
    assert ours.shape == ref.shape
    assert relative_error(ours, ref, batch["attention_mask"]) <= TOLERANCE


@pytest.mark.parametrize("arch", ARCHS)
def test_comparison_detects_swapped_patches_and_scaled_features(models, arch):
    """The tolerance is tight enough to catch a wrong patch order or a 1% feature scale."""
    ours_model, ref_model = models[arch]
    batch = make_batch(ours_model.config, CASES["one_video"], seed=1)
    ref = hf_logits(ref_model, batch)
    swapped = dict(batch)
    pixels = batch["pixel_values_videos"].copy()
    pixels[[0, 5]] = pixels[[5, 0]]  # two patches of the first frame
    swapped["pixel_values_videos"] = pixels
    assert relative_error(np.asarray(ours_model(**swapped)), ref, batch["attention_mask"]) > 10 * TOLERANCE

    scaled = nnx.clone(ours_model)
    merger = scaled.visual.merger.mlp_2
    merger.kernel[...] = merger.kernel[...] * 1.01  # every video feature scaled by 1.01
    merger.bias[...] = merger.bias[...] * 1.01
    assert relative_error(np.asarray(scaled(**batch)), ref, batch["attention_mask"]) > 10 * TOLERANCE


def test_tied_embeddings_match_transformers(tmp_path):
    """Qwen2.5-VL-3B ties lm_head to the embeddings: no lm_head tensor, logits from the table."""
    from reference import hf_model

    cfg = tiny_config("qwen2_5_vl")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "tie_word_embeddings": True}))
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    model, loaded = load_pretrained(tmp_path)
    assert loaded.text.tie_word_embeddings and model.lm_head is None
    batch = make_batch(cfg, CASES["one_video"])
    assert relative_error(np.asarray(model(**batch)), hf_logits(ref, batch), batch["attention_mask"]) <= TOLERANCE


BF16_CASES = ["text_only", "image_and_video", "padded_batch_of_two"]
BF16_RATIO = 1.5


@pytest.fixture(scope="module")
def bf16_references(hf_dirs):
    """{arch: (batches, transformers fp32 logits, transformers bf16 logits)} over real positions. The
    bf16 model is the saved fp32 one cast with .to(bfloat16) and the fp32 reference is that bf16 model
    widened back, so all three hold the same weights and the errors measured are the computation's
    alone (the weights' own rounding, common to both bf16 models, would otherwise dominate)."""
    import copy

    import torch

    out = {}
    for arch in ARCHS:
        ref16 = copy.deepcopy(hf_dirs(arch)[1]).to(torch.bfloat16)
        ref32 = copy.deepcopy(ref16).to(torch.float32)
        batches = [make_batch(tiny_config(arch), CASES[c], seed=list(CASES).index(c)) for c in BF16_CASES]
        real = [b["attention_mask"].astype(bool) for b in batches]
        out[arch] = (
            batches,
            [hf_logits(ref32, b)[r] for b, r in zip(batches, real)],
            [hf_logits(ref16, b)[r] for b, r in zip(batches, real)],
        )
    return out


@pytest.mark.parametrize("attention", ["auto", "xla", "dot_product"])  # auto: cpu_flash on CPU
@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_error_is_within_transformers_own_bf16_error(hf_dirs, bf16_references, arch, attention):
    """stjax with bf16 parameters and compute, against transformers in fp32 on the same weights, errs
    by at most 1.5x what transformers itself errs in bf16, in RMS and in the largest error over the
    real positions of several inputs (measured: 0.89-0.99x in RMS, 0.80-0.91x in the largest). A
    single extra bf16 rounding (RMSNorm statistics or the softmax in bf16) moves these by about 0.1
    only: `test_rms_norm_in_bf16_equals_transformers` pins that one."""
    batches, exact, ref16 = bf16_references[arch]
    ours16, _ = load_pretrained(hf_dirs(arch)[0], dtype="bfloat16", attention=attention)
    assert ours16.config.compute_dtype == "bfloat16"
    ours = np.concatenate(
        [(np.asarray(ours16(**b))[b["attention_mask"].astype(bool)] - e).ravel() for b, e in zip(batches, exact)]
    )
    theirs = np.concatenate([(r - e).ravel() for r, e in zip(ref16, exact)])
    rms = lambda e: float(np.sqrt(np.mean(e**2)))
    assert rms(theirs) > 0  # transformers' bf16 really differs from its fp32
    assert rms(ours) <= BF16_RATIO * rms(theirs), (rms(ours), rms(theirs))
    assert np.abs(ours).max() <= BF16_RATIO * np.abs(theirs).max(), (np.abs(ours).max(), np.abs(theirs).max())


def test_rms_norm_in_bf16_equals_transformers():
    """RMSNorm on bf16 activations against transformers' Qwen2RMSNorm in bf16 (statistics in fp32,
    cast back before the weight): equal bit for bit but for the odd last-bit tie of two fp32 rsqrt
    implementations (at most 0.1% of the entries, one bf16 ulp). Statistics taken in bf16 change
    28% of the entries."""
    import jax.numpy as jnp
    import torch
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from stjax.models.layers import RMSNorm

    rng = np.random.default_rng(0)
    dim = 1024
    x = (rng.normal(size=(256, dim)) * rng.uniform(0.1, 30, size=(256, 1))).astype(np.float32)
    weight = rng.normal(1.0, 0.2, size=dim).astype(np.float32)
    theirs_norm = Qwen2RMSNorm(dim, eps=1e-6).to(torch.bfloat16)
    theirs_norm.weight.data = torch.from_numpy(weight).to(torch.bfloat16)
    with torch.no_grad():
        theirs = theirs_norm(torch.from_numpy(x).to(torch.bfloat16)).float().numpy()
    ours_norm = RMSNorm(dim, "embed", eps=1e-6, param_dtype=jnp.bfloat16, compute_dtype=jnp.bfloat16)
    ours_norm.scale[...] = jnp.asarray(weight, jnp.bfloat16)
    ours = np.asarray(ours_norm(jnp.asarray(x, jnp.bfloat16)), np.float32)
    differ = ours != theirs
    assert differ.mean() <= 1e-3, differ.mean()
    ulp = np.abs(theirs) * 2.0**-7
    assert (np.abs(ours - theirs)[differ] <= ulp[differ]).all()
