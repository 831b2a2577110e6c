"""Training logs: scalars to TensorBoard event files (``<workdir>/tb``) and to
``<workdir>/metrics.jsonl`` (one line per step, truncated to the restored step on resume, so the
file is the run's loss history however often it was interrupted).

The workdir may be a URL (``gs://bucket/run``, through ``etils.epath``). Object stores cannot
append: there ``metrics.jsonl`` is rewritten whole at each ``flush`` (the loop flushes every
``train.log_every`` steps), and TensorBoard's event file is written by ``_EpathEventFile``, which
tensorboardX takes for every URL scheme epath knows (tensorboardX's own ``gs://`` writer needs
google-cloud-storage, which mm_jax does not install): it keeps the file's bytes and rewrites the
object at each flush, as tensorboardX's own GCS writer does.
"""
from __future__ import annotations

import io
import json
import os

from etils import epath

URL_SCHEMES = ("gs", "s3", "az", "hf")  # those etils.epath routes to a remote file system


class _EpathEventFile:
    """A write-only event file on a URL: bytes accumulate here and the whole object is rewritten at
    each flush and at close."""

    def __init__(self, path: str):
        self.path, self.buffer = epath.Path(path), io.BytesIO()

    def write(self, data: bytes) -> None:
        self.buffer.write(data)

    def flush(self) -> None:
        self.path.write_bytes(self.buffer.getvalue())

    def close(self) -> None:
        self.flush()


class _EpathEventFiles:
    """tensorboardX writer factory (``record_writer.register_writer_factory``) for URL log dirs."""

    def open(self, path: str) -> _EpathEventFile:
        return _EpathEventFile(path)

    def directory_check(self, path: str) -> None:
        epath.Path(path).mkdir(parents=True, exist_ok=True)


def _register_url_event_files() -> None:
    from tensorboardX import record_writer

    for scheme in URL_SCHEMES:
        record_writer.register_writer_factory(scheme, _EpathEventFiles())


class MetricLog:
    def __init__(self, workdir: str | os.PathLike, *, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = epath.Path(workdir) / "metrics.jsonl"
        self.url = "://" in os.fspath(workdir)
        self.writer = None
        if not enabled:
            return
        self.lines: list[str] = []
        if self.path.exists():  # keep the history up to the restored checkpoint, drop what was redone
            self.lines = [line for line in self.path.read_text().splitlines()
                          if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in self.lines))
        from tensorboardX import SummaryWriter

        if self.url:
            _register_url_event_files()
        self.writer = SummaryWriter(os.fspath(epath.Path(workdir) / "tb"), purge_step=resume_step + 1)
        self._file = None if self.url else self.path.open("a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        """One step's line (``flush`` makes it durable)."""
        if not self.enabled:
            return
        line = json.dumps({"step": step, **scalars})
        if self._file is None:
            self.lines.append(line)
        else:
            self._file.write(line + "\n")
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def flush(self) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self.path.write_text("".join(line + "\n" for line in self.lines))
        else:
            self._file.flush()
        self.writer.flush()

    def close(self) -> None:
        if self.enabled:
            self.flush()
            if self._file is not None:
                self._file.close()
            self.writer.close()


def read_history(workdir: str | os.PathLike) -> list[dict]:
    path = epath.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
