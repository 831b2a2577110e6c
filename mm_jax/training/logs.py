"""Training logs: scalars to TensorBoard event files (``<workdir>/tb``) and to
``<workdir>/metrics.jsonl`` (one line per step, truncated to the restored step on resume, so the
file is the run's loss history however often it was interrupted)."""
from __future__ import annotations

import json
from pathlib import Path


class MetricLog:
    def __init__(self, workdir: str | Path, *, resume_step: int, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if self.path.exists():  # keep the history up to the restored checkpoint, drop what was redone
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(Path(workdir) / "tb"), purge_step=resume_step + 1)
        self._file = self.path.open("a")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()
        for k, v in scalars.items():
            self.writer.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self.writer.close()


def read_history(workdir: str | Path) -> list[dict]:
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
