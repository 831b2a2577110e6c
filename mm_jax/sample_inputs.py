"""Input files and the mesh of the sampling CLIs (``mm_jax.sample``, ``mm_jax.sample_consisid``):
the ``--prompts`` JSONL lines, ``.npy`` inputs and the default sampling mesh, one home for both."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from mm_jax import video_io

LINE_FIELDS = frozenset({"prompt", "out", "seed", "negative_prompt", "ref", "id"})


def jsonl_lines(path: str):
    """(line number, dict) for each non-empty line of a JSONL file; a line that is not a JSON object
    gives (number, error message)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, f"not JSON ({e})"
            continue
        yield n, (d if isinstance(d, dict) else "not a JSON object")


def line_settings(d: dict, base):
    """The sampling settings of one ``--prompts`` line ``d``: ``base`` with the line's prompt, seed
    and negative prompt. ``ValueError`` naming the problem for an unknown field, a missing
    ``prompt``/``out``, an ``out`` that is not a video or image path, or a seed that is not an
    integer. (``ref``/``id`` are allowed here; each CLI checks them against its own flags.)"""
    unknown = sorted(set(d) - LINE_FIELDS)
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}")
    if not d.get("prompt") or not d.get("out"):
        raise ValueError("needs 'prompt' and 'out'")
    video_io.output_kind(d["out"])
    seed = d.get("seed", base.seed)
    if not isinstance(seed, int):
        raise ValueError(f"seed {seed!r}: must be an integer")
    return dataclasses.replace(base, prompt=d["prompt"], seed=seed,
                               negative_prompt=d.get("negative_prompt", base.negative_prompt))


def load_npy(path: str, flag: str) -> np.ndarray:
    """An ``.npy`` given with ``flag``; ``ValueError`` naming the flag when it cannot be read."""
    try:
        return np.load(path)
    except Exception as e:  # unreadable / not an .npy
        raise ValueError(f"{flag} {path}: cannot read ({e})") from None


def sampling_mesh(mesh: str | None, mesh_dcn: str | None, rows: int):
    """``--mesh`` / ``--mesh-dcn``, or the default sampling mesh for a DiT batch of ``rows`` (a CFG
    pair, or videos) on the devices there are."""
    import jax

    from mm_jax import parallel

    if not mesh and not mesh_dcn:
        mesh = parallel.sampling_mesh_shape(len(jax.devices()), parallel.device_memory_bytes(), rows)
    return parallel.make_mesh(mesh, dcn=mesh_dcn)
