"""Outputs on an object store (gs://): a short SFT run, an export and an evaluation written to a
Cloud Storage stand-in and read back; a gs:// URL without the client refused in one line.

The stand-in is an fsspec file system registered for the gs:// scheme (where gcsfs serves it in
production), keeping the bucket's objects under a folder of tmp_path: every writer that goes through
stjax.io (etils.epath) lands there, while a writer that still uses os / open on a gs:// path writes a
local folder named `gs:` in the working directory (an empty folder, asserted empty at the end) and its
file is missing when read back through the store. Orbax hands array bytes to TensorStore's own GCS
client (no fsspec, and it needs the network), so the test points that client at the same folder: the
checkpoint's metadata (epath) and arrays (TensorStore) must agree for the restore to work.
"""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from etils.epath.backend import fsspec_backend
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem
from test_train_run import assets, settings  # noqa: F401  (assets: the module's fixture)

from stjax.cli import run_cli
from stjax.eval.mcq import EvalConfig, evaluate, load_records
from stjax.io import DirectoryLock, OutputError, as_path
from stjax.train import config as train_config
from stjax.train import stages
from stjax.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its mapping)


class FakeGCS(DirFileSystem):
    """gs://BUCKET/KEY kept as ROOT/BUCKET/KEY; ROOT is set per test (epath caches the instance)."""

    protocol = ("gs", "gcs")
    root = "/nonexistent"
    cachable = False
    path = property(lambda self: type(self).root, lambda self, value: None)

    def __init__(self, *args, **kwargs):  # epath passes gcsfs's options (finalize_on_close)
        super().__init__(path=self.root, fs=LocalFileSystem(auto_mkdir=True))  # a bucket has no folders


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """gs:// served from tmp_path/store, for fsspec and TensorStore alike; the working directory empty."""
    from orbax.checkpoint._src.path import gcs_utils

    for scheme in FakeGCS.protocol:
        monkeypatch.setitem(registry._registry, scheme, FakeGCS)
    monkeypatch.setattr(FakeGCS, "root", str(tmp_path / "store"))
    (tmp_path / "store").mkdir()

    def tensorstore_kvstore(path):
        name, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
        return {"driver": "file", "path": str(tmp_path / "store" / name / key)}

    monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", tensorstore_kvstore)
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)  # a GCS API call
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    yield tmp_path / "store"
    fsspec_backend._get_filesystem.cache_clear()  # epath keeps the instance: not past this test
    assert os.listdir(tmp_path / "cwd") == [], "a writer wrote a gs:// path to the local disk"


def read(path: str) -> str:
    return as_path(path).read_text()


def test_a_training_run_its_export_and_an_evaluation_go_to_the_bucket(assets, bucket, tmp_path):  # noqa: F811
    from safetensors.numpy import load

    from stjax.train.export import export_checkpoint

    out = "gs://bucket/runs/sft"
    changes = {
        "mesh": "fsdp=2,tensor=4",
        "checkpoint.save_steps": 1,
        "checkpoint.export_hf": "true",
        "report_to": "[tensorboard]",
    }
    cfg = train_config.load(None, settings(out, assets, max_steps=2, **changes))
    stages.train(cfg)
    records = [json.loads(line) for line in read(f"{out}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in records] == [1, 2] and np.isfinite(records[-1]["loss"])
    assert json.loads(read(f"{out}/summary.json"))["steps"] == 2
    assert json.loads(read(f"{out}/config.json"))["output_dir"] == out
    events = next(as_path(f"{out}/tensorboard").iterdir()).read_bytes()
    assert b"loss" in events  # tensorboardX's records of the scalars
    assert not as_path(f"{out}/.lock").exists()  # released
    assert {p.name for p in as_path(f"{out}/checkpoints").iterdir()} >= {"1", "2"}
    exported = as_path(f"{out}/hf")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in exported.iterdir()}

    # an export on request restores checkpoint 2 from the bucket: the same weights as the run's export
    again = export_checkpoint(out, out="gs://bucket/export")
    ours = load((again / "model.safetensors").read_bytes())
    theirs = load((exported / "model.safetensors").read_bytes())
    assert ours.keys() == theirs.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])

    data, model = assets
    eval_cfg = EvalConfig(
        model=str(model),
        data=[str(data / "plain.jsonl")],
        out="gs://bucket/eval",
        limit=4,
        max_new_tokens=4,
        batch_size=4,
    )
    summary = evaluate(eval_cfg)
    predictions = load_records("gs://bucket/eval/predictions.jsonl")
    assert len(predictions) == summary["overall"]["n"] == 4
    assert json.loads(read("gs://bucket/eval/accuracy.json"))["overall"] == summary["overall"]
    assert evaluate(eval_cfg)["overall"] == summary["overall"]  # the resume reads the bucket's records


