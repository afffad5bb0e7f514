"""The MCQ evaluator on a synthetic benchmark (2 walks, 12 questions) and a tiny random model."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from reference import sample_inputs
from scipy.stats import binomtest

import stjax.eval.mcq as mcq
from stjax.data.formats import read_plain_jsonl
from stjax.data.processor import Processor
from stjax.data.synthetic import generate
from stjax.data.tokenizer import tiny_model_dir
from stjax.eval.mcq import EvalConfig, evaluate, format_summary, load_records, load_samples, parse_config, summarize
from stjax.models.loading import load_pretrained
from stjax.models.qwen_vl import compiled_forward

FAST = dict(max_new_tokens=6, batch_size=4, text_only=False)  # the text-only pass: its own test


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(data folder, tiny model folder), made once for the module."""
    root = tmp_path_factory.mktemp("eval")
    data = generate(root / "data", n=2, seed=0)
    return data, tiny_model_dir(data / "tokenizer", root / "model", "qwen2_5_vl", seed=0)


def records_by_key(out) -> dict:
    return {(r["file"], r["id"]): r for r in load_records(out / "predictions.jsonl")}


def test_resume_after_a_crash_gives_the_same_predictions_and_accuracy(bench, tmp_path, monkeypatch):
    data, model = bench
    cfg = EvalConfig(model=str(model), data=[str(data / "plain.jsonl")], limit=8, **FAST)
    full = evaluate(EvalConfig(**{**vars(cfg), "out": str(tmp_path / "full")}))

    calls = []
    run_batch = mcq.Runner.run_batch

    def crash_on_second_batch(self, *args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user stopped the run
        return run_batch(self, *args)

    monkeypatch.setattr(mcq.Runner, "run_batch", crash_on_second_batch)
    stopped = EvalConfig(**{**vars(cfg), "out": str(tmp_path / "stopped")})
    with pytest.raises(KeyboardInterrupt):
        evaluate(stopped)
    assert len(load_records(tmp_path / "stopped" / "predictions.jsonl")) == 4  # the first batch was kept
    monkeypatch.setattr(mcq.Runner, "run_batch", run_batch)
    resumed = evaluate(stopped)

    assert records_by_key(tmp_path / "stopped") == records_by_key(tmp_path / "full")
    assert len(records_by_key(tmp_path / "full")) == 8
    assert resumed == full
    assert json.loads((tmp_path / "stopped" / "accuracy.json").read_text()) == full
    # A finished run has nothing left to do: running it again adds no record.
    evaluate(stopped)
    assert len(load_records(tmp_path / "stopped" / "predictions.jsonl")) == 8


def test_resume_refuses_other_settings(bench, tmp_path):
    data, model = bench
    cfg = EvalConfig(model=str(model), data=[str(data / "plain.jsonl")], out=str(tmp_path), limit=1, **FAST)
    evaluate(cfg)
    with pytest.raises(SystemExit, match="max_new_tokens differ"):
        evaluate(EvalConfig(**{**vars(cfg), "max_new_tokens": 7}))


def test_a_missing_video_and_a_long_prompt_are_recorded_as_failures(bench, tmp_path):
    data, model = bench
    rows = [json.loads(line) for line in (data / "plain.jsonl").read_text().splitlines()[:5]]
    rows[1]["video"] = "synth/no_such_walk.mp4"
    shutil.copytree(data / "synth", tmp_path / "synth")
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = EvalConfig(model=str(model), data=[str(tmp_path / "plain.jsonl")], out=str(tmp_path / "out"), **FAST)
    summary = evaluate(cfg)

    records = [records_by_key(tmp_path / "out")[("plain.jsonl", r["id"])] for r in rows]
    assert "no_such_walk.mp4" in records[1]["error"] and records[1]["correct"] is False
    assert all("error" not in r and isinstance(r["response"], str) for i, r in enumerate(records) if i != 1)
    assert summary["overall"]["n"] == 5 and summary["overall"]["failed"] == 1

    short = evaluate(EvalConfig(**{**vars(cfg), "out": str(tmp_path / "short"), "max_prompt_tokens": 10}))
    assert short["overall"]["failed"] == 5
    assert "over --max-prompt-tokens 10" in load_records(tmp_path / "short" / "predictions.jsonl")[0]["error"]


def test_logits_mode_picks_the_argmax_letter_of_a_full_forward(bench, tmp_path):
    data, model_dir = bench
    files = [data / "Synth_forward_mcq.json", data / "Synth_reverse_mcq_landmark.json"]  # Ego-ST format
    cfg = EvalConfig(
        model=str(model_dir),
        data=[str(f) for f in files],
        videos=[str(data / "synth")],
        out=str(tmp_path),
        mode="logits",
        batch_size=3,
    )
    evaluate(cfg)
    recorded = records_by_key(tmp_path)
    assert len(recorded) == 4 and {r["file"] for r in recorded.values()} == {f.name for f in files}

    model, config = load_pretrained(model_dir)
    processor = Processor.from_pretrained(model_dir, tokens_per_second=config.vision.tokens_per_second)
    letters = {k: processor.tokenizer.convert_tokens_to_ids(k) for k in "ABCD"}
    for file, sample in load_samples(cfg)[0]:
        arrays = processor(sample, "seed_mcq")
        inputs = sample_inputs(config, arrays)
        logits = np.asarray(compiled_forward(model, inputs))[0, len(arrays["input_ids"]) - 1]
        scores = {k: logits[letters[k]] for k in "ABCD"[: len(sample.options)]}
        record = recorded[file, sample.id]
        assert record["pred"] == max(scores, key=scores.get)
        np.testing.assert_allclose([record["logits"][k] for k in scores], list(scores.values()), rtol=1e-4, atol=1e-4)


def test_accuracy_on_a_hand_made_predictions_file(tmp_path):
    rows = [  # file, task, direction, pred, gold, error, options
        ("a.json", "direction", "forward", "A", "A", None, 4),
        ("a.json", "direction", "reverse", "B", "C", None, 4),
        ("a.json", "landmark", "forward", None, "C", None, 4),
        ("b.jsonl", "landmark", "reverse", "C", "C", None, 3),
        ("b.jsonl", "action", "forward", None, "B", "file x.mp4: cannot open", 4),
    ]
    lines = [
        json.dumps(
            {
                "id": str(i),
                "file": f,
                "task": t,
                "direction": d,
                "pred": p,
                "gold": g,
                "correct": p == g,
                "n_options": k,
                **({"error": e} if e else {}),
            }
        )
        for i, (f, t, d, p, g, e, k) in enumerate(rows)
    ]
    path = tmp_path / "predictions.jsonl"
    path.write_text("\n".join(lines) + "\n" + lines[0][:20])  # a last line cut short by a crash
    records = load_records(path)
    assert path.read_text().endswith(lines[-1] + "\n")  # the cut line was dropped from the file
    blind = [dict(r, correct=r["id"] == "2") for r in records]  # text-only: only the third sample right
    summary = summarize(records, blind)
    path.write_text("\n".join(lines))  # cut just before the last newline: the record is complete
    assert len(load_records(path)) == 5 and path.read_text().endswith("\n")

    def t(n, correct, chance, majority, blind, failed=0, no_answer=0):
        # scipy's Wilson interval, an independent reference (agreement to 1e-6: z is rounded to 1.959964)
        ci = list(binomtest(correct, n).proportion_ci(method="wilson"))
        blind_ci = list(binomtest(blind, n).proportion_ci(method="wilson"))
        return {
            "n": n,
            "correct": correct,
            "accuracy": correct / n,
            "interval": pytest.approx(ci, abs=1e-6),
            "failed": failed,
            "no_answer": no_answer,
            "chance": pytest.approx(chance),
            "majority": majority,
            "text_only": {
                "n": n,
                "correct": blind,
                "accuracy": blind / n,
                "interval": pytest.approx(blind_ci, abs=1e-6),
            },
        }

    assert summary == {
        "overall": t(5, 2, (4 / 4 + 1 / 3) / 5, 3 / 5, 1, failed=1, no_answer=1),
        "by_file": {
            "a.json": t(3, 1, 1 / 4, 2 / 3, 1, no_answer=1),
            "b.jsonl": t(2, 1, (1 / 3 + 1 / 4) / 2, 1 / 2, 0, failed=1),
        },
        "by_task": {
            "action": t(1, 0, 1 / 4, 1, 0, failed=1),
            "direction": t(2, 1, 1 / 4, 1 / 2, 0),
            "landmark": t(2, 1, (1 / 4 + 1 / 3) / 2, 1, 1, no_answer=1),
        },
        "by_direction": {
            "forward": t(3, 1, 1 / 4, 1 / 3, 1, failed=1, no_answer=1),
            "reverse": t(2, 1, (1 / 4 + 1 / 3) / 2, 1, 0),
        },
    }


def test_accuracy_is_broken_down_by_whatever_tasks_the_data_has():
    """Ego-ST's tasks first, then the data's own; a record without a direction is in no direction's group."""
    rows = [
        ("motion", None, "A", "A"),
        ("motion", None, "B", "A"),
        ("landmark", "forward", "C", "C"),
        ("counting", "reverse", "A", "B"),
        ("direction", "forward", "D", "D"),
    ]
    records = [
        {
            "id": str(i),
            "file": "own.jsonl",
            "task": t,
            "direction": d,
            "pred": p,
            "gold": g,
            "correct": p == g,
            "n_options": 4,
        }
        for i, (t, d, p, g) in enumerate(rows)
    ]
    summary = summarize(records)
    assert list(summary["by_task"]) == ["direction", "landmark", "counting", "motion"]
    assert {k: (v["n"], v["correct"]) for k, v in summary["by_task"].items()} == {
        "direction": (1, 1),
        "landmark": (1, 1),
        "counting": (1, 0),
        "motion": (2, 1),
    }
    assert {k: v["n"] for k, v in summary["by_direction"].items()} == {"forward": 2, "reverse": 1}
    assert "task motion" in format_summary(summary)


def test_data_formats_are_detected_and_config_file_is_overridden_by_flags(bench, tmp_path):
    data, _ = bench
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"data: [{data / 'st_r1_synth.jsonl'}, {data / 'plain.jsonl'}, {data}]\n"
        "batch-size: 2\nmax_new_tokens: 16\nextract: seed\n"
    )
    cfg = parse_config(["--config", str(config), "--max-new-tokens", "32", "--mode", "logits"])
    assert (cfg.batch_size, cfg.max_new_tokens, cfg.extract, cfg.mode, cfg.num_frames) == (2, 32, "seed", "logits", 8)
    samples, skipped = load_samples(cfg)
    files = [f for f, _ in samples]
    # ST-R1 rows, plain rows, then the folder's six Ego-ST files with two questions each
    assert files.count("st_r1_synth.jsonl") == files.count("plain.jsonl") == 12 and len(samples) == 36
    assert all(skipped[f] == {} for f in files)
    plain = {s.id: s for s in read_plain_jsonl(data / "plain.jsonl").samples}
    by_video_and_question = {(s.video, s.question): s.answer for s in plain.values()}
    for _, s in samples:  # every format finds the same videos and gold letters
        assert by_video_and_question[s.video, s.question] == s.answer
    with pytest.raises(SystemExit, match="unknown option 'frames'"):
        config.write_text("frames: 4\n")
        parse_config(["--config", str(config)])
    for shipped in sorted((Path(__file__).parents[1] / "configs" / "eval").glob("*.yaml")):
        assert parse_config(["--config", str(shipped)]).model


