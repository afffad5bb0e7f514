"""Readers for the three MCQ formats we train and evaluate on, all producing one `Sample` type.

- Ego-ST Bench MCQ files (`Part{k}_{forward,reverse}_mcq[_landmark|_action].json`): a JSON object keyed
  by sample id; each record names a video in the part's folder and holds `forward_mcq` and/or
  `reverse_mcq` with question, options and an answer field (`answer`, `gt`, `label` or
  `correct_answer`; a letter or the option's text).
- ST-R1 training rows (JSONL with problem, solution, video, ...): options and answer are parsed out
  of the problem and solution text.
- Our plain JSONL: video, question, options, answer (and optional id, task, direction, pair_id,
  solution, problem). `task` may be any name; `direction` is optional. The README's "Your own data"
  tables list every field and which stage needs it.

Every other field of a training row (plain or ST-R1) is kept in `Sample.extra`, so reward functions get it
as a column of its own, as TRL passes every dataset column (`stjax.train.rewards.columns`); a row lacking a
field other rows of its file have holds None there, as a dataset's column does. The samples stay on the host
(batches carry only their index), so extra values cost nothing in batching or in a resumed run.

A malformed record raises SampleError naming the file and sample. With `strict=False` (the default)
readers skip it and keep the error in `ReadResult.skipped`, so one bad row never stops a run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stjax.data.video import SampleError
from stjax.io import write_text_atomic

# The tasks whose wording `infer_task` knows (colour, walls: the synthetic set only); a plain JSONL row may
# name any other task.
TASKS = ("direction", "landmark", "action", "colour", "walls")
EGO_ST_TASKS = TASKS[:3]  # the evaluator's breakdown lists these first, then any other task in the data
OTHER_TASK = "other"  # a plain row's task when it names none and its wording names none of TASKS
DIRECTIONS = ("forward", "reverse")
ANSWER_FIELDS = ("answer", "gt", "label", "correct_answer")
# Ego-ST Bench keeps each part's videos in its own folder.
PART_FOLDERS = {"Part1": "part1", "Part2": "part2", "Part3": "part3_clip", "Part4": "part4_clip"}
MCQ_INSTRUCTION = (
    "\n\nInstructions: Please select the most appropriate answer from the options above and return only the "
    "option number (e.g. A, B, C or D)."
)


@dataclass
class Sample:
    """One multiple-choice question about one video."""

    id: str
    video: str  # path to the video file (it may not exist; reading it is the decoder's job)
    question: str  # the question alone, without options
    options: list[str]  # "A. ...", "B. ...", in order
    answer: str  # the correct letter
    task: str  # direction | landmark | action (| colour, walls: synthetic), or any name a plain JSONL row gives
    direction: str | None  # forward | reverse; None where a plain row gives none and the wording tells none
    pair_id: str | None = None  # id of the same question asked in the opposite direction, when loaded
    solution: str | None = None  # long-CoT target (ST-R1 rows, synthetic set)
    problem: str | None = None  # the release's full user text (question + options + instructions), if any
    extra: dict = field(default_factory=dict)  # the record's other fields (see the module docstring)


FIELDS = tuple(f.name for f in dataclasses.fields(Sample) if f.name != "extra")  # a record's own names for them
# The reward functions' own arguments (`stjax.train.rewards`): a record field may not take these names.
RESERVED_FIELDS = ("prompts", "completions")


def extra_fields(record: dict) -> dict:
    """The fields of `record` that are not Sample fields (a ValueError for one with a reserved name)."""
    extra = {k: v for k, v in record.items() if k not in FIELDS}
    clash = [k for k in extra if k in RESERVED_FIELDS]
    if clash:
        raise ValueError(f"field {clash[0]!r} is a reward function's own argument: rename it")
    return extra


@dataclass
class ReadResult:
    samples: list[Sample] = field(default_factory=list)
    skipped: list[SampleError] = field(default_factory=list)

    def reasons(self) -> Counter:
        """How many records were skipped for each reason."""
        return Counter(e.reason for e in self.skipped)


def release_problem(question: str, options: list[str]) -> str:
    """The release's `problem` text: question, comma-joined options on one line, then the instruction."""
    return question + " Options: " + ", ".join(options) + MCQ_INSTRUCTION


