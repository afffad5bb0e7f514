"""Turn a model's free-text reply into an option letter.

Two rules:

- "seed": the public release's rule, reproduced literally so our numbers can be compared with its
  predictions. Take the text inside the first complete `<answer>...</answer>` (else the whole reply),
  strip it, then the leading letter A-D if it starts with one, else the first of "A", "B", "C", "D"
  found anywhere. It is fragile: "<think>Let's go...</think>" with no tags gives "A" (from "And"
  later on), "Answer: D" gives "A". Where the release returns the text itself (no A-D at all) we
  return None: neither can equal a gold letter.
- "default": reads the last `<answer>` tag (a missing closing tag is fine) and understands "B.",
  "(B)", "Option B", "B) text", "the answer is b", or the option's text instead of its letter.
  Letters outside the sample's options do not count. It returns None rather than guess.
"""

from __future__ import annotations

import re
from typing import Literal

Rule = Literal["default", "seed"]
RULES: tuple[Rule, ...] = ("default", "seed")

# After a letter at the start of the text: the end, or punctuation that closes a letter ("B.", "B)").
_CLOSES_LETTER = ".):]*,-\n"
# "Option B", "Option: B", "(B)", "**B**" at the start; the prefix word lets "Option B is ..." count too.
_LEADING = re.compile(r"^[\s*\"'`(\[]*(?:(option|choice)\s*[:\-]?\s*)?[(\[*]*([A-Za-z])(?![A-Za-z0-9])", re.I)
# "the answer is B", "Answer: (C)", "I choose b.", "the correct option is D", "go with option A".
_PHRASE = re.compile(
    r"(?:answer|(?:correct|right|best) (?:option|choice)|choose|select|pick|go with)"
    r"\s*(?:is|would be|should be|:|-|=)?\s*(?:option|choice)?\s*[(\[*]*([A-Za-z])(?![A-Za-z0-9])",
    re.I,
)
_STANDALONE = re.compile(r"(?<![A-Za-z0-9'])([A-Z])(?![A-Za-z0-9'])")
_ANSWER_OPEN = re.compile(r"<answer>", re.I)
_ANSWER_CLOSE = re.compile(r"</answer>", re.I)
_THINK_CLOSE = re.compile(r"</think>", re.I)
_TAGS = re.compile(r"</?(?:think|answer)>", re.I)
_SEED_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(response: str, options: list[str], rule: Rule = "default") -> str | None:
    """The option letter a reply chose, or None. `options` are "A. text", "B. text", ..."""
    if rule == "seed":
        return seed_extract(response)
    if rule != "default":
        raise ValueError(f"unknown extraction rule {rule!r} (choose from {', '.join(RULES)})")
    letters = [chr(ord("A") + i) for i in range(len(options))]
    texts = [_normalize(o.split(".", 1)[1] if o[:2] == f"{letters[i]}." else o) for i, o in enumerate(options)]

    opens = list(_ANSWER_OPEN.finditer(response))
    if opens:  # the last answer tag is the reply's final word, even when it says nothing usable
        content = response[opens[-1].end() :]
        close = _ANSWER_CLOSE.search(content)
        return _parse(content[: close.start()] if close else content, letters, texts, loose=True)
    thinks = list(_THINK_CLOSE.finditer(response))
    if thinks:  # no answer tag, but the text after the reasoning may hold the answer
        found = _parse(_TAGS.sub(" ", response[thinks[-1].end() :]), letters, texts, loose=True)
        if found:
            return found
    # A whole reply with reasoning in it: only unambiguous forms count, not stray letters or option text.
    return _parse(_TAGS.sub(" ", response), letters, texts, loose=False)


def seed_extract(response: str) -> str | None:
    """The release's rule, literally (see the module docstring)."""
    match = _SEED_ANSWER.search(response)
    text = (match.group(1) if match else response).strip()
    return next((c for c in text if c in "ABCD"), None)


def _normalize(text: str) -> str:
    return " ".join(text.lower().replace("*", " ").split()).strip(" .!\"'`")


def _letter(match: re.Match, group: int, text: str, letters: list[str], strict_tail: bool) -> str | None:
    """The matched letter if it is one of the options and what follows it reads as a letter's end.

    A lower-case letter, or any letter with `strict_tail`, must be followed by the end or closing
    punctuation, so "a left turn" or "A person walks" are not taken for answers.
    """
    letter = match.group(group)
    tail = text[match.end(group) :].lstrip(" \t")
    if (strict_tail or letter.islower()) and tail and tail[0] not in _CLOSES_LETTER:
        return None
    return letter.upper() if letter.upper() in letters else None


def _parse(text: str, letters: list[str], texts: list[str], loose: bool) -> str | None:
    """Forms tried in order, most specific first. `loose` adds option text found inside the text and
    a single stand-alone capital letter, which are safe only in a short final answer."""
    normalized = _normalize(text)
    if not normalized:
        return None
    for letter, option in zip(letters, texts):  # the whole text is one option, with or without its letter
        if normalized in (option, f"{letter.lower()}. {option}", f"{letter.lower()}) {option}"):
            return letter
    leading = _LEADING.match(text)
    if leading:
        found = _letter(leading, 2, text, letters, strict_tail=leading.group(1) is None)
        if found:
            return found
    phrases = [_letter(m, 1, text, letters, strict_tail=False) for m in _PHRASE.finditer(text)]
    phrases = [p for p in phrases if p]
    if phrases:
        return phrases[-1]
    if not loose:
        return None
    hits = [i for i, option in enumerate(texts) if option and option in normalized]
    hits = [i for i in hits if not any(texts[i] != texts[j] and texts[i] in texts[j] for j in hits)]
    if len({texts[i] for i in hits}) == 1:
        return letters[hits[0]]
    standalone = {m.group(1) for m in _STANDALONE.finditer(text)} & set(letters)
    return standalone.pop() if len(standalone) == 1 else None
