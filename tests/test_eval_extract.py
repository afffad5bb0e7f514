"""Answer extraction: a table of tricky replies, each with the letter both rules must give.

Expected values were worked out by hand from the rules (see stjax/eval/extract.py), not by running
the code. Seed rule: the first complete <answer>...</answer> (case-sensitive) else the whole reply,
stripped, then the first of A, B, C, D in it. Options have four letters unless the case says three.
"""

import pytest

from stjax.eval.extract import extract_answer

OPTIONS = ["A. Go straight, turn left", "B. Turn left", "C. Turn right, go straight", "D. Turn around"]
THREE = OPTIONS[:3]

# (reply, default rule, seed rule)
CASES = [
    ("<answer>B</answer>", "B", "B"),
    ("<think>reasoning</think><answer>C</answer>", "C", "C"),
    ("<answer>B.</answer>", "B", "B"),
    ("<answer>(B)</answer>", "B", "B"),
    ("<answer>[C]</answer>", "C", "C"),
    ("<answer>**B**</answer>", "B", "B"),
    ("<answer>\nB\n</answer>", "B", "B"),
    ("<answer>Option B</answer>", "B", "B"),
    ("<answer>Option: B</answer>", "B", "B"),
    ("<answer>B) Turn left</answer>", "B", "B"),
    ("<answer>b) turn left</answer>", "B", None),  # the option, lower case: no capital A-D for the seed
    ("<answer>the answer is b</answer>", "B", None),
    ("<answer>b</answer>", "B", None),
    ("<answer>Turn right, go straight</answer>", "C", None),  # option text without its letter
    ("<answer>go straight, turn left</answer>", "A", None),
    ("<answer>C. Turn right, go straight</answer>", "C", "C"),
    ("<answer>I would turn left</answer>", "B", None),  # only option B's text appears
    ("<answer>Go straight, turn left then turn left</answer>", "A", None),  # B's text lies inside A's
    ("<answer>D", "D", "D"),  # no closing tag: the seed reads the whole reply
    ("<think>It should be B because...</think><answer>B, since", "B", "B"),
    ("<answer>A</answer> On reflection: <answer>D</answer>", "D", "A"),  # seed: the first tag
    ("<think> reasoning process here </think><answer> answer here </answer><answer>D</answer>", "D", None),
    ("<think>Let's think step by step. And then we turn.</think>", None, "A"),  # the "And" trap
    ("Answer: D", "D", "A"),
    ("<answer>Answer: D</answer>", "D", "A"),
    ("The answer is (C).", "C", "C"),
    ("A person walks forward, so the answer is D.", "D", "A"),
    ("I choose option c.", "C", None),
    ("The best choice is A", "A", "A"),
    ("<answer>The correct option is B, turn left</answer>", "B", "B"),
    ("<answer>I think it's B</answer>", "B", "B"),
    ("<ANSWER>c</ANSWER>", "C", "A"),  # the seed's tag match is case-sensitive; "A" from "ANSWER"
    ("<think>The route turns left first.</think> B", "B", "B"),
    ("B", "B", "B"),
    ("d.", "D", None),
    ("<answer>E</answer>", None, None),
    ("<answer></answer>", None, None),
    ("<answer> answer here </answer>", None, None),
    ("<answer>Both A and B</answer>", None, "B"),  # "B" from "Both"
    ("<answer>C or D</answer>", None, "C"),
    ("<answer>a left turn</answer>", None, None),  # the article, not a letter
    ("", None, None),
]


@pytest.mark.parametrize("reply, default, seed", CASES)
def test_extract_table(reply, default, seed):
    assert extract_answer(reply, OPTIONS, "default") == default
    assert extract_answer(reply, OPTIONS, "seed") == seed


def test_letters_outside_the_options_do_not_count_except_for_the_seed_rule():
    assert extract_answer("<answer>D</answer>", THREE) is None
    assert extract_answer("<answer>D</answer>", THREE, "seed") == "D"
    assert extract_answer("<answer>C</answer>", THREE) == "C"


def test_unknown_rule_is_an_error():
    with pytest.raises(ValueError, match="unknown extraction rule"):
        extract_answer("B", OPTIONS, "greedy")
