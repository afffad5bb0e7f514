"""Qwen3-VL on configs the tiny preset does not cover, against transformers' `Qwen3VLForConditionalGeneration`:
each variant's config.json (hub style: fields left out take their defaults) is read by transformers
(`Qwen3VLConfig.from_dict`), its random model (norms and biases randomised) saved by transformers beside that
config.json, and loaded by stjax from that directory.

Checked per variant: logits on one left-padded batch (a text-only row, a video row, an image row, a row with an
image and a video, a row with two videos) to 1e-5 of the largest |logit| over real positions (fp32); HF -> stjax
-> HF bit-exact under transformers' own tensor names (a tied model writes no lm_head, as transformers' checkpoint
has none), and the export's config.json makes transformers build the same model (logits bit for bit). The greedy
sampler against transformers' `generate` on one variant.
"""

import copy
import json

import numpy as np
import pytest
from reference import hf_logits, hf_model_from_dict
from test_qwen3_vl import assert_greedy_equals_transformers, hf_positions, make_batch, relative_error

from stjax.models.config import PRESETS_DIR, ConfigError, QwenVLConfig
from stjax.models.loading import load_pretrained
from stjax.models.safetensors_io import SafetensorsReader

TOLERANCE = 1e-5
BATCH = [
    [6],
    [3, ("video", 1, 8, 8), 2, ("video", 2, 4, 4), 5],
    [5, ("image", 1, 4, 8), 2],
    [2, ("image", 1, 4, 6), 3, ("video", 3, 6, 4), 1],
]


def mrope(*section: int) -> dict:
    return {"rope_scaling": {"rope_type": "default", "mrope_section": list(section), "mrope_interleaved": True}}