def test_the_tpu_configs_gs_out_dir_takes_metrics_and_tensorboard(bucket):
    """The shipped v5p-64 GRPO config (out_dir gs://BUCKET/...) passes its checks and its logger writes to
    the bucket (it used to make a local folder `gs:` and crash in tensorboardX)."""
    from stjax.train.metrics import MetricsLogger

    cfg = train_config.load(ROOT / "configs/grpo/qwen2.5-vl-7b-tpu-v5p-64.yaml")
    assert cfg.output_dir.startswith("gs://")
    train_config.check(cfg, 32, 8)
    train_config.check_output_dir(cfg)
    with MetricsLogger(cfg.output_dir, 2, progress=False, report_to=["tensorboard"]) as logger:
        logger.log(1, {"loss": 0.5, "reward": 0.25})
        logger.summary()
    assert json.loads(read(f"{cfg.output_dir}/metrics.jsonl"))["reward"] == 0.25
    assert json.loads(read(f"{cfg.output_dir}/summary.json"))["final_loss"] == 0.5
    assert b"reward" in next(as_path(f"{cfg.output_dir}/tensorboard").iterdir()).read_bytes()


def test_a_converter_writes_to_the_bucket_what_it_writes_locally(bucket, hf_dirs, tmp_path):
    from stjax.convert import hf_to_stjax

    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    source = hf_dirs("qwen2_vl")[0]
    hf_to_stjax(source, "gs://bucket/converted")
    hf_to_stjax(source, tmp_path / "local")
    ours, local = files(bucket / "bucket" / "converted"), files(tmp_path / "local")
    tops = lambda tree: {Path(name).parts[:2] for name in tree}  # orbax's data files have random names below
    assert ("config.json",) in tops(ours) and tops(ours) == tops(local)
    assert ours["config.json"] == local["config.json"]


def test_grpo_completions_are_appended_on_the_bucket(bucket):
    from types import SimpleNamespace

    from stjax.train.grpo import log_completions

    for step in (1, 2):
        log_completions(
            as_path("gs://bucket/grpo/completions.jsonl"),
            step,
            [SimpleNamespace(id=f"p{step}")],
            [f"<answer>{step}</answer>"],
            np.array([[1.0]]),
            np.array([1.0]),
            ["accuracy"],
            1,
        )
    lines = [json.loads(line) for line in read("gs://bucket/grpo/completions.jsonl").splitlines()]
    assert [(r["step"], r["prompt_id"]) for r in lines] == [(1, "p1"), (2, "p2")]


def test_upload_puts_config_json_last(bucket, monkeypatch):
    """A bucket has no directory rename: a model directory appears object by object, config.json last
    (an old one's deleted first), so a directory with a config.json is whole."""
    from stjax.io import atomic_dir

    events, real_open, real_rm = [], LocalFileSystem._open, FakeGCS.rm

    def logged_open(self, path, mode="rb", **kwargs):
        if "w" in mode:
            events.append(f"put {Path(path).name}")
        return real_open(self, path, mode, **kwargs)

    def logged_rm(self, path, *args, **kwargs):
        events.append(f"rm {Path(path).name}")
        return real_rm(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", logged_open)
    monkeypatch.setattr(FakeGCS, "rm", logged_rm)
    for version in ("old", "new"):
        with atomic_dir("gs://bucket/model", overwrite=True) as partial:
            for name in ("config.json", "model.safetensors", "tokenizer.json"):
                (partial / name).write_text(version)
    put = ["put model.safetensors", "put tokenizer.json", "put config.json"]
    assert events == put + ["rm config.json", "rm model"] + put
    assert read("gs://bucket/model/model.safetensors") == "new"


def test_the_lock_is_an_object_created_only_if_absent(bucket):
    held = DirectoryLock("gs://bucket/run", "training run").acquire()
    assert json.loads(read("gs://bucket/run/.lock"))["pid"] == os.getpid()
    DirectoryLock._held.clear()  # as another process would see it
    with pytest.raises(OutputError, match=f"in use by another training run \\(pid {os.getpid()}"):
        DirectoryLock("gs://bucket/run", "training run").acquire()
    held.release()
    assert not as_path("gs://bucket/run/.lock").exists()
    # a lock left by a dead process of this host is taken over
    as_path("gs://bucket/run/.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 1}))
    DirectoryLock("gs://bucket/run").acquire().release()


def test_gs_without_the_client_is_refused_in_one_line_before_any_work(
    assets,
    tmp_path,
    monkeypatch,  # noqa: F811
    capsys,
):
    from stjax.train import loop
    from stjax.train.__main__ import main as train_main

    monkeypatch.delitem(registry._registry, "gs", raising=False)
    monkeypatch.setitem(registry.known_implementations, "gs", {"class": "gcsfs_is_not_installed.GCS"})
    monkeypatch.setattr(loop, "prepare_data", lambda *a: pytest.fail("the run went past its checks"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"gs://b/run: writing to gs:// needs gcsfs"):
        stages.train(train_config.load(None, settings("gs://b/run", assets, mesh="fsdp=2,tensor=4")))
    with pytest.raises(ConfigError, match=r"gs://BUCKET/runs/grpo-qwen2.5-vl-7b: writing to gs:// needs gcsfs"):
        train_config.check_output_dir(train_config.load(ROOT / "configs/grpo/qwen2.5-vl-7b-tpu-v5p-64.yaml"))
    with pytest.raises(SystemExit):
        run_cli(train_main, ["--stage", "sft", "--set", "output_dir=gs://b/run"])
    assert capsys.readouterr().err.strip().count("\n") == 0
    with pytest.raises(SystemExit, match="--out gs://b/eval: writing to gs:// needs gcsfs"):
        evaluate(EvalConfig(out="gs://b/eval"))
    assert os.listdir(tmp_path) == []
