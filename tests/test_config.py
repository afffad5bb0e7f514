"""config.json in both layouts: the hub's flat one and transformers 5.x's nested one."""

import json

import pytest
import transformers
from reference import tiny_config

from stjax.models.config import ConfigError, QwenVLConfig, presets


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
def test_flat_and_nested_layouts_read_the_same(tmp_path, arch):
    cfg = tiny_config(arch)
    flat = cfg.to_hf_dict()
    assert "text_config" not in flat and flat["rope_scaling"]["mrope_section"] == list(cfg.text.mrope_section)
    # transformers reads our flat file and writes its own (nested, in 5.x) layout back
    hf = transformers.AutoConfig.for_model(**flat)
    hf.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "text_config" in written  # the nested layout
    again = QwenVLConfig.from_file(tmp_path)
    assert (again.text, again.vision, again.video_token_id) == (cfg.text, cfg.vision, cfg.video_token_id)
    # and transformers loads what we write
    cfg.save(tmp_path / "ours")
    loaded = transformers.AutoConfig.from_pretrained(tmp_path / "ours")
    text = loaded.get_text_config()
    assert text.num_hidden_layers == cfg.text.num_layers and text.hidden_size == cfg.text.hidden_size
    assert text.rope_parameters["mrope_section"] == list(cfg.text.mrope_section)
    assert loaded.vision_config.depth == cfg.vision.depth


def test_presets_describe_the_released_models():
    assert {"qwen2-vl-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"} <= set(presets())
    q7 = QwenVLConfig.from_file("qwen2.5-vl-7b")
    assert (q7.text.hidden_size, q7.text.num_layers, q7.text.num_kv_heads, q7.vision.window_merged) == (3584, 28, 4, 4)
    assert q7.vision.fullatt_block_indexes == (7, 15, 23, 31)
    q2 = QwenVLConfig.from_file("qwen2-vl-7b")
    assert (q2.vision.hidden_size, q2.vision.intermediate_size, q2.vision.hidden_act) == (1280, 5120, "quick_gelu")
    assert QwenVLConfig.from_file("qwen2.5-vl-3b").text.tie_word_embeddings


def test_config_errors_name_the_problem(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ConfigError, match="unknown model_type 'llava'"):
        QwenVLConfig.from_file(tmp_path)
    d = tiny_config("qwen2_vl").to_hf_dict()
    del d["num_hidden_layers"]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="missing the field 'num_hidden_layers'"):
        QwenVLConfig.from_file(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        QwenVLConfig.from_file(tmp_path)
