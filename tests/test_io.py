"""stjax.io's local writers are durable (issue #24): a file's bytes are fsync'd before its rename and the
directory after it, so a power loss leaves the old or the new output; a write that fails leaves the old
file whole; a lock left held by a run that raised is taken over in the same process. (The object-store
side is test_object_store.py; mixed directories are test_fault_classes.py.)"""

import errno
import os
import stat
from pathlib import Path

import pytest

from stjax.io import DirectoryLock, atomic_dir, write_text_atomic


@pytest.fixture
def events(monkeypatch) -> list[str]:
    """Each fsync ("file NAME" / "dir NAME") and rename ("rename TARGET"), in order."""
    log, real_fsync = [], os.fsync

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        log.append(f"{kind} {Path(os.readlink(f'/proc/self/fd/{fd}')).name}")
        real_fsync(fd)

    def logged(real):
        def rename(a, b, *args, **kwargs):
            log.append(f"rename {Path(b).name}")
            real(a, b, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", logged(os.replace))
    monkeypatch.setattr(os, "rename", logged(os.rename))
    return log


def test_a_small_file_is_fsynced_before_its_rename_and_its_directory_after(tmp_path, events):
    write_text_atomic(tmp_path / "summary.json", "{}")
    assert events == [f"file .summary.json.partial-{os.getpid()}", "rename summary.json", f"dir {tmp_path.name}"]


def test_a_model_directory_is_fsynced_before_its_rename_and_its_parent_after(tmp_path, events):
    with atomic_dir(tmp_path / "out") as partial:
        (partial / "config.json").write_text("{}")
    rename = events.index("rename out")
    assert "file config.json" in events[:rename]
    assert f"dir .out.partial-{os.getpid()}" in events[:rename]
    assert events[rename + 1 :] == [f"dir {tmp_path.name}"]


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    write_text_atomic(target, "old settings\n")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the new bytes were written; flushing them to disk fails
    with pytest.raises(OSError, match="No space left"):
        write_text_atomic(target, "new settings, longer than the old ones\n")
    assert target.read_text() == "old settings\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no partial file left behind


def test_a_lock_left_held_by_a_run_that_raised_is_taken_over_in_the_same_process(tmp_path):
    """A run that raised may keep its lock through the traceback (never released); the next run in
    the same process (a notebook, a test) takes it over rather than being refused."""
    DirectoryLock(tmp_path, "training run").acquire()  # never released
    again = DirectoryLock(tmp_path, "training run").acquire()
    again.release()
    DirectoryLock(tmp_path).acquire().release()
