"""Qwen3-VL against transformers' `Qwen3VLForConditionalGeneration` (fp32, eager) on a tiny random model
(tests/reference.py: norms randomised too, so a misplaced q/k norm shows).

Tolerance: max |stjax - torch| <= 1e-5 * max |torch logit| over real (non-padding) positions. Prompts are
laid out as Qwen3-VL's processor lays them out: every temporal patch of a video is its own vision block
after a timestamp. Position ids for transformers come from its own `get_rope_index`.
"""

import numpy as np
import pytest
import torch
from flax import nnx
from reference import hf_logits, tiny_config

from stjax.models.loading import load_pretrained

TOLERANCE = 1e-5
CASES = {
    "text_only": [[12]],
    "one_image": [[4, ("image", 1, 6, 8), 5]],
    # grids larger and smaller than the 4 x 4 position table, square and not
    "one_video": [[3, ("video", 2, 8, 8), 6]],
    "image_and_video": [[2, ("image", 1, 4, 6), 3, ("video", 3, 6, 4), 4]],
    "left_padded_mixed": [[3, ("video", 2, 4, 4), 9], [5, ("image", 1, 4, 8), 2], [7]],
    "big_grid": [[2, ("image", 1, 10, 14), 3]],
}


def make_prompt(cfg, rng, parts) -> list[int]:
    """Token ids: text runs of random ids; an image as one vision block; a video as one block per
    temporal patch, each after a 3-token stand-in for its `<t seconds>` timestamp (the processor's layout)."""
    hi = min(cfg.image_token_id, cfg.bos_token_id) - 1
    ids: list[int] = []
    for part in parts:
        if isinstance(part, int):
            ids += rng.integers(0, hi, part).tolist()
            continue
        kind, t, h, w = part
        block = lambda pad, n: [cfg.vision_start_token_id] + [pad] * n + [cfg.vision_end_token_id]
        if kind == "image":
            ids += block(cfg.image_token_id, t * h * w // 4)
        else:
            for _ in range(t):
                ids += rng.integers(0, hi, 3).tolist() + block(cfg.video_token_id, h * w // 4)
    return ids


def make_batch(cfg, prompts, seed=0) -> dict:
    """A left-padded batch with random pixels, in transformers' argument names (no position ids)."""
    rng = np.random.default_rng(seed)
    rows = [make_prompt(cfg, rng, p) for p in prompts]
    length = max(len(r) for r in rows)
    input_ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int64)
    for b, r in enumerate(rows):
        input_ids[b, length - len(r) :] = r
        mask[b, length - len(r) :] = 1
    blocks = [part for p in prompts for part in p if not isinstance(part, int)]
    batch = {"input_ids": input_ids, "attention_mask": mask}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        grids = [b[1:] for b in blocks if b[0] == kind]
        if grids:
            batch[key] = rng.normal(size=(sum(np.prod(g) for g in grids), cfg.vision.patch_dim)).astype(np.float32)
            batch[f"{kind}_grid_thw"] = np.asarray(grids, np.int64)
    return batch


def hf_positions(ref_model, cfg, batch) -> np.ndarray:
    """transformers' own `get_rope_index` (3, B, L)."""
    ids = torch.from_numpy(batch["input_ids"])
    kinds = (ids == cfg.image_token_id).int() + 2 * (ids == cfg.video_token_id).int()
    grid = lambda k: None if k not in batch else torch.from_numpy(batch[k])
    positions, _ = ref_model.model.get_rope_index(
        ids, kinds, grid("image_grid_thw"), grid("video_grid_thw"), torch.from_numpy(batch["attention_mask"])
    )
    return positions.numpy()


def relative_error(ours: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(ours - ref)[real].max() / np.abs(ref[real]).max())


@pytest.fixture(scope="module")
def models(hf_dirs):
    directory, ref = hf_dirs("qwen3_vl")
    return load_pretrained(directory)[0], ref


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(models, case):
    ours_model, ref_model = models
    cfg = ours_model.config
    batch = make_batch(cfg, CASES[case], seed=list(CASES).index(case))
    batch["position_ids"] = hf_positions(ref_model, cfg, batch)
    ref = hf_logits(ref_model, batch)
    ours = np.asarray(ours_model(**batch))
    assert ours.shape == ref.shape
    assert relative_error(ours, ref, batch["attention_mask"]) <= TOLERANCE


@pytest.mark.parametrize("case", ["image_and_video", "left_padded_mixed"])
def test_position_ids_equal_transformers_get_rope_index(models, case):
    """stjax's own positions (used when none are given) equal transformers' at the real positions."""
    ours_model, ref_model = models
    cfg = ours_model.config
    batch = make_batch(cfg, CASES[case])
    ours, _ = cfg.family.rope_index(
        batch["input_ids"],
        cfg.rope_spec(),
        batch.get("image_grid_thw"),
        batch.get("video_grid_thw"),
        None,
        batch["attention_mask"],
    )
    real = batch["attention_mask"].astype(bool)
    np.testing.assert_array_equal(ours[:, real], hf_positions(ref_model, cfg, batch)[:, real])
    assert (
        relative_error(
            np.asarray(ours_model(**batch)),  # positions made by stjax, against transformers' own
            hf_logits(ref_model, {**batch, "position_ids": hf_positions(ref_model, cfg, batch)}),
            batch["attention_mask"],
        )
        <= TOLERANCE
    )


def test_comparison_detects_deepstack_and_position_table_changes(models):
    """The tolerance catches a 1% change of one DeepStack merger's output or of the position table."""
    ours_model, ref_model = models
    cfg = ours_model.config
    batch = make_batch(cfg, CASES["one_video"], seed=1)
    batch["position_ids"] = hf_positions(ref_model, cfg, batch)
    ref = hf_logits(ref_model, batch)
    for change in ("deepstack", "pos_embed"):
        changed = nnx.clone(ours_model)
        if change == "deepstack":
            last = changed.visual.deepstack_merger.mlp_2
            last.kernel[...] = last.kernel[...].at[-1].multiply(1.01)  # the last merger only
        else:
            changed.visual.pos_embed[...] = changed.visual.pos_embed[...] * 1.01
        assert relative_error(np.asarray(changed(**batch)), ref, batch["attention_mask"]) > 10 * TOLERANCE, change


def test_round_trip_is_bit_exact_in_the_hub_layout(hf_dirs, tmp_path):
    """HF -> stjax -> HF (sharded, streaming) gives back every tensor under its own name, bit for bit; the
    export loads in transformers."""
    from stjax.convert import hf_to_stjax, stjax_to_hf
    from stjax.models.safetensors_io import SafetensorsReader

    src, ref_model = hf_dirs("qwen3_vl")
    hf_to_stjax(src, tmp_path / "stjax")
    stjax_to_hf(tmp_path / "stjax", tmp_path / "back", max_shard_bytes=200_000)
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()
    before, after = SafetensorsReader(src), SafetensorsReader(tmp_path / "back")
    assert sorted(before.tensors) == sorted(after.tensors)  # model.language_model.*, model.visual.*, lm_head
    for name in before.tensors:
        a, b = before.read(name), after.read(name)
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), name
    reloaded = type(ref_model).from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    cfg = load_pretrained(tmp_path / "stjax")[1]
    batch = make_batch(cfg, CASES["image_and_video"])
    batch["position_ids"] = hf_positions(ref_model, cfg, batch)
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(ref_model, batch))


