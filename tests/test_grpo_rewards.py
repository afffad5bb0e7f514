"""GRPO rewards: the release's accuracy rule, the format rule, reverse thinking with its gold from
the record, users' own functions by dotted path, and strange completions: each gets a defined
reward, a function that raises is counted and scores 0, and scoring goes on."""

import json
import math

import numpy as np
import pytest

from stjax.data.formats import Sample, read_plain_jsonl
from stjax.train import rewards

SOLUTION = (
    "<think>Let's start by thinking reverse which landmarks (objects or scenery changes) did you pass by to "
    "return to the starting point?['toy birdhouse'] And then think about which landmarks (objects or scenery "
    "changes) did you pass by to reach your destination? Hence, the correct answer is A</think> <answer>A</answer>"
)


def sample(answer="B", solution=SOLUTION, sample_id="s0"):
    return Sample(
        id=sample_id,
        video="v.mp4",
        question="Which way?",
        answer=answer,
        task="landmark",
        direction="forward",
        options=["A. left", "B. right", "C. back", "D. up"],
        solution=solution,
    )


STRANGE = {
    "empty": "",
    "no tags": "B is my answer",
    "nested": "<think><think>x</think></think><answer><answer>B</answer></answer>",
    "repeated": "<think>a</think><answer>C</answer><think>b</think><answer>B</answer>",
    "unclosed": "<think>long<answer>B",
    "huge": "<think>" + "go left " * 1250 + "</think><answer>B</answer>",  # 10,000+ characters
}


def test_accuracy_follows_the_release_rule():
    """The first character inside the first <answer>...</answer>, compared with the gold letter."""
    texts = [
        "<think>x</think><answer>B</answer>",
        "<answer> B. right</answer>",
        "<answer>b</answer>",
        "<answer>C</answer><answer>B</answer>",
        "B",
        "<answer></answer>",
        "<answer>\nB\n</answer>",
    ]
    got = rewards.accuracy(texts, answer=["B"] * len(texts), options=[sample().options] * len(texts))
    assert got == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_accuracy_with_the_evaluators_extractor():
    texts = ["<answer>the answer is (B)</answer>", "<answer>right</answer>", "<answer>C</answer>"]
    got = rewards.accuracy(texts, answer=["B"] * 3, options=[sample().options] * 3, rule="default")
    assert got == [1.0, 1.0, 0.0]


def test_format_is_think_then_answer():
    texts = [
        "<think>a\nb</think>\n<answer>B</answer>",
        " <think>a</think><answer>B</answer> \n",
        "<answer>B</answer>",
        "<think>a</think>",
        "<think>a</think> text <answer>B</answer>",
        "<answer>B</answer><think>a</think>",
        "<think>a</think>b</think><answer>B</answer>",
        "<think>a</think><answer>B</answer>b</answer>",
    ]
    assert rewards.format_reward(texts) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_reverse_thinking_credits_the_opposite_answer_from_the_records_solution():
    assert rewards.opposite_answer(SOLUTION) == "toy birdhouse"
    right = SOLUTION.replace("is A", "is B").replace(">A<", ">B<")  # the asked answer differs; the opposite is right
    wrong = SOLUTION.replace("'toy birdhouse'", "'rusty swingset'")
    cut = "<think>Let's start by thinking reverse which landmarks did you pass? toy birdhouse. And then"
    texts = [right, wrong, cut, "<think>no template</think><answer>B</answer>", ""]
    got = rewards.reverse_thinking(texts, solution=[SOLUTION] * len(texts))
    assert got == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert rewards.reverse_thinking(["x"], solution=[None]) == [None]  # no gold: the reward does not apply
    # the template counts inside <think> only: after </think> (in the answer) it scores nothing
    after = "<think>nothing here</think><answer>" + right.split("<think>")[1].split("</think>")[0] + "</answer>"
    assert rewards.reverse_thinking([after], solution=[SOLUTION]) == [0.0]


def test_the_synthetic_sets_solutions_carry_the_gold(tmp_path):
    from stjax.data.synthetic import Question, reverse_thinking_solution

    asked = Question("direction", "forward", "q?", ["A. a"], "A", "turn left, then go straight")
    opposite = Question("direction", "reverse", "q?", ["A. a"], "A", "turn around, then turn right")
    assert rewards.opposite_answer(reverse_thinking_solution(asked, opposite)) == "turn around then turn right"


def raises_on_b(completions, **_):
    """A user's reward that fails on some completions (for the dotted-path test)."""
    return [1.0 / (c.count("B") == 0) for c in completions]


def distinct_characters(completions, **_):
    """A user's reward that tells random completions apart (for the run tests: advantages that are
    not all zero, so the loss and its gradient carry the completions)."""
    return [len(set(c)) / 10.0 for c in completions]


def raises_on_odd_length(completions, **_):
    """A user's reward that fails on about half of all completions (for the run test)."""
    return [1.0 / (len(c) % 2 == 0) for c in completions]


