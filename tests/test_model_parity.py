"""Logits of the stjax model against transformers' PyTorch Qwen2-VL / Qwen2.5-VL (fp32, eager).

Tolerance: max |stjax - torch| <= 1e-4 * max |torch logit| over real (non-padding) positions.
Position ids are given to both models from the independent NumPy rule in reference.py.
"""

import numpy as np
import pytest
from flax import nnx

from reference import hf_logits, make_batch
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
    from reference import hf_model, tiny_config

    cfg = tiny_config("qwen2_5_vl")
    cfg = cfg.replace(text=cfg.text.__class__(**{**cfg.text.__dict__, "tie_word_embeddings": True}))
    ref = hf_model(cfg)
    ref.save_pretrained(tmp_path)
    model, loaded = load_pretrained(tmp_path)
    assert loaded.text.tie_word_embeddings and model.lm_head is None
    batch = make_batch(cfg, CASES["one_video"])
    assert relative_error(np.asarray(model(**batch)), hf_logits(ref, batch), batch["attention_mask"]) <= TOLERANCE