def test_second_per_grid_reaches_the_processor(bench):
    _, model = bench
    for rule in ("seed", "kept_frames"):
        assert (
            mcq.make_runner(EvalConfig(model=str(model), second_per_grid=rule)).processor.media.second_per_grid == rule
        )
    assert parse_config(["--second-per-grid", "kept_frames"]).second_per_grid == "kept_frames"


def test_egost_videos_are_found_in_the_part_folder_under_videos(bench, tmp_path):
    data, _ = bench
    shutil.copy(data / "Synth_forward_mcq.json", tmp_path / "Part1_forward_mcq.json")
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "part1").symlink_to(data / "synth")
    samples, _ = load_samples(EvalConfig(data=[str(tmp_path)], videos=[str(tmp_path / "videos")]))
    assert len(samples) == 2
    assert all(Path(s.video).parent == tmp_path / "videos" / "part1" and Path(s.video).exists() for _, s in samples)


def test_embedded_default_runs_end_to_end(tmp_path, capsys):
    mcq.main(["--out", str(tmp_path), "--walks", "1", "--max-new-tokens", "8"])
    assert len(load_records(tmp_path / "predictions.jsonl")) == 6
    summary = json.loads((tmp_path / "accuracy.json").read_text())
    assert summary["overall"]["n"] == 6 and set(summary["by_direction"]) == {"forward", "reverse"}
    assert "overall" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["generate", "logits"])
