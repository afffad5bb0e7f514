"""Hub ids (`owner/name`, with a revision) at every entry point, from a Hugging Face cache laid out here
by hand (models--owner--name/{refs,snapshots}) and read with HF_HUB_OFFLINE=1: nothing is downloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx, traverse_util
from huggingface_hub import constants

from stjax.data.tokenizer import build_tokenizer, tiny_model_dir
from stjax.eval.mcq import EvalConfig, make_runner
from stjax.models.loading import ModelNotFoundError, load_pretrained, resolve_model_dir
from stjax.sharding import make_mesh
from stjax.train import loop
from stjax.train.config import ConfigError, DataSection, ModelSection, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
REPO = "stjax-test/tiny-vl"
MAIN, V1 = "a" * 40, "b" * 40  # commits: main has the seed-0 model, revision v1 the seed-1 model


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Two tiny models (seeds 0 and 1) with one tokenizer, as plain directories."""
    root = tmp_path_factory.mktemp("hub-models")
    texts = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", "Which way? A. left B. right"] * 4
    tokenizer = build_tokenizer(texts, root / "tokenizer", vocab_size=300)
    return {seed: tiny_model_dir(tokenizer, root / f"seed{seed}", "qwen2_vl", seed) for seed in (0, 1)}


@pytest.fixture(scope="module")
def hf_home(models, tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds REPO: refs/main -> MAIN (seed 0), refs/v1 -> V1 (seed 1)."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{REPO.replace('/', '--')}"
    for commit, seed, ref in ((MAIN, 0, "main"), (V1, 1, "v1")):
        shutil.copytree(models[seed], repo / "snapshots" / commit)
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return home


@pytest.fixture
def offline_cache(hf_home, monkeypatch) -> Path:
    """This process reads hf_home's cache, offline (huggingface_hub reads HF_HOME once, at import)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return hf_home / "hub"


def weights(model) -> dict:
    return {
        k: np.asarray(v) for k, v in traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param))).items()
    }


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)


def test_resolve_a_hub_id_a_revision_and_a_local_directory(offline_cache, models, tmp_path, monkeypatch):
    snapshots = offline_cache / "models--stjax-test--tiny-vl" / "snapshots"
    assert resolve_model_dir(REPO) == snapshots / MAIN
    assert resolve_model_dir(REPO, revision="v1") == snapshots / V1
    assert resolve_model_dir(REPO, revision=V1) == snapshots / V1
    monkeypatch.chdir(tmp_path)  # a directory of the same name wins over the cache
    shutil.copytree(models[1], tmp_path / REPO)
    assert resolve_model_dir(REPO) == Path(REPO)


@pytest.mark.parametrize(
    "name, revision, message",
    [
        (
            "stjax-test/not-cached",
            None,
            "stjax-test/not-cached: no such directory, and not in the Hugging Face cache .*HF_HUB_OFFLINE=1",
        ),
        (REPO, "v2", r"stjax-test/tiny-vl \(revision v2\): no such directory, and not in the Hugging Face cache"),
        ("/no/such/dir", None, "/no/such/dir: no such directory, and not a hub id"),
    ],
)
def test_a_name_that_cannot_be_had_is_one_line_naming_it(offline_cache, name, revision, message):
    with pytest.raises(ModelNotFoundError, match=message) as e:
        resolve_model_dir(name, revision)
    assert "\n" not in str(e.value)


def test_load_pretrained_takes_a_hub_id(offline_cache, models):
    model, _ = load_pretrained(REPO)
    assert same_weights(model, load_pretrained(models[0])[0])
    model, _ = load_pretrained(REPO, revision="v1")
    assert same_weights(model, load_pretrained(models[1])[0])


def test_evaluator_takes_a_hub_id(offline_cache, models):
    runner = make_runner(EvalConfig(model=REPO, revision="v1"))
    assert same_weights(runner.model, load_pretrained(models[1])[0])
    with pytest.raises(SystemExit, match="error: stjax-test/nope: no such directory"):
        make_runner(EvalConfig(model="stjax-test/nope"))


def test_trainer_takes_a_hub_id(offline_cache, models, tmp_path):
    cfg = TrainConfig(
        model=ModelSection(model_name_or_path=REPO, revision="v1"), data=DataSection(format="plain", path="x.jsonl")
    )
    tokenizer = loop.tokenizer_dir(cfg)
    assert tokenizer == offline_cache / "models--stjax-test--tiny-vl" / "snapshots" / V1
    model = loop.prepare_model(cfg, make_mesh())
    assert same_weights(model, load_pretrained(models[1])[0])
    missing = TrainConfig(
        model=ModelSection(model_name_or_path="stjax-test/nope"), data=DataSection(format="plain", path="x")
    )
    with pytest.raises(ConfigError, match="model.model_name_or_path: stjax-test/nope: no such directory"):
        loop.tokenizer_dir(missing)
    with pytest.raises(ConfigError, match="model.model_name_or_path: stjax-test/nope: .*; nor is it a preset"):
        loop.prepare_model(missing, make_mesh())


def test_convert_script_takes_a_hub_id_from_HF_HOME(hf_home, models, tmp_path):
    """As a user runs it: a fresh process with HF_HOME and HF_HUB_OFFLINE=1 in its environment."""
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    env.pop("HF_HUB_CACHE", None)
    script = [sys.executable, "convert/to_stjax.py"]
    subprocess.run(script + [REPO, str(tmp_path / "out"), "--revision", "v1"], cwd=ROOT, env=env, check=True)
    assert same_weights(load_pretrained(tmp_path / "out")[0], load_pretrained(models[1])[0])
    failed = subprocess.run(
        script + ["stjax-test/nope", str(tmp_path / "nope")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert failed.returncode == 1 and not (tmp_path / "nope").exists()
    assert failed.stderr.strip().splitlines() == [
        f"error: stjax-test/nope: no such directory, and not in the Hugging Face cache {hf_home / 'hub'} "
        "(HF_HUB_OFFLINE=1: nothing is downloaded) (--debug for the traceback)"
    ]