def infer_task(text: str) -> str:
    """direction / landmark / action from the question wording (Ego-ST and ST-R1 phrasing), or the
    synthetic set's colour questions (the landmark one names a landmark too)."""
    lower = text.lower()
    for task, word in (
        ("walls", "colour were the walls"),
        ("colour", "what colour"),
        ("direction", "direction"),
        ("landmark", "landmark"),
        ("action", "action"),
    ):
        if word in lower:
            return task
    raise ValueError("cannot tell the task (direction / landmark / action) from the question")


def infer_direction(text: str) -> str:
    """forward ("... to your destination") or reverse ("... to the starting point")."""
    lower = text.lower()
    if "destination" in lower:
        return "forward"
    if "starting point" in lower or "start point" in lower:
        return "reverse"
    raise ValueError("cannot tell forward from reverse in the question")


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*")


def normalize_options(options: object) -> list[str]:
    """Options as "A. text" in letter order; unlettered options get letters in order."""
    if not isinstance(options, list) or not options:
        raise ValueError("no options")
    out = []
    for i, opt in enumerate(options):
        if not isinstance(opt, str) or not opt.strip():
            raise ValueError(f"option {i} is empty or not text")
        letter = chr(ord("A") + i)
        match = _OPTION_PREFIX.match(opt)
        if match and match.group(1) != letter:
            raise ValueError(f"option {i} is lettered {match.group(1)!r}, expected {letter!r}")
        text = opt[match.end() :] if match else opt
        out.append(f"{letter}. {text.strip()}")
    return out


def parse_answer(raw: object, options: list[str]) -> str:
    """The answer letter from a letter ("B", "B.", "(B)", "B. text") or the option's text."""
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError(f"answer {raw!r} is not text")
    letters = [o[0] for o in options]
    texts = [o[3:].strip().lower() for o in options]
    text = raw.strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    match = _OPTION_PREFIX.match(text)
    if match and match.group(1) in letters:
        rest = text[match.end() :].strip().lower()
        if not rest or rest == texts[letters.index(match.group(1))]:
            return match.group(1)
    if text.lower() in texts:
        return letters[texts.index(text.lower())]
    raise ValueError(f"answer {raw!r} is not among the options {letters}")


def same_columns(samples: list[Sample]) -> None:
    """Give every sample each extra field any of them has (None where its record lacks it): a file's fields
    are columns, as a dataset's, so a reward function gets the same arguments whichever rows a batch holds."""
    names = dict.fromkeys(k for s in samples for k in s.extra)
    if any(len(s.extra) != len(names) for s in samples):
        for s in samples:
            s.extra = {k: s.extra.get(k) for k in names}


