"""Output directories that are never seen half-written, and a lock that keeps two runs out of one.

`atomic_dir` is how every writer of a model directory (the converters, `save_hf` / `save_stjax`,
the trainer's export) makes its output: it builds it in a hidden sibling, `.<name>.partial-<pid>`
(same file system, so the final rename is atomic), and puts it in place only when complete. A
process killed while writing leaves the target as it was (or absent) and a partial sibling that the
next writer removes. A target that already holds files is refused unless `overwrite`, which replaces
it whole (an atomic swap where the kernel offers one), never file by file.

`write_text_atomic` does the same for one small file (a summary, a run's settings).

`DirectoryLock` is an advisory lock (flock) on `<dir>/.lock`: the kernel drops it when its process
dies, however it dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h


class OutputError(ValueError):
    """An output directory that cannot be written as asked (occupied, locked, not a directory)."""


def check_target(target: str | Path, overwrite: bool = False) -> None:
    """Refuse a target that is a file, or a directory holding files when not `overwrite`."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file, not a directory")
    if not overwrite and target.is_dir():
        names = sorted(p.name for p in target.iterdir())
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise OutputError(f"{target} already holds files ({shown}); pass --overwrite to replace it whole, "
                              "or choose another directory")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(target: Path) -> None:
    """Delete the partial outputs (and set-aside old ones) of writers of `target` that are dead."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-(\d+)")
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not _alive(int(match.group(2))):
            shutil.rmtree(sibling, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot swap {a} and {b}: {os.strerror(ctypes.get_errno())}")


def _put_in_place(partial: Path, target: Path) -> None:
    if not target.exists():
        os.rename(partial, target)
        return
    if not any(target.iterdir()):
        os.rename(partial, target)  # POSIX rename replaces an empty directory
        return
    if _exchange(partial, target):  # the target is old or new at every instant
        shutil.rmtree(partial)  # now the old output
        return
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    os.rename(target, old)  # a kill right here leaves the target absent, never mixed
    os.rename(partial, target)
    shutil.rmtree(old)


@contextlib.contextmanager
def atomic_dir(target: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty directory to write into; on success it becomes `target`, on failure it is removed."""
    target = Path(target).absolute()
    check_target(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    partial = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        yield partial
        check_target(target, overwrite)  # someone may have written there meanwhile
        _put_in_place(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


class DirectoryLock:
    """Hold `<directory>/.lock` for the life of a run; another process is refused in one line.

    Within one process a new lock on the same directory takes over the old one (a run that raised
    may still hold its lock through the traceback)."""

    _held: dict[Path, "DirectoryLock"] = {}

    def __init__(self, directory: str | Path, what: str = "run"):
        self.path = (Path(directory) / ".lock").absolute()
        self.what = what
        self.handle = None

    def acquire(self) -> "DirectoryLock":
        if self.path in DirectoryLock._held:
            DirectoryLock._held[self.path].release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise OutputError(f"{self.path.parent} is in use by another {self.what} (pid {holder}); "
                              "wait for it to end or use another directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle
        DirectoryLock._held[self.path] = self
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None
            DirectoryLock._held.pop(self.path, None)

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small file beside `path` and rename it into place: readers see the old or the new text."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_text(text)
    os.replace(partial, path)


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
