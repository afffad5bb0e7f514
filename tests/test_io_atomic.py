"""`write_text_atomic` and `DirectoryLock` in the cases a run meets: a write that fails part way,
and a lock still held by a run of the same process that raised."""

import pytest

from stjax.io import DirectoryLock, write_text_atomic


def test_a_write_that_fails_part_way_leaves_the_old_text_whole(tmp_path):
    path = tmp_path / "summary.json"
    write_text_atomic(path, "old")
    with pytest.raises(UnicodeEncodeError):  # a lone surrogate fails to encode after the first 10,000 characters
        write_text_atomic(path, "x" * 10_000 + "\ud800")
    assert path.read_text() == "old"
    write_text_atomic(path, "new")
    assert path.read_text() == "new"


def test_a_lock_left_held_by_a_run_that_raised_is_taken_over_in_the_same_process(tmp_path):
    """A run that raised may keep its lock through the traceback (never released); the next run in
    the same process (a notebook, a test) takes it over rather than being refused."""
    DirectoryLock(tmp_path, "training run").acquire()  # never released
    again = DirectoryLock(tmp_path, "training run").acquire()
    again.release()
    DirectoryLock(tmp_path).acquire().release()
