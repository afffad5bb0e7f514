"""Where outputs go: local directories or object stores (gs://, s3://), through one path layer.

Every output path (a run's out_dir, the evaluator's --out, an export or converter target) is made by
`as_path`, an `etils.epath.Path` (the layer orbax uses): local paths keep POSIX semantics, `gs://`
and `s3://` URLs go through fsspec (gcsfs, s3fs: the `gcs` extra). A URL whose client is not
installed is refused in one line before any work. What each writer promises, per kind of store:

- `atomic_dir` (model directories: converters, `save_hf` / `save_stjax`, the trainer's export).
  Local: the directory is built in a hidden sibling, `.<name>.partial-<pid>` (same file system),
  every file and the directory fsync'd, then renamed into place (an atomic swap where the kernel
  offers one) and the parent fsync'd: the target is the old output or the new one at every
  instant, also after a power loss. A target that holds files is refused unless `overwrite`,
  which replaces it whole. Object stores have no rename of a directory (a "rename" copies each
  object): the directory is built in a local temporary directory and uploaded object by object
  with `config.json` last (an old target's `config.json` is deleted first), so a reader that
  takes a model directory to exist when its `config.json` does never sees a mix.
- `write_text_atomic` (summary, settings, accuracy). Local: written beside, fsync'd, renamed, the
  directory fsync'd. Object store: one object upload, which the store makes visible whole or not
  at all (it has no partial objects), so the old or new text is read, never a mix.
- `AppendLog` (metrics.jsonl, completions.jsonl, predictions.jsonl): one line at a time. Local:
  appended and flushed (fsync'd when asked). Object stores cannot append to an object: the whole
  text is uploaded again on each write (one atomic object each time).
- `DirectoryLock` (one run per out_dir). Local: an advisory flock on `<dir>/.lock` that the kernel
  drops when its holder dies, however it dies. Object stores have no locks: the lock is an object
  created only if absent (the store's precondition, `ifGenerationMatch=0` on Cloud Storage), which
  names its holder's host and pid and is deleted on release. A holder that died without releasing
  it leaves it behind: on the same host a dead pid's lock is taken over; from another host the
  run is refused with the lock's path, to be deleted by hand once its holder is known gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator

import fsspec
from etils import epath

_RENAME_EXCHANGE = 2  # linux/fs.h
# URL schemes epath routes to fsspec, and the package each needs
_CLIENTS = {"gs": "gcsfs (pip install -e '.[gcs]')", "s3": "s3fs", "az": "adlfs"}


class OutputError(ValueError):
    """An output directory that cannot be written as asked (occupied, locked, not a directory)."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` is an object store URL (gs://, s3://, az://)."""
    return str(path).split("://")[0] in _CLIENTS and "://" in str(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An output path for every writer: local (absolute) or a URL whose client is installed
    (refused in one line otherwise, before any work)."""
    text = os.fspath(path)
    if not is_remote(text):
        return epath.Path(text).absolute()
    scheme = text.split("://")[0]
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError:
        raise OutputError(f"{text}: writing to {scheme}:// needs {_CLIENTS[scheme]}") from None
    return epath.Path(text)


def check_target(target: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a target that is a file, or a directory holding files when not `overwrite`."""
    target = as_path(target)
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target} is a file, not a directory")
    if not overwrite and target.is_dir():
        names = sorted(p.name for p in target.iterdir())
        if names:
            shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
            raise OutputError(
                f"{target} already holds files ({shown}); pass --overwrite to replace it whole, "
                "or choose another directory"
            )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: str | os.PathLike) -> None:
    """Make a local file's bytes, or a directory's entries, durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)


def _remove_stale(target: epath.Path) -> None:
    """Delete the partial outputs (and set-aside old ones) of writers of `target` that are dead."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(partial|old)-(\d+)")
    for sibling in target.parent.iterdir():
        match = pattern.fullmatch(sibling.name)
        if match and not _alive(int(match.group(2))):
            shutil.rmtree(sibling, ignore_errors=True)


def _exchange(a: epath.Path, b: epath.Path) -> bool:
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


def _put_in_place(partial: epath.Path, target: epath.Path) -> None:
    _fsync_tree(os.fspath(partial))  # the new output is on disk before any name points at it
    if not target.exists() or not any(target.iterdir()):
        os.rename(partial, target)  # POSIX rename replaces an empty directory
    elif _exchange(partial, target):  # the target is old or new at every instant
        shutil.rmtree(partial)  # now the old output
    else:
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)  # a kill right here leaves the target absent, never mixed
        os.rename(partial, target)
        shutil.rmtree(old)
    _fsync(target.parent)  # the rename itself survives a power loss