def test_sharded_evaluation_gives_the_same_predictions(bench, tmp_path, mode):
    """8 simulated CPU devices (conftest), model and batch sharded (fsdp=4, tensor=2), vs one device."""
    import jax

    assert jax.device_count() == 8
    data, model = bench
    base = dict(model=str(model), data=[str(data / "plain.jsonl")], limit=8, mode=mode, **FAST)
    evaluate(EvalConfig(**base, out=str(tmp_path / "one")))
    evaluate(EvalConfig(**base, out=str(tmp_path / "mesh"), mesh="fsdp=4,tensor=2"))
    one, mesh = records_by_key(tmp_path / "one"), records_by_key(tmp_path / "mesh")
    assert one.keys() == mesh.keys()
    for key in one:
        assert mesh[key]["pred"] == one[key]["pred"]
        assert mesh[key].get("response") == one[key].get("response")


def test_always_d_on_an_all_d_file_scores_the_majority_baseline(bench, tmp_path, monkeypatch, capsys):
    """A letter bias is not learning: the table puts such a model's accuracy beside the majority baseline."""
    data, _ = bench
    records = json.loads((data / "Synth_forward_mcq.json").read_text())
    for r in records.values():
        r["forward_mcq"]["answer"] = "D"
    (tmp_path / "Part1_forward_mcq.json").write_text(json.dumps(records))
    videos = tmp_path / "part1"
    shutil.copytree(data / "synth", videos)

    def processor(sample, template):
        return {
            "input_ids": np.zeros(3, np.int64),
            "pixel_values_videos": np.ones((4, 6), np.float32),
            "pixel_values": np.ones((2, 6), np.float32),
        }

    seen = []  # (blank_media, the largest pixel value, of a video frame or an image, given to the model)

    def always_d(self, samples, arrays, step):
        seen.extend(
            (self.blank_media, float(max(np.abs(a[k]).max() for k in ("pixel_values_videos", "pixel_values"))))
            for a in arrays
        )
        return [{"pred": "D"} for _ in samples]

    monkeypatch.setattr(mcq, "make_runner", lambda cfg: mcq.Runner(cfg, None, processor, None, {}))
    monkeypatch.setattr(mcq.Runner, "run_batch", always_d)
    summary = evaluate(
        EvalConfig(
            model="always-d",
            data=[str(tmp_path / "Part1_forward_mcq.json")],
            out=str(tmp_path / "out"),
            **{**FAST, "text_only": True},
        )
    )
    overall = summary["overall"]
    assert overall["n"] == len(records) and overall["accuracy"] == overall["majority"] == 1.0
    assert overall["chance"] == 0.25 and overall["text_only"]["accuracy"] == 1.0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("overall"))
    assert row.split()[5] == row.split()[9] == "100.0%" and row.split()[8] == "25.0%", row
    assert sorted(set(seen)) == [(False, 1.0), (True, 0.0)]  # the text-only pass saw blank frames, the other not