def test_a_users_function_by_dotted_path_and_one_that_raises_is_counted_and_scores_zero():
    fn = rewards.resolve("test_grpo_rewards.raises_on_b")
    texts = ["A", "B", "C"]
    scores = rewards.score([fn, rewards.resolve("accuracy")], ["p"] * 3, texts, [sample()] * 3)
    np.testing.assert_array_equal(scores.values[:, 0], [1.0, 0.0, 1.0])
    assert scores.errors.tolist() == [1, 0]
    with pytest.raises(ValueError, match="no_such_function"):
        rewards.resolve("test_grpo_rewards.no_such_function")


@pytest.mark.parametrize("kind", list(STRANGE))
def test_strange_completions_get_defined_rewards(kind):
    text = STRANGE[kind]
    funcs = [rewards.resolve(n) for n in ("accuracy", "format", "reverse_thinking")]
    scores = rewards.score(funcs, ["p"], [text], [sample()])
    assert scores.errors.tolist() == [0, 0, 0]
    assert all(v in (0.0, 1.0) for v in scores.values[0])
    expected_accuracy = {"empty": 0, "no tags": 0, "nested": 0, "repeated": 0, "unclosed": 0, "huge": 1}[kind]
    assert scores.values[0, 0] == expected_accuracy
    assert scores.values[0, 1] == (1.0 if kind == "huge" else 0.0)
    if kind == "huge":
        assert len(text) > 10_000


def test_none_means_does_not_apply():
    scores = rewards.score([rewards.resolve("reverse_thinking")], ["p"], ["x"], [sample(solution=None)])
    assert math.isnan(scores.values[0, 0])


def test_collapse_watch_reads_think_length_and_answer_letter():
    """The per-step collapse watch: words inside <think>, and the release's answer letter (first character
    inside <answer>)."""
    completions = [
        "<think>Let's start by thinking reverse. Sky</think> <answer>B</answer>",
        "<think></think><answer> D. Sky</answer>",
        "Let D <answer></answer>",
        "B",
    ]
    assert [rewards.think_words(c) for c in completions] == [6, 0, 0, 0]
    assert [rewards.answer_letter(c) for c in completions] == ["B", "D", "", None]


def test_a_reward_named_by_file_sees_every_field_of_the_record(tmp_path):
    """`path/to/rewards.py:function` needs no PYTHONPATH; the function gets every field of the record as
    a column, as TRL passes every dataset column (here `video` and `problem`, beyond the seven it got before)."""
    file = tmp_path / "my_rewards.py"
    file.write_text(
        "def by_video(completions, video, problem, **_):\n"
        "    return [float(v == 'b.mp4') + (p is not None) for v, p in zip(video, problem)]\n"
    )
    fn = rewards.resolve(f"{file}:by_video")
    records = [sample(), Sample(**{**vars(sample()), "video": "b.mp4", "problem": "Which way? A. left"})]
    scores = rewards.score([fn], ["p"] * 2, ["x", "y"], records)
    assert scores.values[:, 0].tolist() == [0.0, 2.0] and scores.errors.tolist() == [0]
    assert set(rewards.columns(records)) >= {
        "id",
        "video",
        "question",
        "options",
        "answer",
        "task",
        "direction",
        "pair_id",
        "solution",
        "problem",
    }
    with pytest.raises(ValueError, match="no file"):
        rewards.resolve(f"{tmp_path / 'missing.py'}:by_video")
    with pytest.raises(ValueError, match="no_such_function"):
        rewards.resolve(f"{file}:no_such_function")


def test_a_reward_reads_a_column_of_the_users_own_from_the_data_file(tmp_path):
    """TRL passes every dataset column: a JSONL row's own field (`difficulty`, `expected_turns`) reaches a reward
    named by file as a column of its name, None where a row lacks it."""
    rows = [
        {"video": "a.mp4", "question": "q", "options": ["x", "y"], "answer": "A", "difficulty": 1},
        {"video": "b.mp4", "question": "q", "options": ["x", "y"], "answer": "B", "difficulty": 3},
        {"video": "c.mp4", "question": "q", "options": ["x", "y"], "answer": "B", "expected_turns": ["left"]},
    ]
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    file = tmp_path / "own_rewards.py"
    file.write_text(
        "def by_difficulty(completions, difficulty, expected_turns, **_):\n"
        "    return [len(c) * (d or 0.5) + len(t or ()) for c, d, t in zip(completions, difficulty, expected_turns)]\n"
    )
    records = read_plain_jsonl(data).samples
    scores = rewards.score([rewards.resolve(f"{file}:by_difficulty")], ["p"] * 3, ["ab", "abc", "abcd"], records)
    assert scores.values[:, 0].tolist() == [2.0, 9.0, 3.0] and scores.errors.tolist() == [0]
