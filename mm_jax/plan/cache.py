"""The planner's compile cache: what a compile for a target says, stored so that an identical later
compile reads it back instead of compiling.

JAX's persistent compilation cache (``mm_jax.compile_cache``) does not work for the planner's
compiles: with jax 0.10.2 and libtpu 0.0.42, an executable compiled for compile-only devices (a
TPU topology or a CUDA target without the hardware) is written to JAX's cache but reading it back
fails ("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable"; JAX
warns and compiles again). The planner needs only what it reads off the compiled program, so it
stores that: the memory plan (``memory_analysis()``) and the optimized HLO text, gzipped, one file
per program in ``<folder>/plan/`` (the folder ``--compile-cache`` names, JAX's own by default).

The key is a SHA-256 of everything the compiled program depends on: the lowered StableHLO
(shapes, shardings, the mesh, the kernel calls' names), the compiler options, the devices (kind,
ids, coordinates), the compiler's version (libtpu's / the CUDA plugin's build string, jax and
jaxlib) and the ``XLA_FLAGS`` / ``LIBTPU_INIT_ARGS`` environment. A change to any of them is a
miss; nothing is ever returned for another program.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
                 "generated_code_size_in_bytes")
VERSION = 1   # of the stored format


def key(lowered, mesh, options: dict) -> str:
    """The hex key of the program ``lowered`` (a ``jax.stages.Lowered``) compiled with ``options``
    for the devices of ``mesh``."""
    import jax
    import jaxlib

    devices = list(np.asarray(mesh.devices).flat)
    client = getattr(devices[0], "client", None)
    parts = {
        "format": VERSION, "jax": jax.__version__, "jaxlib": jaxlib.version.__version__,
        "compiler": getattr(client, "platform_version", "") if client is not None else "",
        "devices": [f"{d.platform}|{d.device_kind}|{d!r}" for d in devices],
        "options": sorted((k, repr(v)) for k, v in options.items()),
        "env": [os.environ.get(v, "") for v in ("XLA_FLAGS", "LIBTPU_INIT_ARGS")],
    }
    h = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    h.update(lowered.as_text().encode())
    return h.hexdigest()


def _path(folder: str, k: str) -> Path:
    return Path(folder) / "plan" / f"{k}.json.gz"


def load(folder: str, k: str) -> tuple[dict, str, float] | None:
    """(memory fields, optimized HLO text, seconds the original compile took) stored under ``k``,
    or None. An unreadable entry is a miss."""
    p = _path(folder, k)
    if not p.exists():
        return None
    try:
        with gzip.open(p, "rt") as f:
            d = json.load(f)
        return d["memory"], d["hlo"], float(d["compile_seconds"])
    except (OSError, ValueError, KeyError, EOFError):
        return None


def save(folder: str, k: str, memory, hlo_text: str, compile_seconds: float) -> None:
    """Store what ``compiled`` said (``memory``: its ``memory_analysis()``), atomically."""
    p = _path(folder, k)
    p.parent.mkdir(parents=True, exist_ok=True)
    d = {"memory": {f: int(getattr(memory, f)) for f in MEMORY_FIELDS}, "hlo": hlo_text,
         "compile_seconds": compile_seconds}
    fd, tmp = tempfile.mkstemp(dir=p.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=3) as f:
            f.write(json.dumps(d).encode())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