def link_pairs(samples: list[Sample], key: Callable[[Sample], object]) -> None:
    """Set pair_id where a group (same `key`) holds exactly one forward and one reverse question."""
    groups: dict[object, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[key(s)].append(s)
    for group in groups.values():
        forward = [s for s in group if s.direction == "forward"]
        reverse = [s for s in group if s.direction == "reverse"]
        if len(forward) == 1 and len(reverse) == 1:
            forward[0].pair_id, reverse[0].pair_id = reverse[0].id, forward[0].id


def _collect(result: ReadResult, error: SampleError, strict: bool) -> None:
    if strict:
        raise error
    result.skipped.append(error)


def _egost_task(stem: str) -> str:
    if stem.endswith("_mcq_landmark"):
        return "landmark"
    if stem.endswith("_mcq_action"):
        return "action"
    if stem.endswith("_mcq_colour"):
        return "colour"
    if stem.endswith("_mcq_walls"):
        return "walls"
    if stem.endswith("_mcq"):
        return "direction"
    raise ValueError(f"not an Ego-ST MCQ file name: {stem}")


def read_egost_mcq(path: str | Path, video_dir: str | Path | None = None, strict: bool = False) -> ReadResult:
    """One Ego-ST Bench MCQ file. Videos resolve to `video_dir` or the part's folder beside the file.

    Ids are `{part}_{task}:{key}:{direction}`, the same for a record's forward and reverse questions
    whichever file they come from, so `read_egost_dir` can link pairs across files.
    """
    path = Path(path)
    result = ReadResult()
    part = path.stem.split("_")[0]
    task = _egost_task(path.stem)
    if video_dir is None:
        video_dir = path.parent / PART_FOLDERS.get(part, part.lower())
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, dict):
            raise ValueError("top level is not an object keyed by sample id")
    except (OSError, ValueError) as e:
        _collect(result, SampleError(f"unreadable MCQ file: {e}", path=str(path)), strict)
        return result
    for key, record in records.items():
        for direction in DIRECTIONS:
            sample_id = f"{part}_{task}:{key}:{direction}"
            try:
                if not isinstance(record, dict):
                    raise ValueError("record is not an object")
                mcq = record.get(f"{direction}_mcq")
                if mcq is None:
                    continue
                options = normalize_options(mcq.get("options"))
                raw = next((mcq[f] for f in ANSWER_FIELDS if f in mcq), None)
                if raw is None:
                    raise ValueError(f"no answer field (looked for {', '.join(ANSWER_FIELDS)})")
                if not isinstance(record.get("video"), str):
                    raise ValueError("no video file name")
                result.samples.append(
                    Sample(
                        id=sample_id,
                        video=str(Path(video_dir) / record["video"]),
                        question=str(mcq["question"]),
                        options=options,
                        answer=parse_answer(raw, options),
                        task=task,
                        direction=direction,
                    )
                )
            except (KeyError, ValueError) as e:
                _collect(result, SampleError(str(e), sample_id=sample_id, path=str(path)), strict)
    link_pairs(result.samples, key=lambda s: s.id.rsplit(":", 1)[0])
    return result


def read_egost_dir(root: str | Path, strict: bool = False) -> ReadResult:
    """Every `*_mcq*.json` file under root (videos in each part's folder), pairs linked across files."""
    result = ReadResult()
    for path in sorted(Path(root).glob("*_mcq*.json")):
        part = read_egost_mcq(path, strict=strict)
        result.samples += part.samples
        result.skipped += part.skipped
    # A record's forward and reverse questions may come from two files: link them again over all.
    for s in result.samples:
        s.pair_id = None
    link_pairs(result.samples, key=lambda s: s.id.rsplit(":", 1)[0])
    return result


