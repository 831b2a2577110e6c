"""Fetching arrays to the host on every process of a run.

On one process ``np.asarray(x)`` fetches any array. On several (``mm_jax.distributed``), an array
sharded over devices of other processes cannot be fetched that way: JAX raises "Fetching value for
``jax.Array`` that spans non-addressable (non process local) devices is not possible". ``to_host``
gathers such an array first (a collective: every process must call it, in the same order) and
returns the whole value on every process; a process-local array is fetched as it is.
"""
from __future__ import annotations

import jax
import numpy as np


def to_host(x) -> np.ndarray:
    """The full value of ``x`` as a numpy array, on every process (gathered when ``x`` spans
    other processes' devices; then every process must make the same call)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
