"""Joining the processes of one JAX run: ``initialize()`` is the first call of every CLI.

One process (a laptop, one GPU, a single-host TPU VM) does nothing. Several processes form one
global device mesh through ``jax.distributed.initialize``, found in this order:

1. Explicit variables, as ``python -m mm_jax.launch`` sets them for local processes (and as a user
   may set them by hand on any cluster): ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0),
   ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``. On CPU devices the cross-process collectives go
   through gloo (``jax_cpu_collectives_implementation``), which must be chosen before the backend
   starts.
2. A cluster JAX detects by itself: SLURM with more than one task (``srun``), a multi-host TPU slice
   (``TPU_WORKER_HOSTNAMES`` / the TPU metadata), Open MPI, or ``JAX_COORDINATOR_ADDRESS`` alone.

It must run before anything starts a JAX backend (``jax.devices()``, ``jax.process_count()``, any
array op): afterwards ``jax.distributed.initialize`` can no longer join, and JAX raises. Idempotent.
"""
from __future__ import annotations

import os

_EXPLICIT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def requested() -> bool:
    """Whether the environment asks for a multi-process run (without starting anything)."""
    if os.environ.get("JAX_NUM_PROCESSES"):
        return int(os.environ["JAX_NUM_PROCESSES"]) > 1
    if os.environ.get("SLURM_NTASKS"):
        return int(os.environ["SLURM_NTASKS"]) > 1
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()]) > 1 or bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))


def initialize() -> None:
    """Join the other processes of this run when the environment says there are any (module
    docstring); a ``ValueError`` names a variable that is set wrong."""
    import jax

    if not requested() or jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_NUM_PROCESSES"):
        missing = [k for k in _EXPLICIT if not os.environ.get(k)]
        if missing:
            raise ValueError(f"JAX_NUM_PROCESSES is set but {missing} are not: a multi-process run needs "
                             f"{', '.join(_EXPLICIT)} (python -m mm_jax.launch sets them)")
        n, i = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        if not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i}: must lie in [0, JAX_NUM_PROCESSES={n})")
        if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=n,
                                   process_id=i)
        return
    jax.distributed.initialize()


def is_main() -> bool:
    """Process 0: the one that writes files and prints summaries."""
    import jax

    return jax.process_index() == 0
