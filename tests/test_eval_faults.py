"""Faults of issue #15 in evaluation and data loading: a sample that fails anywhere is recorded and
skipped, a run that evaluates nothing exits non-zero, options are validated before any work, one
--out holds one run, and a resume refuses changed inputs."""

import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from test_train_faults import locked_elsewhere

import stjax.eval.mcq as mcq
from stjax.data.formats import read_plain_jsonl
from stjax.data.loader import LoaderConfig, make_loader
from stjax.data.processor import Processor
from stjax.data.synthetic import generate
from stjax.data.tokenizer import tiny_model_dir
from stjax.eval.mcq import EvalConfig, evaluate, load_records

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(max_new_tokens=4, batch_size=4, text_only=False)


def write_video(path: Path, height: int, width: int, frames: int = 16, fps: int = 4) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 10 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(data folder, tiny model, a plain JSONL of 4 rows whose second video has an aspect ratio of 250)."""
    root = tmp_path_factory.mktemp("evalfaults")
    data = generate(root / "data", n=1, seed=0, sheet=0)
    model = tiny_model_dir(data / "tokenizer", root / "model", "qwen2_5_vl", seed=0)
    rows = [json.loads(line) for line in (data / "plain.jsonl").read_text().splitlines()[:4]]
    rows[1]["video"] = str(write_video(root / "thin.mp4", 4, 1000))
    for row in rows:
        row["video"] = str((data / row["video"]) if not Path(row["video"]).is_absolute() else row["video"])
    odd = root / "odd.jsonl"
    odd.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data, model, odd


def test_a_video_with_an_aspect_ratio_over_200_is_recorded_and_the_evaluation_goes_on(bench, tmp_path):
    data, model, odd = bench
    summary = evaluate(EvalConfig(model=str(model), data=[str(odd)], out=str(tmp_path), **FAST))
    records = load_records(tmp_path / "predictions.jsonl")
    assert len(records) == 4 and summary["overall"]["failed"] == 1
    failed = next(r for r in records if "error" in r)
    assert "thin.mp4" in failed["error"] and "aspect ratio over 200" in failed["error"]


@pytest.mark.parametrize("workers", [0, 1])
def test_the_training_loader_skips_such_a_video_with_its_reason(bench, workers):
    data, _, odd = bench
    samples = read_plain_jsonl(odd).samples
    processor = Processor.from_pretrained(data / "tokenizer")
    loader = make_loader(
        samples,
        processor,
        LoaderConfig(
            batch_size=1,
            shuffle=False,
            num_workers=workers,
            image_patch_buckets=(0,),
            token_buckets=(4096,),
            patch_buckets=(8192,),
        ),
    )
    iterator = iter(loader)
    batches = list(iterator)
    assert len(batches) == 3
    assert [(sample_id, "aspect ratio over 200" in reason) for sample_id, reason in iterator.skipped] == [
        (samples[1].id, True)
    ]


def test_a_second_evaluation_on_the_same_out_is_refused(bench, tmp_path):
    data, model, odd = bench
    with locked_elsewhere(tmp_path, "evaluation"):
        with pytest.raises(ValueError, match="is in use by another evaluation"):
            evaluate(EvalConfig(model=str(model), data=[str(odd)], out=str(tmp_path), **FAST))
    assert not (tmp_path / "predictions.jsonl").exists()


def test_a_resume_refuses_a_data_file_that_changed(bench, tmp_path):
    data, model, odd = bench
    changed = tmp_path / "odd.jsonl"
    changed.write_text(odd.read_text())
    cfg = EvalConfig(model=str(model), data=[str(changed)], out=str(tmp_path / "out"), limit=2, **FAST)
    evaluate(cfg)
    rows = changed.read_text().splitlines()
    changed.write_text("\n".join(rows[1:] + rows[:1]) + "\n")  # same ids, other order and content
    with pytest.raises(SystemExit, match="data odd.jsonl"):
        evaluate(cfg)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stjax.eval.mcq", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.parametrize(
    "flag,message",
    [
        (("--batch-size", "-3"), "--batch-size -3: must be >= 1"),
        (("--limit", "-3"), "--limit -3: must be >= 1"),
        (("--max-new-tokens", "0"), "--max-new-tokens 0: must be >= 1"),
        (("--num-frames", "0"), "--num-frames 0: must be >= 1"),
    ],
)
def test_numeric_options_are_refused_before_any_work(bench, tmp_path, flag, message):
    data, model, odd = bench
    result = cli("--model", str(model), "--data", str(odd), "--out", str(tmp_path / "out"), *flag)
    assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("compile_only", [False, True])
def test_a_bad_option_beside_a_hub_id_is_refused_before_the_hub_is_asked(tmp_path, monkeypatch, capsys, compile_only):
    """The options are checked first, then the model's training recipe is looked up: a bad flag beside a hub
    id that would need a download ends in the one-line error, the hub (even its offline cache) never asked,
    no recipe read, nothing compiled or written (`--compile-only` checks as well)."""
    import huggingface_hub

    from stjax import compile_only as co
    from stjax.models import loading

    asked = []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for module in (loading, huggingface_hub):
        monkeypatch.setattr(module, "snapshot_download", lambda *a, **k: asked.append(a) or 1 / 0)
    monkeypatch.setattr(co, "target", lambda *a: asked.append(a) or 1 / 0)
    argv = ["--model", "stjax-tests/no-such-model", "--data", str(tmp_path / "none.jsonl"), "--top-k", "-1"]
    argv += ["--out", str(tmp_path / "out")] + ["--compile-only"] * compile_only
    with pytest.raises(SystemExit) as e:
        mcq.main(argv)
    assert str(e.value) == "--top-k -1: must be >= 0"
    assert asked == [] and capsys.readouterr().out == "" and not (tmp_path / "out").exists()


def test_empty_unreadable_or_all_failing_data_exit_non_zero(bench, tmp_path):
    data, model, odd = bench
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)) * 4)
    for name, message in (("empty.jsonl", "no usable samples in"), ("binary.jsonl", "first line is not JSON")):
        result = cli("--model", str(model), "--data", str(tmp_path / name), "--out", str(tmp_path / name[:5]))
        assert result.returncode == 1 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr
        assert not (tmp_path / name[:5] / "predictions.jsonl").exists()
    with pytest.raises(SystemExit, match="none of the 4 samples could be evaluated"):
        mcq.main(
            [
                "--model",
                str(model),
                "--data",
                str(odd),
                "--out",
                str(tmp_path / "short"),
                "--max-prompt-tokens",
                "10",
                "--max-new-tokens",
                "4",
            ]
        )