def _upload(local: str, target: epath.Path) -> None:
    """Copy a local directory's files to an object store prefix, config.json last (see the module doc)."""
    if target.exists():
        (target / "config.json").unlink(missing_ok=True)
        target.rmtree()
    files = sorted(os.path.relpath(os.path.join(d, f), local) for d, _, names in os.walk(local) for f in names)
    for name in sorted(files, key=lambda n: n == "config.json"):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        with open(os.path.join(local, name), "rb") as src, (target / name).open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[epath.Path]:
    """Yield an empty local directory to write into; on success it becomes `target` (local or an
    object store URL), on failure it is removed."""
    target = as_path(target)
    check_target(target, overwrite)
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix=f".{target.name}.partial-") as local:
            yield epath.Path(local)
            check_target(target, overwrite)  # someone may have written there meanwhile
            _upload(local, target)
        return
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
    """Hold `<directory>/.lock` for the life of a run; another process is refused in one line
    (a flock locally, an object created only if absent on an object store: see the module doc).

    Within one process a new lock on the same directory takes over the old one (a run that raised
    may still hold its lock through the traceback)."""

    _held: dict[str, DirectoryLock] = {}

    def __init__(self, directory: str | os.PathLike, what: str = "run"):
        self.path = as_path(directory) / ".lock"
        self.what = what
        self.handle = None
        self.owner = json.dumps({"host": socket.gethostname(), "pid": os.getpid()})

    def _refuse(self, holder: str) -> None:
        raise OutputError(
            f"{self.path.parent} is in use by another {self.what} ({holder}); "
            "wait for it to end or use another directory"
        )

    def acquire(self) -> DirectoryLock:
        key = str(self.path)
        if key in DirectoryLock._held:
            DirectoryLock._held[key].release()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if is_remote(self.path):
            self._acquire_object()
        else:
            self._acquire_flock()
        DirectoryLock._held[key] = self
        return self

    def _acquire_flock(self) -> None:
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            self._refuse(f"pid {holder}")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self.handle = handle

    def _acquire_object(self) -> None:
        fs, name = fsspec.core.url_to_fs(str(self.path))
        for _ in range(2):
            try:
                fs.pipe_file(name, self.owner.encode(), mode="create")  # fails if the object exists
                self.handle = fs
                return
            except FileExistsError:
                try:
                    holder = json.loads(fs.cat_file(name))
                except (FileNotFoundError, ValueError):
                    continue  # released meanwhile, or not ours to read: try once more
                if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", 0))):
                    fs.rm_file(name)  # its holder died without releasing it
                    continue
                self._refuse(f"pid {holder.get('pid')} on {holder.get('host')}; if it is gone, delete {self.path}")
        self._refuse(f"its lock {self.path} keeps changing")

    def release(self) -> None:
        if self.handle is None:
            return
        if is_remote(self.path):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
        self.handle = None
        DirectoryLock._held.pop(str(self.path), None)

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace a small file whole: readers see the old or the new text (see the module doc)."""
    path = as_path(path)
    if is_remote(path):
        path.write_text(text)  # one object upload: visible whole or not at all
        return
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # and the new name survives a power loss


class AppendLog:
    """A file written one record at a time (text, or bytes if `binary`), each record where it lands
    before `write` returns (or, without `autoflush`, at each `flush`).

    Local: appended to and flushed (and fsync'd if `durable`). Object stores cannot append: the
    whole content (the existing object's, then every record) is uploaded again at each flush."""

    def __init__(self, path: str | os.PathLike, binary: bool = False, durable: bool = False, autoflush: bool = True):
        self.path = as_path(path)
        self.durable, self.autoflush = durable, autoflush
        if is_remote(self.path):
            self.handle = None
            self.content = b"" if binary else ""
            if self.path.exists():
                self.content = self.path.read_bytes() if binary else self.path.read_text()
        else:
            self.handle = open(self.path, "ab" if binary else "a")

    def write(self, data: str | bytes) -> None:
        if self.handle is None:
            self.content += data
        else:
            self.handle.write(data)
        if self.autoflush:
            self.flush()

    def flush(self) -> None:
        if self.handle is None:
            (self.path.write_bytes if isinstance(self.content, bytes) else self.path.write_text)(self.content)
            return
        self.handle.flush()
        if self.durable:
            os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is None or not self.handle.closed:
            self.flush()
        if self.handle is not None:
            self.handle.close()

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()
