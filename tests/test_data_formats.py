"""Readers: Ego-ST Bench MCQ files, ST-R1 rows, our plain JSONL; malformed records are named and skipped."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from stjax.data.formats import (
    ANSWER_FIELDS,
    FIELDS,
    Sample,
    read_egost_dir,
    read_egost_mcq,
    read_plain_jsonl,
    read_st_r1_jsonl,
    split_problem,
    write_plain_jsonl,
)
from stjax.data.video import SampleError

ROOT = Path(__file__).resolve().parents[1]
RELEASE = ROOT.parent / "shared/data/st-r1/st_r1_mcq_630.jsonl"
Q_FWD = "Based on this video, what directions do you need to go through to get to your destination?"
Q_REV = "Based on this video, what directions do you need to go through to get to starting point ?"
OPTIONS = ["A. turn left", "B. turn right", "C. go straight", "D. turn back"]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def egost(tmp_path: Path) -> Path:
    write_json(
        tmp_path / "Part1_forward_mcq.json",
        {
            "v1": {"video": "a.mp4", "forward_mcq": {"question": Q_FWD, "options": OPTIONS, "answer": "B"}},
            "v2": {"video": "b.mp4", "forward_mcq": {"question": Q_FWD, "options": OPTIONS, "gt": "C. go straight"}},
            "v3": {"video": "c.mp4", "forward_mcq": {"question": Q_FWD, "options": [], "answer": "A"}},
            "v4": {"video": "d.mp4", "forward_mcq": {"question": Q_FWD, "options": OPTIONS, "answer": "E"}},
            "v5": {"video": "e.mp4", "forward_mcq": {"question": Q_FWD, "options": OPTIONS}},
        },
    )
    write_json(
        tmp_path / "Part1_reverse_mcq.json",
        {
            "v1": {"video": "a.mp4", "reverse_mcq": {"question": Q_REV, "options": OPTIONS, "label": "(A)"}},
            "v2": {
                "video": "b.mp4",
                "reverse_mcq": {"question": Q_REV, "options": OPTIONS, "correct_answer": "turn back"},
            },
        },
    )
    write_json(
        tmp_path / "Part3_forward_mcq_landmark.json",
        {
            "w": {
                "video": "w.mp4",
                "forward_mcq": {"question": "which landmarks?", "options": ["sofa", "door"], "answer": "door"},
            }
        },
    )
    (tmp_path / "Part4_reverse_mcq_action.json").write_text("{not json")
    return tmp_path


def test_egost_reads_answers_in_every_form_and_links_pairs(egost):
    result = read_egost_dir(egost)
    got = {s.id: s for s in result.samples}
    assert got["Part1_direction:v1:forward"].answer == "B"
    assert got["Part1_direction:v2:forward"].answer == "C"  # "C. go straight"
    assert got["Part1_direction:v1:reverse"].answer == "A"  # "(A)"
    assert got["Part1_direction:v2:reverse"].answer == "D"  # option text
    landmark = got["Part3_landmark:w:forward"]
    assert landmark.answer == "B" and landmark.options == ["A. sofa", "B. door"] and landmark.task == "landmark"
    assert landmark.video == str(egost / "part3_clip" / "w.mp4")
    assert got["Part1_direction:v1:forward"].video == str(egost / "part1" / "a.mp4")
    # forward and reverse questions of one record, from two files, point at each other
    assert got["Part1_direction:v1:forward"].pair_id == "Part1_direction:v1:reverse"
    assert got["Part1_direction:v1:reverse"].pair_id == "Part1_direction:v1:forward"
    assert landmark.pair_id is None
    assert {s.direction for s in result.samples} == {"forward", "reverse"}


def test_egost_malformed_records_are_named_and_counted(egost):
    result = read_egost_dir(egost)
    errors = {(e.sample_id, Path(e.path).name): e.reason for e in result.skipped}
    assert errors[("Part1_direction:v3:forward", "Part1_forward_mcq.json")] == "no options"
    assert "not among the options" in errors[("Part1_direction:v4:forward", "Part1_forward_mcq.json")]
    assert "no answer field" in errors[("Part1_direction:v5:forward", "Part1_forward_mcq.json")]
    assert "unreadable MCQ file" in errors[(None, "Part4_reverse_mcq_action.json")]
    assert len(result.skipped) == 4 and len(result.samples) == 5
    with pytest.raises(SampleError, match=r"Part1_direction:v3:forward.*Part1_forward_mcq.json.*no options"):
        read_egost_mcq(egost / "Part1_forward_mcq.json", strict=True)


def st_row(problem: str, answer: str) -> str:
    return json.dumps(
        {"problem": problem, "solution": f"<think>x</think> <answer>{answer}</answer>", "video": "/x/v.mp4"}
    )


def test_st_r1_rows_parse_and_bad_rows_are_named(tmp_path):
    good = f"{Q_FWD} Options: A. left, then right, B. right\n\nInstructions: pick one."
    lines = [st_row(good, "A"), "{broken", st_row(Q_FWD + " no options here", "A"), st_row(good, "C")]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = read_st_r1_jsonl(path, video_root=tmp_path / "videos")
    (sample,) = result.samples
    assert sample.options == ["A. left, then right", "B. right"]  # the comma inside an option is kept
    assert (sample.answer, sample.task, sample.direction) == ("A", "direction", "forward")
    assert sample.video == str(tmp_path / "videos" / "v.mp4")
    reasons = {e.sample_id: e.reason for e in result.skipped}
    assert reasons["rows:2"].startswith("invalid JSON")
    assert reasons["rows:3"] == "no options in the problem text"
    assert "not among the options" in reasons["rows:4"]
    assert all(e.path == str(path) for e in result.skipped)
    assert result.reasons()["no options in the problem text"] == 1


def test_plain_jsonl_round_trip_and_errors(tmp_path):
    samples = [
        Sample("a", str(tmp_path / "v" / "a.mp4"), Q_FWD, OPTIONS, "B", "direction", "forward", pair_id="b"),
        Sample(
            "b", str(tmp_path / "v" / "a.mp4"), Q_REV, OPTIONS, "D", "direction", "reverse", pair_id="a", solution="s"
        ),
    ]
    write_plain_jsonl(samples, tmp_path / "plain.jsonl")
    assert json.loads((tmp_path / "plain.jsonl").read_text().splitlines()[0])["video"] == "v/a.mp4"
    assert read_plain_jsonl(tmp_path / "plain.jsonl").samples == samples
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        "\n".join(
            [
                "[1, 2",
                json.dumps({"video": "a.mp4", "question": Q_FWD, "answer": "A"}),
                json.dumps({"video": "a.mp4", "question": Q_FWD, "options": ["A. x", "B. y"], "answer": "y"}),
                json.dumps({"id": "z", "video": "a.mp4", "question": Q_FWD, "options": ["A. x"], "answer": "Q"}),
            ]
        )
    )
    result = read_plain_jsonl(bad)
    assert [s.answer for s in result.samples] == ["B"]  # inferred task/direction, text answer
    assert result.samples[0].task == "direction" and result.samples[0].direction == "forward"
    reasons = {e.sample_id: e.reason for e in result.skipped}
    assert reasons["bad:1"].startswith("invalid JSON") and reasons["bad:2"] == "no options"
    assert "not among the options" in reasons["z"]


def test_plain_jsonl_takes_any_task_name_and_no_direction(tmp_path):
    """Another video question set need not pretend to be Ego-ST: its own task names, no direction."""
    path = tmp_path / "own.jsonl"
    rows = [
        {
            "video": "a.mp4",
            "question": "Which way does the ball roll?",
            "options": ["left", "right"],
            "answer": "right",
            "task": "motion",
        },
        {"video": "b.mp4", "question": "How many cars pass?", "options": ["A. one", "B. two"], "answer": "A"},
        {"video": "c.mp4", "question": Q_REV, "options": OPTIONS, "answer": "B"},
        {"video": "d.mp4", "question": "q", "options": OPTIONS, "answer": "B", "direction": "sideways"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_plain_jsonl(path)
    got = [(s.task, s.direction, s.answer) for s in result.samples]
    assert got == [("motion", None, "B"), ("other", None, "A"), ("direction", "reverse", "B")]
    assert [e.sample_id for e in result.skipped] == ["own:4"] and "sideways" in result.skipped[0].reason


def test_every_other_field_of_a_record_is_kept_as_a_column(tmp_path):
    """A training row's fields the reader does not use reach `Sample.extra` in both formats (None where a row of
    the file lacks one, as a dataset column); they survive a plain round trip; a reward's own argument name is
    refused in one line."""
    rows = [
        {"video": "a.mp4", "question": Q_FWD, "options": OPTIONS, "answer": "B", "difficulty": 3},
        {"video": "b.mp4", "question": Q_FWD, "options": OPTIONS, "answer": "A", "expected_turns": ["left", "right"]},
        {"video": "c.mp4", "question": Q_FWD, "options": OPTIONS, "answer": "A", "completions": 1},
    ]
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = read_plain_jsonl(path)
    assert [s.extra for s in result.samples] == [
        {"difficulty": 3, "expected_turns": None},
        {"difficulty": None, "expected_turns": ["left", "right"]},
    ]
    assert "'completions' is a reward function's own argument" in result.skipped[0].reason
    write_plain_jsonl(result.samples, tmp_path / "again.jsonl")
    assert read_plain_jsonl(tmp_path / "again.jsonl").samples == result.samples

    st_r1 = tmp_path / "rows.jsonl"
    st_r1.write_text(json.dumps({**json.loads(st_row(f"{Q_FWD} Options: A. x, B. y", "A")), "source": "walk 7"}))
    assert read_st_r1_jsonl(st_r1).samples[0].extra == {"source": "walk 7"}


def test_the_readme_tables_name_every_field_and_its_examples_read(tmp_path):
    """README "Your own data": a table per format naming every field the readers take, and each format's example
    read by its reader without a skip (the plain example is also run whole by tests/test_own_data.py)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Your own data") : readme.index("## What happens when things go wrong")]

    def after(title: str) -> tuple[set[str], str]:
        """The backticked names in the first column of the table after `title`, and its example."""
        text = section[section.index(title) :]
        table = text[text.index("| field") : text.index("\n\n", text.index("| field"))]
        names = {name for row in re.findall(r"^\| ([^|]+)\|", table, re.M) for name in re.findall(r"`(\w+)`", row)}
        return names, re.search(r"```json\n(.*?)```", text, re.S).group(1)

    plain, example = after("**Plain JSONL**")
    assert plain == set(FIELDS)
    (tmp_path / "plain.jsonl").write_text(example)
    result = read_plain_jsonl(tmp_path / "plain.jsonl")
    assert len(result.samples) == 2 and not result.skipped and result.samples[1].extra == {"difficulty": 3}

    st_r1, example = after("**ST-R1 JSONL**")
    assert st_r1 >= {"video", "problem", "solution", "original_answer"}
    (tmp_path / "st_r1.jsonl").write_text(example)
    result = read_st_r1_jsonl(tmp_path / "st_r1.jsonl")
    assert [(s.answer, s.task, s.direction) for s in result.samples] == [("B", "direction", "forward")]

    egost, example = after("**Ego-ST Bench MCQ JSON**")
    assert egost >= {"video", "forward_mcq", "reverse_mcq", "question", "options", *ANSWER_FIELDS}
    result = read_egost_mcq(write_json(tmp_path / "Part1_forward_mcq.json", json.loads(example)))
    assert [(s.answer, s.task, s.direction) for s in result.samples] == [("B", "direction", "forward")]


