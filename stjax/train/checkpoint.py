"""Training checkpoints with orbax: the train state (parameters, optimizer state, step, PRNG key) and
the data iterator's position, saved together under <out_dir>/checkpoints/<step>/.

Saves are asynchronous: `save` copies the arrays to host memory and returns, the files are written
in the background while training goes on. Orbax writes into a temporary directory and renames it
when complete, so a process killed mid-save leaves the previous checkpoints intact and the partial
one ignored. Restoring takes an abstract state whose leaves carry the target shardings, so a
checkpoint saved on one mesh restores onto any other mesh shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str | Path, every: int, keep: int, async_save: bool = True):
        """`every`: save when the step is a multiple of it (0: only forced saves); keep the last `keep`."""
        self.every = every
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    @property
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
        """Start writing `state` (and the iterator's position, one file per process) as checkpoint `step`."""
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator | None) -> Any:
        """The state saved at `step`, placed as `abstract_state`'s shardings; the iterator is rewound."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        except ValueError as e:  # orbax: tree structure or shape disagreements
            reason = str(e).strip().splitlines()[0]
            raise ValueError(f"checkpoint {self.directory / str(step)} does not match this run's train state (model "
                             f"config, LoRA settings, optimizer): {reason}") from e

    def wait(self) -> None:
        """Block until the background writes are done (before exiting or reading the files)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of `tree`, the restore target for the same layout."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
