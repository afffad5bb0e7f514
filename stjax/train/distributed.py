"""Multi-host start-up: `jax.distributed` from explicit flags or from the environment.

- explicit: coordinator host:port, number of processes and this process's id (the config's
  `distributed` section, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
- SLURM (one task per host, several tasks): jax reads SLURM's variables itself;
- TPU VMs with several hosts: jax finds its peers through the TPU metadata.
A single process needs none of it.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)


def _multi_host_environment() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return True
    return len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """Join the other processes of this run, if there are any (call before touching devices)."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    process_id = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if (not coordinator and not _multi_host_environment()) or jax.distributed.is_initialized():
        return  # one process, or joined already (GRPO's embedded default runs the SFT stage first)
    # CPU processes (tests, debugging) exchange collectives through gloo; GPUs and TPUs ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator:
        if num_processes <= 0 or process_id < 0:
            raise ValueError("a coordinator address needs num_processes and process_id as well")
        jax.distributed.initialize(coordinator, num_processes, process_id)
    else:
        jax.distributed.initialize()
    log.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
