"""Training checkpoints with orbax: the train state (parameters, optimizer state, step, PRNG key) and
the data iterator's position, saved together under <output_dir>/checkpoints/<step>/.

Each save also writes a checksum of every array of the state (`digest`), verified after a restore:
bytes flipped on disk (which the compressed array files do not always reveal) make the checkpoint
damaged, set aside like a truncated one, never a silently different state.

Saves are asynchronous: `save` copies the arrays to host memory and returns, the files are written
in the background while training goes on. Orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoints intact and the partial
one ignored. Restoring takes an abstract state whose leaves carry the target shardings, so a
checkpoint saved on one mesh restores onto any other mesh shape.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from stjax.io import as_path
from stjax.settings import ConfigError

log = logging.getLogger(__name__)
# orbax's wording when a checkpoint is sound but of another train state (not damage)
_MISMATCH = re.compile(r"tree structures do not match|not compatible with the stored shape")


class CheckpointMismatch(ConfigError):
    """A readable checkpoint of another train state (model config, LoRA settings, optimizer)."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint whose files cannot be restored (truncated, corrupt, missing parts)."""


class SaveFailed(RuntimeError):
    """A checkpoint could not be written (disk full, permissions); its partial output is removed."""


def _first_line(error: BaseException) -> str:
    """The gist of an orbax / TensorStore error, which may run to pages."""
    lines = str(error).strip().splitlines()
    line = re.sub(r"\s*See full TensorStore details.*", "", lines[0]) if lines else type(error).__name__
    return line[:300]


@jax.jit
def digest(tree: Any) -> list[jax.Array]:
    """One uint32 checksum per leaf: the sum of its bit patterns, each times an odd number made from
    its position (wrapping): any single flipped bit changes it, other damage all but surely."""

    def one(x: jax.Array) -> jax.Array:
        x = x.astype(jnp.uint8) if x.dtype == jnp.bool_ else x
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)
        odd = 2 * jnp.arange(x.size, dtype=jnp.uint32) + 1
        return jnp.sum(bits.reshape(-1) * odd, dtype=jnp.uint32)

    return [one(x) for x in jax.tree.leaves(tree)]


def _digest_values(tree: Any) -> list[int]:
    """`digest` as Python ints, read from this process's copy (each process holds them all)."""
    return [int(x.addressable_data(0)) for x in digest(tree)]


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        """`every`: save when the step is a multiple of it (0: only forced saves); keep the last `keep`."""
        self.every = every
        self.saving: int | None = None  # the step of the latest save started
        self.failed = False  # a save failed (and was reported)
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
        """Start writing `state` (and the iterator's position, one file per process) as checkpoint `step`.

        Raises SaveFailed when this save, or the previous background one, could not be written."""
        items = {"state": ocp.args.StandardSave(state), "digest": ocp.args.JsonSave(_digest_values(state))}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.wait()  # orbax would too; this way a failure is blamed on the save that failed
        self.saving = step
        with self._failing_saves():
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def check(self) -> None:
        """Raise SaveFailed as soon as a background save has failed (cheap: call it after every step)."""
        if not self.manager.is_saving_in_progress():
            self.wait()  # returns at once, or raises the finished save's error

    @contextlib.contextmanager
    def _failing_saves(self) -> Iterator[None]:
        """Turn any error of a save into SaveFailed, after removing the partial checkpoint it left."""
        try:
            yield
        except Exception as e:
            self.failed = True
            self.remove_partial()
            self.manager.reload()
            last = self.latest_step
            raise SaveFailed(
                f"writing checkpoint {self.saving} to {self.directory} failed: {_first_line(e)}; "
                f"the last good checkpoint is {last if last is not None else 'none'}"
            ) from e

    def remove_partial(self) -> None:
        """Delete the temporary directories of unfinished saves (process 0 owns the directory)."""
        if jax.process_index() == 0:
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                partial.rmtree(missing_ok=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state saved at `step`, placed as `abstract_state`'s shardings; the iterator is rewound.

        Raises CheckpointMismatch for a sound checkpoint of another train state (checked first from
        the small metadata file), CheckpointDamaged for one whose files cannot be read."""
        where = self.directory / str(step)
        try:
            saved = ocp.StandardCheckpointHandler().metadata(where / "state")
        except Exception as e:
            raise CheckpointDamaged(f"cannot read its metadata: {_first_line(e)}") from e
        shapes = lambda tree: Counter(tuple(x.shape) for x in jax.tree.leaves(tree))
        if shapes(saved.tree) != shapes(abstract_state):
            raise CheckpointMismatch(
                f"checkpoint {where} does not match this run's train state (model config, "
                "LoRA settings, optimizer): its arrays have other shapes"
            )
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        if (where / "digest").exists():  # checkpoints of older versions have none
            items["digest"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            if isinstance(e, ValueError) and _MISMATCH.search(str(e)):
                raise CheckpointMismatch(
                    f"checkpoint {where} does not match this run's train state (model config, "
                    f"LoRA settings, optimizer): {_first_line(e)}"
                ) from e
            raise CheckpointDamaged(_first_line(e)) from e
        if "digest" in items:
            differ = sum(a != b for a, b in zip(_digest_values(restored["state"]), restored["digest"]))
            if differ:
                raise CheckpointDamaged(f"checksum mismatch: {differ} of its arrays differ from what was saved")
        return restored["state"]

    def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> tuple[int, Any]:
        """(step, state) of the newest checkpoint that restores, or (0, None) when there is none.

        A damaged checkpoint is reported in one line and set aside (renamed `<step>.damaged-<reason>`,
        never deleted) before the next older one is tried. When checkpoints were set aside (now or in
        an earlier run) and none restores, it raises instead of starting the run afresh."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return step, self.restore(step, abstract_state, data_iterator)
            except CheckpointDamaged as e:
                aside = self.set_aside(step, str(e))
                log.warning("checkpoint %d is damaged (%s); set aside as %s", step, e, aside)
        damaged = sorted(p.name for p in self.directory.glob("*.damaged-*"))
        if damaged:
            raise CheckpointDamaged(
                f"no checkpoint in {self.directory} restores (set aside: {', '.join(damaged)}); "
                "move them away to start the run afresh"
            )
        return 0, None

    def set_aside(self, step: int, reason: str) -> Path:
        slug = re.sub(r"[^a-z0-9]+", "-", reason.lower()).strip("-")[:40] or "unreadable"
        aside = self.directory / f"{step}.damaged-{slug}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return aside

    def wait(self) -> None:
        """Block until the background writes are done (before exiting or reading the files)."""
        with self._failing_saves():
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Finish the background writes; a failure already reported as SaveFailed is not raised again."""
        with contextlib.suppress(Exception) if self.failed else self._failing_saves():
            self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of `tree`, the restore target for the same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
