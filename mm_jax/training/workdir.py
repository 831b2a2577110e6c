"""The run's workdir: a local folder or a URL (``etils.epath``), shared by every process of a run,
and the writes that must never be seen half-done (written aside by every process, renamed into
place once by process 0).
"""
from __future__ import annotations

import os
import secrets
import shutil

import jax
from etils import epath


class Refused(ValueError):
    """The run's input was refused before any work started (nothing written but, for a workdir
    check, its marker): the train CLI exits ``exit_codes.REFUSED``."""


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
    """A URL (``gs://bucket/run``) as it is, a local folder made absolute."""
    text = os.fspath(workdir)
    return epath.Path(text) if "://" in text else epath.Path(os.path.abspath(text))


def is_url(path) -> bool:
    return "://" in os.fspath(path)


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_shared_workdir(workdir: epath.Path) -> None:
    """Several processes on a local path: process 0 writes a marker with a random token, and every
    other process must read it there (each host writing its own part of a checkpoint to its own
    disk would leave no complete checkpoint anywhere). ``Refused`` names the processes that do not
    see it. URLs and single processes pass."""
    if jax.process_count() == 1 or is_url(workdir):
        return
    import numpy as np
    from jax.experimental import multihost_utils

    token = secrets.token_hex(16).encode() if jax.process_index() == 0 else b"0" * 32
    token = bytes(multihost_utils.broadcast_one_to_all(np.frombuffer(token, np.uint8)).astype(np.uint8))
    marker = workdir / f".shared-check-{token.decode()}"
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        marker.write_bytes(token)
    barrier("mm_jax_workdir_marker_written")
    try:
        sees = marker.exists() and marker.read_bytes() == token
    except OSError:
        sees = False
    seen = multihost_utils.process_allgather(np.asarray([sees]))
    barrier("mm_jax_workdir_marker_read")
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    blind = [k for k, ok in enumerate(np.asarray(seen).reshape(-1)) if not ok]
    if blind:
        raise Refused(f"--workdir {workdir} is not shared between processes: process(es) {blind} do not see "
                      f"{marker.name}, which process 0 wrote there; give every host the same folder (a shared "
                      f"file system) or a URL such as gs://bucket/run")


def copytree(src, dst) -> None:
    """Copy a folder between local paths and URLs (epath)."""
    src, dst = epath.Path(src), epath.Path(dst)
    if not is_url(src) and not is_url(dst):
        shutil.copytree(src, dst)
        return
    for root, _, files in src.walk():
        target = dst / os.path.relpath(os.fspath(root), os.fspath(src))
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            (root / f).copy(target / f)


def write_atomically(out: epath.Path, fill, name: str) -> epath.Path:
    """Written aside (``<out>.tmp``) by every process (``fill(tmp)``), then renamed into place once,
    by process 0, after all of them finished (barriers): never half-written."""
    tmp = out.parent / (out.name + ".tmp")
    if jax.process_index() == 0 and tmp.exists():
        tmp.rmtree()
    barrier(f"mm_jax_{name}_aside")
    fill(tmp)
    barrier(f"mm_jax_{name}_written")
    if jax.process_index() == 0:
        if out.exists():
            out.rmtree()
        tmp.rename(out)
    barrier(f"mm_jax_{name}_renamed")
    return out
