"""Test setup: 8 simulated CPU devices (for the mesh tests), no network, tiny models made here."""

import os
import sys

# libtpu (the [tpu] extra, for compiling to TPU topologies) otherwise probes for a TPU at start-up and prints
# warnings into every subprocess's stderr; topologies compile with the CPU platform alone.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """Saved tiny transformers checkpoints, made once: {(model_type, dtype_name): (dir, torch model)}."""
    import torch
    from reference import hf_model, tiny_config

    cache = {}

    def get(model_type: str, dtype: str = "float32"):
        key = (model_type, dtype)
        if key not in cache:
            model = hf_model(tiny_config(model_type), dtype=getattr(torch, dtype))
            path = tmp_path_factory.mktemp(f"hf-{model_type}-{dtype}")
            model.save_pretrained(path)
            cache[key] = (path, model)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def synthetic_assets(tmp_path_factory):
    """A small synthetic ego-centric set (2 walks, 12 questions) and tiny random base models matching its
    tokenizer, made once: (data dir, {arch: HF model dir})."""
    from stjax.data.synthetic import generate
    from stjax.data.tokenizer import tiny_model_dir

    root = tmp_path_factory.mktemp("synthetic-assets")
    data = generate(root / "data", 2, seed=0, sheet=0)
    archs = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
    models = {arch: tiny_model_dir(data / "tokenizer", root / arch, arch, seed=0) for arch in archs}
    return data, models
