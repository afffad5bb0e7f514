"""How the command-line tools end on an error: one line naming the file and what is wrong.

A traceback helps whoever debugs stjax, not whoever runs it with a wrong path; `--debug` (every tool
takes it) or the environment variable STJAX_DEBUG=1 brings it back.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=False,
        help="show the full traceback of an error (also: environment STJAX_DEBUG=1)",
    )


def one_line(error: BaseException) -> str:
    """The first line of the error's message; its type where the message alone would not say much."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    if not type(error).__module__.startswith("stjax") or not text:  # ours are full sentences already
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text + (" [...]" if len(lines) > 1 else "")


def quiet_libraries() -> Callable[[], None]:
    """Hold back what libraries' background threads print of a failure that the tool reports in one
    line: orbax's error logs with tracebacks (absl), asyncio's unretrieved task errors, exceptions
    ignored in callbacks (a disk filling up during a checkpoint save prints hundreds of lines).
    Returns the function that lets them through again."""
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    levels, hook = [logger.level for logger in loggers], sys.unraisablehook
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    sys.unraisablehook = lambda unraisable: None

    def restore() -> None:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        sys.unraisablehook = hook

    return restore


def run_cli(main: Callable[[Sequence[str] | None], T], argv: Sequence[str] | None = None) -> T:
    """Call `main(argv)`; an exception ends the process with `error: <one line>` and exit status 1.
    Without --debug, libraries' logs of errors are held back (`quiet_libraries`)."""
    args = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in args or os.environ.get("STJAX_DEBUG", "") not in ("", "0")
    restore = (lambda: None) if debug else quiet_libraries()
    try:
        result = main(argv)
    except Exception as e:
        if debug:
            raise
        # Left held back: the process ends here, and a failed library task (an orbax save's) still
        # reports itself when it is collected, as late as the interpreter's exit.
        hint = "" if "--debug" in one_line(e) else " (--debug for the traceback)"
        print(f"error: {one_line(e)}{hint}", file=sys.stderr)
        raise SystemExit(1) from None
    restore()
    return result
