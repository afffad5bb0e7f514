"""Synthetic walks: answers checked against the scene geometry, determinism, readers, tokenizer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from stjax.data.formats import read_egost_dir, read_plain_jsonl, read_st_r1_jsonl
from stjax.data.synthetic import (
    WALLS,
    RenderConfig,
    camera_path,
    generate,
    make_walk,
    render,
    rgb_to_yuv420p,
    write_video,
)
from stjax.data.tokenizer import SPECIAL_TOKENS, special_token_ids
from stjax.data.video import decord

N = 3
REPO = Path(__file__).resolve().parents[1]
# The release's long-CoT template (see shared/notes/st-r1-recipe.md).
TEMPLATE = re.compile(
    r"^<think>Let's start by thinking (reverse|forward) (.+?)\? (.+) And then think about (.+?)\? "
    r"Hence, the correct answer is ([A-D])</think> <answer>([A-D])</answer>$"
)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "a", n=N, seed=7, sheet=1)


def turns_along(points: list[tuple[float, float]]) -> list[str]:
    """Left/right at each interior waypoint from the sign of the 2D cross product (y points north)."""
    p = np.asarray(points, float)
    a, b = p[1:-1] - p[:-2], p[2:] - p[1:-1]
    return ["left" if x1 * y2 - y1 * x2 > 0 else "right" for (x1, y1), (x2, y2) in zip(a, b)]


def arc_position(points: list[tuple[float, float]], q: tuple[float, float]) -> float:
    """Distance along the route of the route point closest to q."""
    p, q = np.asarray(points, float), np.asarray(q, float)
    best, done = (np.inf, 0.0), 0.0
    for a, b in zip(p[:-1], p[1:]):
        seg = b - a
        t = np.clip(np.dot(q - a, seg) / np.dot(seg, seg), 0, 1)
        dist = np.linalg.norm(a + t * seg - q)
        best = min(best, (dist, done + t * np.linalg.norm(seg)))
        done += np.linalg.norm(seg)
    return best[1]


def answer_text(record: dict, direction: str) -> str:
    mcq = record[f"{direction}_mcq"]
    (option,) = [o for o in mcq["options"] if o.startswith(mcq["answer"] + ".")]
    return option[3:]


def test_answers_match_scene_geometry(out):
    files = {p.name: json.loads(p.read_text()) for p in out.glob("Synth_*.json")}
    for i in range(N):
        name = f"walk_{i:04d}"
        scene = json.loads((out / "scenes" / f"{name}.json").read_text())
        points = [tuple(p) for p in scene["waypoints"]]
        grid = np.asarray(scene["grid"])
        # every waypoint and landmark stands on open floor
        for x, y in points + [(lm["x"], lm["y"]) for lm in scene["landmarks"]]:
            assert grid[int(y), int(x)] == 0
        forward = turns_along(points)
        back = turns_along(points[::-1])  # walking the route backwards, computed afresh
        want_fwd = "Go straight" + "".join(f", turn {t}, go straight" for t in forward)
        want_rev = "Turn around, go straight" + "".join(f", turn {t}, go straight" for t in back)
        assert answer_text(files["Synth_forward_mcq.json"][name], "forward") == want_fwd
        assert answer_text(files["Synth_reverse_mcq.json"][name], "reverse") == want_rev
        order = sorted(scene["landmarks"], key=lambda lm: arc_position(points, (lm["x"], lm["y"])))
        names = [lm["name"] for lm in order]
        assert answer_text(files["Synth_forward_mcq_landmark.json"][name], "forward").lower() == ", ".join(names)
        assert answer_text(files["Synth_reverse_mcq_landmark.json"][name], "reverse").lower() == ", ".join(names[::-1])
        # the action answer mentions the landmarks and turns in route order
        action = answer_text(files["Synth_forward_mcq_action.json"][name], "forward").lower()
        events = re.findall(r"turn (?:left|right)|(?:" + "|".join(map(re.escape, names)) + ")", action)
        expected = sorted(
            [(arc_position(points, (lm["x"], lm["y"])), lm["name"]) for lm in order]
            + [(arc_position(points, p), f"turn {t}") for p, t in zip(points[1:-1], forward)]
        )
        assert events == [e for _, e in expected]
        for record in files["Synth_forward_mcq.json"][name], files["Synth_reverse_mcq.json"][name]:
            options = next(v for k, v in record.items() if k.endswith("_mcq"))["options"]
            assert len(options) == 4 and len(set(options)) == 4


# Generates a set in a fresh process, as CI and every training run do.
GENERATE = (
    "import sys; from stjax.data.synthetic import generate; generate(sys.argv[1], n=int(sys.argv[2]), seed=7, sheet=1)"
)


def test_same_seed_gives_identical_bytes(out, tmp_path):
    """The same seed in two more processes gives the same files, byte for byte (issue 14).

    Each process fills fresh heap memory with another value (glibc's MALLOC_PERTURB_), so that a read of
    memory never written (x264's AVX-512 mbtree code did that) changes the output every time, not 1 run in 5.
    """
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert any(str(f).endswith(".mp4") for f in files) and Path("contact_sheet.png") in files
    for perturb in ("85", "170"):
        again = tmp_path / f"perturb{perturb}"
        env = {**os.environ, "MALLOC_PERTURB_": perturb}
        subprocess.run([sys.executable, "-c", GENERATE, str(again), str(N)], check=True, env=env, cwd=REPO)
        assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
        for f in files:
            assert (out / f).read_bytes() == (again / f).read_bytes(), f"{f} differs with MALLOC_PERTURB_={perturb}"
    other = generate(tmp_path / "c", n=1, seed=8, sheet=0)
    assert (other / "synth/walk_0000.mp4").read_bytes() != (out / "synth/walk_0000.mp4").read_bytes()


def test_rgb_to_yuv420p_matches_swscale():
    """Our BT.601 limited-range 4:2:0 against libswscale's (area-averaged chroma): within 1 level."""
    cfg = RenderConfig()
    walk = make_walk(np.random.default_rng(3))
    for pose in camera_path(walk, cfg)[::25]:
        frame = render(walk, pose, cfg)
        ours = rgb_to_yuv420p(frame).astype(np.int64)
        ref = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
            format="yuv420p", interpolation="AREA", dst_colorspace="ITU601", dst_color_range="MPEG"
        )
        assert np.abs(ours - ref.to_ndarray().astype(np.int64)).max() <= 1
    with pytest.raises(ValueError, match="even frame size"):
        rgb_to_yuv420p(np.zeros((3, 4, 3), np.uint8))


@pytest.mark.parametrize("backend", ["pyav", "decord"])
def test_written_video_decodes_close_to_the_frames(tmp_path, backend):
    """Both readers get the rendered frames back: mean error under 2.5 levels, PSNR over 38 dB.

    (The largest error is large, up to ~110 levels, on sharp colour edges: 4:2:0 halves the chroma.)
    """
    if backend == "decord" and decord is None:
        pytest.skip("decord is not installed on this platform")
    cfg = RenderConfig()
    walk = make_walk(np.random.default_rng(3))
    frames = np.stack([render(walk, pose, cfg) for pose in camera_path(walk, cfg)[:30]])
    path = tmp_path / "walk.mp4"
    write_video(list(frames), path, cfg.fps)
    if backend == "decord":
        decoded = decord.VideoReader(str(path), num_threads=1).get_batch(list(range(len(frames)))).asnumpy()
    else:
        with av.open(str(path)) as container:
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == frames.shape
    err = decoded.astype(np.float64) - frames
    assert np.abs(err).mean() < 2.5
    assert 10 * np.log10(255**2 / np.mean(err**2)) > 38


def test_all_formats_load_and_agree(out):
    egost = read_egost_dir(out)
    st = read_st_r1_jsonl(out / "st_r1_synth.jsonl")
    plain = read_plain_jsonl(out / "plain.jsonl")
    for result in (egost, st, plain):
        assert len(result.samples) == 6 * N and not result.skipped
        assert all(s.pair_id for s in result.samples)
        assert all(Path(s.video).exists() for s in result.samples)
    key = lambda s: (Path(s.video).name, s.task, s.direction)  # noqa: E731
    answers = {key(s): s.answer for s in plain.samples}
    assert {key(s): s.answer for s in egost.samples} == answers
    assert {key(s): s.answer for s in st.samples} == answers
    by_id = {s.id: s for s in plain.samples}
    for s in plain.samples:
        m = TEMPLATE.match(s.solution)
        assert m, s.solution
        twin = by_id[s.pair_id]
        assert m.group(1) == ("reverse" if s.direction == "forward" else "forward")
        assert m.group(3) == next(o[3:] for o in twin.options if o[0] == twin.answer)
        assert m.group(5) == m.group(6) == s.answer


def test_tokenizer_loads_offline_with_qwen_specials(out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"), local_files_only=True)
    ids = special_token_ids(tok)
    assert ids["video_token_id"] == tok.convert_tokens_to_ids("<|video_pad|>")
    assert ids["pad_token_id"] == tok.pad_token_id and ids["eos_token_id"] == tok.eos_token_id
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(tok) - 8, len(tok)))
    assert len(tok) <= 3000 + 12
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    s = "<think>turn left</think> <answer>B</answer>"
    assert tok.decode(tok(s)["input_ids"]) == s