def _jsonl_rows(path: Path, result: ReadResult, strict: bool):
    """(line number, row dict) for each parseable line; bad lines become SampleErrors."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        _collect(result, SampleError(f"unreadable file: {e}", path=str(path)), strict)
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("row is not an object")
        except ValueError as e:
            _collect(
                result, SampleError(f"invalid JSON: {e}", sample_id=f"{path.stem}:{number}", path=str(path)), strict
            )
            continue
        yield number, row


def _resolve_video(video: str, base: Path, video_root: str | Path | None) -> str:
    """Relative paths are relative to the data file; with video_root, only the file name is kept."""
    if video_root is not None:
        return str(Path(video_root) / Path(video).name)
    return str(base / video)


def split_problem(problem: str) -> tuple[str, list[str]]:
    """Question and options from a release `problem`: "<question> Options: A. x, B. y\\n\\nInstructions: ...".

    Options are split at ", B. ", ", C. ", ... in letter order, so commas inside an option are kept.
    """
    if "Options:" not in problem:
        raise ValueError("no options in the problem text")
    question, rest = problem.split("Options:", 1)
    rest = rest.split("\n\nInstructions", 1)[0].strip()
    if not rest.startswith("A. "):
        raise ValueError("no options in the problem text")
    options, start = [], 3
    for letter in "BCDEFGHIJ":
        cut = rest.find(f", {letter}. ", start)
        if cut < 0:
            break
        options.append(rest[start:cut])
        start = cut + 4
    options.append(rest[start:])
    return question.rstrip(), [f"{chr(ord('A') + i)}. {o.strip()}" for i, o in enumerate(options)]


_SOLUTION_ANSWER = re.compile(r"<answer>\s*([A-Z])\b")


def read_st_r1_jsonl(path: str | Path, video_root: str | Path | None = None, strict: bool = False) -> ReadResult:
    """ST-R1 rows; the answer comes from the solution's <answer> tag (or `original_answer`).

    Ids are `{file stem}:{line}`. Pairs are linked where a video has exactly one forward and one
    reverse question of the same task.
    """
    path = Path(path)
    result = ReadResult()
    for number, row in _jsonl_rows(path, result, strict):
        sample_id = f"{path.stem}:{number}"
        try:
            problem = row["problem"]
            question, options = split_problem(problem)
            match = _SOLUTION_ANSWER.search(row.get("solution") or "")
            raw = match.group(1) if match else row.get("original_answer")
            if raw is None:
                raise ValueError("no answer in the solution or original_answer")
            result.samples.append(
                Sample(
                    id=sample_id,
                    video=_resolve_video(row["video"], path.parent, video_root),
                    question=question,
                    options=options,
                    answer=parse_answer(raw, options),
                    task=infer_task(question),
                    direction=infer_direction(question),
                    solution=row.get("solution"),
                    problem=problem,
                    extra=extra_fields(row),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            _collect(result, SampleError(str(e), sample_id=sample_id, path=str(path)), strict)
    link_pairs(result.samples, key=lambda s: (s.video, s.task))
    same_columns(result.samples)
    return result


def _inferred(infer: Callable[[str], str], question: str, default: str | None) -> str | None:
    """What `infer` tells from the question's wording, else `default`."""
    try:
        return infer(question)
    except ValueError:
        return default


def read_plain_jsonl(path: str | Path, video_root: str | Path | None = None, strict: bool = False) -> ReadResult:
    """Our JSONL: video, question, options, answer required. An absent task is inferred from Ego-ST's wording
    (else `OTHER_TASK`), an absent direction likewise (else None); any task name is accepted; any other
    field is kept in `extra`."""
    path = Path(path)
    result = ReadResult()
    for number, row in _jsonl_rows(path, result, strict):
        sample_id = str(row.get("id", f"{path.stem}:{number}"))
        try:
            options = normalize_options(row.get("options"))
            question = row["question"]
            task = row.get("task") or _inferred(infer_task, question, OTHER_TASK)
            direction = row.get("direction") or _inferred(infer_direction, question, None)
            if not isinstance(task, str) or direction not in (*DIRECTIONS, None):
                raise ValueError(
                    f"task {task!r} is not text or direction {direction!r} is not one of {', '.join(DIRECTIONS)}"
                )
            result.samples.append(
                Sample(
                    id=sample_id,
                    video=_resolve_video(row["video"], path.parent, video_root),
                    question=question,
                    options=options,
                    answer=parse_answer(row.get("answer"), options),
                    task=task,
                    direction=direction,
                    pair_id=row.get("pair_id"),
                    solution=row.get("solution"),
                    problem=row.get("problem"),
                    extra=extra_fields(row),
                )
            )
        except (KeyError, TypeError, ValueError) as e:
            _collect(result, SampleError(str(e), sample_id=sample_id, path=str(path)), strict)
    same_columns(result.samples)
    return result


def write_plain_jsonl(samples: list[Sample], path: str | Path) -> None:
    """Write samples in our plain format, video paths relative to the file when they lie below it; the file
    appears whole or not at all (a killed writer leaves no cut file that a rerun would take as complete)."""
    path = Path(path)
    rows = []
    for s in samples:
        video = Path(s.video)
        if video.is_relative_to(path.parent):
            video = video.relative_to(path.parent)
        own = {n: getattr(s, n) for n in FIELDS if getattr(s, n) is not None}
        rows.append(json.dumps(s.extra | own | {"video": str(video)}, ensure_ascii=False) + "\n")
    write_text_atomic(path, "".join(rows))