# The tiny preset: 3 decoder layers, 4 heads of 24 over 2 kv heads (hidden 64), mrope (6, 3, 3), untied; a 4-block
# vision tower of 2 heads, a 4 x 4 position table, DeepStack blocks (0, 2).
VARIANTS = {
    # the 2B / 4B models tie the output head; one kv head; head_dim = hidden / heads; one DeepStack block
    "tied_mqa_one_deepstack": {
        "top": {"tie_word_embeddings": True},
        "text": {"tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 16, **mrope(4, 2, 2)},
        "vision": {"deepstack_visual_indexes": [3]},
    },
    # transformers ties by the top-level field only: text_config's alone leaves lm_head its own tensor
    "text_config_tie_only": {"top": {"tie_word_embeddings": None}, "text": {"tie_word_embeddings": True}},
    # more DeepStack blocks than decoder layers (the 4th feature has no layer); vision heads of 8
    "deepstack_beyond_the_decoder": {"vision": {"num_heads": 4, "deepstack_visual_indexes": [0, 1, 2, 3]}},
    # listed out of block order, or a block twice: decoder layer k takes the k-th block in block order, through the
    # merger at that block's first index
    "deepstack_unsorted_repeated": {"vision": {"deepstack_visual_indexes": [3, 1, 3]}},
    "deepstack_sorted_repeated": {"vision": {"deepstack_visual_indexes": [1, 3, 3]}},
    "no_deepstack": {"vision": {"deepstack_visual_indexes": []}},
    # plain multi-head attention, wider heads, q/k/v and o biases, another rope theta and norm epsilon
    "mha_biases": {
        "text": {
            "num_key_value_heads": 4,
            "head_dim": 32,
            "attention_bias": True,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-3,
            **mrope(8, 4, 4),
        }
    },
    # a deeper, single-head tower, a 6 x 6 position table; sections with the T stream widest
    "deep_single_head_tower": {
        "text": mrope(8, 2, 2),
        "vision": {"depth": 5, "num_heads": 1, "num_position_embeddings": 36, "deepstack_visual_indexes": [1, 3, 4]},
    },
}


def variant_config(top: dict | None = None, text: dict | None = None, vision: dict | None = None) -> dict:
    """The tiny preset's config.json with these fields changed (None: the field removed)."""
    d = json.loads((PRESETS_DIR / "tiny-qwen3-vl.json").read_text())
    for part, changes in ((d, top), (d["text_config"], text), (d["vision_config"], vision)):
        for key, value in (changes or {}).items():
            part.pop(key) if value is None else part.__setitem__(key, value)
    return d


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """variant -> (transformers' saved directory, the transformers model), made once each."""
    cache = {}

    def get(name: str):
        if name not in cache:
            config = variant_config(**VARIANTS[name])
            ref = hf_model_from_dict(config, seed=1)
            path = tmp_path_factory.mktemp(f"qwen3-{name}")
            ref.save_pretrained(path)
            (path / "config.json").write_text(json.dumps(config))  # as the hub ships it, not as transformers writes it
            cache[name] = (path, ref)
        return cache[name]

    return get


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers(saved, name):
    path, ref = saved(name)
    model, cfg = load_pretrained(path)
    assert cfg.text.tie_word_embeddings == ref.config.tie_word_embeddings
    batch = make_batch(cfg, BATCH, seed=2)
    batch["position_ids"] = hf_positions(ref, cfg, batch)
    assert relative_error(np.asarray(model(**batch)), hf_logits(ref, batch), batch["attention_mask"]) <= TOLERANCE


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip_is_bit_exact_under_transformers_names(saved, name, tmp_path):
    from stjax.convert import hf_to_stjax, stjax_to_hf

    src, ref = saved(name)
    hf_to_stjax(src, tmp_path / "stjax")
    stjax_to_hf(tmp_path / "stjax", tmp_path / "back")
    before, after = SafetensorsReader(src), SafetensorsReader(tmp_path / "back")
    assert sorted(after.tensors) == sorted(before.tensors)
    assert ("lm_head.weight" in after.tensors) == (not ref.config.tie_word_embeddings)
    for tensor in before.tensors:
        a, b = before.read(tensor), after.read(tensor)
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes()), tensor
    written = json.loads((tmp_path / "back" / "config.json").read_text())
    assert QwenVLConfig.from_hf_dict(written) == QwenVLConfig.from_file(src)
    # transformers builds the same model from the export: the same logits, bit for bit
    reloaded = type(ref).from_pretrained(tmp_path / "back", attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings == ref.config.tie_word_embeddings
    cfg = QwenVLConfig.from_hf_dict(written)
    batch = make_batch(cfg, BATCH[1:2], seed=3)
    batch["position_ids"] = hf_positions(ref, cfg, batch)
    np.testing.assert_array_equal(hf_logits(reloaded, batch), hf_logits(ref, batch))


def test_logits_match_transformers_on_a_mesh(saved):
    """A tensor-parallel mesh of 4 over one kv head and 4 query heads (the rules leave what does not divide
    replicated), fsdp over 2."""
    import jax

    from stjax.sharding import make_mesh

    path, ref = saved("tied_mqa_one_deepstack")
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    model, cfg = load_pretrained(path, mesh=mesh)
    batch = make_batch(cfg, BATCH, seed=2)
    batch["position_ids"] = hf_positions(ref, cfg, batch)
    with jax.set_mesh(mesh):
        ours = np.asarray(model(**batch))
    assert relative_error(ours, hf_logits(ref, batch), batch["attention_mask"]) <= TOLERANCE


def test_greedy_tokens_equal_transformers_generate_on_a_tied_variant(saved):
    path, ref = saved("tied_mqa_one_deepstack")
    assert_greedy_equals_transformers(load_pretrained(path)[0], ref, seed=5)


def test_a_rope_scaling_other_than_the_default_is_one_line_saying_so():
    d = variant_config(text={"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "mrope_section": [6, 3, 3]}})
    with pytest.raises(ConfigError, match="rope_type 'yarn': Qwen3-VL is supported with its default rotary"):
        QwenVLConfig.from_hf_dict(copy.deepcopy(d))
