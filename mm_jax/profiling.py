"""Profiler traces of the sampler and the trainer (``--profile DIR`` on both CLIs).

``python -m mm_jax.sample ... --profile DIR`` traces the whole generation; ``python -m mm_jax.train
... --profile DIR`` traces ``train.profile_steps`` steps after the run's first step (which
compiles). Each process writes its own trace to ``DIR/process_K`` (K = ``jax.process_index()``);
``jax.profiler`` puts it at ``DIR/process_K/plugins/profile/<time>/<host>.xplane.pb``, which
TensorBoard's profile plugin, XProf (``xprof --logdir DIR/process_0``) and Perfetto read.

What makes the trace readable:

- host spans: ``text_encoder``, one ``denoise`` step per sampling step and ``vae_decode``
  (``mm_jax.pipeline``), one ``train`` step per training step (``jax.profiler.StepTraceAnnotation``,
  so XProf's step view splits the trace by step);
- device ops: every op of a DiT block carries the named scope ``dit_block`` in its name
  (``jax.named_scope`` in ``mm_jax.models.dit``; under ``lax.scan`` the blocks share one body, so
  the scope names the block, not its index).
"""
from __future__ import annotations

import contextlib
import os

import jax

BLOCK_SCOPE = "dit_block"  # the named scope of a DiT block's ops (mm_jax.models.dit)


def check_dir(base: str | os.PathLike | None) -> None:
    """Refuse a ``--profile`` path that cannot be a folder (before any work)."""
    if base and os.path.exists(base) and not os.path.isdir(base):
        raise ValueError(f"--profile {base}: exists and is not a folder (the trace goes to {base}/process_K)")


def process_dir(base: str | os.PathLike) -> str:
    """``base/process_K`` for this process (a string: ``gs://`` URLs pass through unchanged)."""
    return f"{str(base).rstrip('/')}/process_{jax.process_index()}"


@contextlib.contextmanager
def trace(base: str | os.PathLike | None):
    """Trace everything run inside into ``process_dir(base)``; nothing when ``base`` is empty.
    The caller fetches its results inside (a trace stops when the host leaves, not the devices)."""
    if not base:
        yield None
        return
    out = process_dir(base)
    jax.profiler.start_trace(out)
    try:
        yield out
    finally:
        jax.profiler.stop_trace()


class StepWindow:
    """Trace training steps ``[first, first + count)`` into ``process_dir(base)``; inert when
    ``base`` is empty. Per step: ``with window.step(i): <dispatch>``, then ``window.after(i,
    outputs)`` (which waits for the last traced step's outputs before the trace stops); ``close()``
    stops a trace still running (a run that ended or failed inside the window)."""

    def __init__(self, base: str | os.PathLike | None, first: int, count: int):
        self.base, self.first, self.last = base, first, first + count - 1
        self.active = False

    def step(self, step: int):
        if not self.base or not self.first <= step <= self.last:
            return contextlib.nullcontext()
        if not self.active:
            jax.profiler.start_trace(process_dir(self.base))
            self.active = True
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def after(self, step: int, outputs) -> None:
        if self.active and step == self.last:
            jax.block_until_ready(outputs)
            self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            jax.profiler.stop_trace()
