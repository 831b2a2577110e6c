"""Enough XLA:CPU worker threads for collectives on fake CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` gives N CPU "devices" that share one
pool of worker threads, ``max(cores, N)`` of them. XLA:CPU runs independent parts of a program
concurrently, and a collective blocks its thread until every device reaches it. When a program
holds two independent collectives (the DiT's first all-to-all and one the partitioner put inside
a perceiver's loop), every pool thread can end up blocked in one of them while the last device
waits for a thread: a deadlock, measured here as 2 of 4 concurrent runs of
``tests/context_parallel_check.py`` aborting on a 2-core machine (XLA's "rendezvous ... may be
stuck"), and 0 of 8 with the pool sized below. XLA reads the pool size from ``NPROC`` when the
CPU backend starts, so ``ensure_collective_threads`` must run before then; ``mm_jax`` calls it on
import. Nothing changes without fake devices or when ``NPROC`` is already set.
"""
from __future__ import annotations

import os
import re

THREADS_PER_DEVICE = 4  # blocked collectives one device may hold at once, plus one to progress


def requested_devices(xla_flags: str | None = None) -> int:
    """The N of ``--xla_force_host_platform_device_count=N`` in ``XLA_FLAGS`` (1 when absent)."""
    flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
    found = re.findall(r"--xla_force_host_platform_device_count=(\d+)", flags)
    return int(found[-1]) if found else 1


def ensure_collective_threads(environ: dict | None = None) -> int | None:
    """Set ``NPROC`` to ``THREADS_PER_DEVICE`` x devices (at least the core count) when fake CPU
    devices are requested and ``NPROC`` is unset; return the value set, else None."""
    env = os.environ if environ is None else environ
    n = requested_devices(env.get("XLA_FLAGS", ""))
    if n <= 1 or "NPROC" in env:
        return None
    threads = max(os.cpu_count() or 1, THREADS_PER_DEVICE * n)
    env["NPROC"] = str(threads)
    return threads