def test_split_problem_keeps_letters_in_order():
    q, opts = split_problem("Q? Options: A. a, B. b, with C. inside, C. c\n\nInstructions: ...")
    assert q == "Q?" and opts == ["A. a", "B. b, with C. inside", "C. c"]


@pytest.mark.skipif(not RELEASE.exists(), reason=f"released rows not found at {RELEASE} (shared/ folder absent)")
def test_release_630_rows_load():
    result = read_st_r1_jsonl(RELEASE)
    rows = [json.loads(line) for line in RELEASE.read_text().splitlines()]
    assert len(result.samples) == 630 and not result.skipped
    for sample, row in zip(result.samples, rows):
        assert sample.answer == row["original_answer"]
        assert sample.answer in [o[0] for o in sample.options]
        assert sample.problem == row["problem"] and sample.solution == row["solution"]
        assert sample.extra == {k: row[k] for k in ("original_question", "original_answer")}  # columns for rewards
    # Task from the question wording; the notes report 287/263/80, the wording gives 286/264/80.
    assert Counter(s.task for s in result.samples) == {"direction": 286, "landmark": 264, "action": 80}
    assert Counter(s.direction for s in result.samples) == {"forward": 315, "reverse": 315}
    assert Counter(len(s.options) for s in result.samples) == {4: 511, 3: 102, 2: 16, 1: 1}
    paired = [s for s in result.samples if s.pair_id]
    by_id = {s.id: s for s in result.samples}
    assert len(paired) == 412
    assert all(by_id[s.pair_id].pair_id == s.id and by_id[s.pair_id].video == s.video for s in paired)