def test_gold_letters_are_balanced_in_every_file(out):
    """Every block of 4 walks holds each gold letter once per task and direction, so no file favours a letter."""
    for path in out.glob("Synth_*.json"):
        records = json.loads(path.read_text()).values()
        answers = [next(v for k, v in r.items() if k.endswith("_mcq"))["answer"] for r in records]
        assert len(answers) == N and len(set(answers)) == N, (path.name, answers)


def test_colour_questions_are_answered_by_the_scene(tmp_path):
    """The synthetic colour tasks. colour: both directions' answer is the colour of the landmark nearest the
    start along the route, the wrong options colours no landmark of the walk has. walls: the walls' paint,
    the options every paint in one order. 4 walks hold each gold letter once per file."""
    n = 4
    root = generate(tmp_path / "colour", n=n, seed=3, sheet=0, tasks=("colour", "walls"))
    for task, direction in [(t, d) for t in ("colour", "walls") for d in ("forward", "reverse")]:
        records = json.loads((root / f"Synth_{direction}_mcq_{task}.json").read_text())
        assert sorted(r[f"{direction}_mcq"]["answer"] for r in records.values()) == list("ABCD")
        for name, record in records.items():
            scene = json.loads((root / "scenes" / f"{name}.json").read_text())
            points = [tuple(p) for p in scene["waypoints"]]
            nearest = min(scene["landmarks"], key=lambda lm: arc_position(points, (lm["x"], lm["y"])))
            right = nearest["name"].split()[0] if task == "colour" else scene["wall"]
            assert answer_text(record, direction).lower() == right
            excluded = {lm["name"].split()[0] for lm in scene["landmarks"]} if task == "colour" else {scene["wall"]}
            wrong = [
                o[3:].lower()
                for o in record[f"{direction}_mcq"]["options"]
                if o[0] != record[f"{direction}_mcq"]["answer"]
            ]
            assert len(set(wrong)) == 3 and not excluded & set(wrong)
            if task == "walls":  # the paints in one order: the letter names the paint
                assert [o[3:].lower() for o in record[f"{direction}_mcq"]["options"]] == list(WALLS)
    assert {s.task for s in read_plain_jsonl(root / "plain.jsonl").samples} == {"colour", "walls"}


def test_the_set_is_marked_complete_only_when_it_is(tmp_path, monkeypatch):
    """Runs take `plain.jsonl` as the mark of a rendered set (they reuse it): a render that stops before its
    tokenizer is written leaves no such mark, so the next run renders again."""
    from stjax.data import synthetic

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic, "build_tokenizer", fail)
    with pytest.raises(OSError, match="disk full"):
        generate(tmp_path / "set", n=1, seed=7, sheet=0)
    assert not (tmp_path / "set" / "plain.jsonl").exists()
    assert not any(p.name.startswith(".plain.jsonl") for p in (tmp_path / "set").iterdir())