def test_the_hub_id_loads_from_the_cache_offline(hf_dirs, tmp_path, monkeypatch):
    """`Qwen/Qwen3-VL-8B-Instruct` resolves through the Hugging Face cache (HF_HUB_OFFLINE: nothing is
    fetched); here the cache holds the tiny model under that id."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--Qwen--Qwen3-VL-8B-Instruct"
    shutil.copytree(hf_dirs("qwen3_vl")[0], repo / "snapshots" / ("c" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, cfg = load_pretrained("Qwen/Qwen3-VL-8B-Instruct")
    assert cfg.model_type == "qwen3_vl" and cfg.vision.deepstack_visual_indexes == (0, 2)


def test_greedy_tokens_equal_transformers_generate_on_left_padded_mixed_rows(models):
    """The jitted sampler (prefill with DeepStack into a KV cache, then one token at a time) against
    transformers' own `generate` loop, greedy, on image, video and text-only rows of one left-padded batch."""
    assert_greedy_equals_transformers(*models, seed=3)


def assert_greedy_equals_transformers(model, ref, seed: int) -> None:
    """24 greedy tokens of stjax's sampler equal transformers' `generate` on the left-padded mixed rows."""
    import jax

    from stjax.models.inputs import prepare_inputs
    from stjax.sampling.sampler import SamplingConfig, generate

    cfg = model.config
    batch = make_batch(cfg, CASES["left_padded_mixed"], seed=seed)
    ids = batch["input_ids"]
    kwargs = {k: torch.from_numpy(v) for k, v in batch.items()}
    kwargs["mm_token_type_ids"] = torch.from_numpy(
        np.where(ids == cfg.image_token_id, 1, np.where(ids == cfg.video_token_id, 2, 0))
    )
    with torch.no_grad():
        expected = ref.generate(
            **kwargs, max_new_tokens=24, do_sample=False, eos_token_id=cfg.eos_token_id, pad_token_id=0
        ).numpy()[:, ids.shape[1] :]
    out = generate(
        model,
        prepare_inputs(cfg, **batch),
        ids.shape[1],
        jax.random.key(0),
        SamplingConfig(max_new_tokens=24, eos_ids=(cfg.eos_token_id,)),
    )
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    for row in range(len(ids)):
        n = lengths[row]
        np.testing.assert_array_equal(tokens[row, :n], expected[row, :n])
        assert n == 24 or expected[row, n - 1] == cfg.eos_token_id
    assert (lengths == 24).any()


def test_a_video_not_in_qwen3_layout_is_one_line_saying_so():
    """A video written as one block of pads (Qwen2-VL's layout) cannot be positioned by Qwen3-VL's rule."""
    from stjax.models.inputs import prepare_inputs

    cfg = tiny_config("qwen3_vl")
    ids = np.array([[1, cfg.vision_start_token_id] + [cfg.video_token_id] * 8 + [cfg.vision_end_token_id, 2]])
    with pytest.raises(
        ValueError,
        match="a run of 8 video pad tokens where its grid gives 4: Qwen3-VL writes each "
        "temporal patch of a video as its own vision block",
    ):
        prepare_inputs(
            cfg,
            ids,
            pixel_values_videos=np.zeros((32, cfg.vision.patch_dim), np.float32),
            video_grid_thw=np.array([[2, 4, 4]]),
        )
