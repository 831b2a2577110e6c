"""Preemption: a SIGTERM, or SLURM's early warning SIGUSR1 (``sbatch --signal=USR1@90``), makes every
process of a run stop at one step they agree on; the loop saves a checkpoint there and raises
``Preempted``, which the train CLI turns into ``exit_codes.PREEMPTED`` (75: relaunch the same
command to resume). Spot/preemptible TPUs and SLURM send SIGTERM with a grace period; without this
a run loses the steps since its last periodic checkpoint.

How the processes agree:

- **Several processes** (``jax.distributed`` joined): JAX's preemption service. ``jax.distributed.initialize``
  starts a notifier that catches SIGTERM in C++ (it does not kill the process) and tells the coordination
  service; a background protocol then collects every process's last sync-point counter and sets the
  sync point to the largest plus one, so every process stops after the same number of steps. The
  counter is the number of steps this launch has run (not the global step): a notice that arrives
  before the first step (while compiling or restoring) still stops at this launch's first step.
  SIGUSR1 is relayed to the process as SIGTERM. The check is a mutex, not a collective: no host sync per step.
- **One process**: a Python signal handler sets a flag that the next check reads.

The check must be called exactly once per step on every process (``reached()``), or the processes
would stop at different steps.
"""
from __future__ import annotations

import os
import signal
import sys
import warnings

SIGNALS = ("SIGTERM", "SIGUSR1")  # SIGUSR1: SLURM's `--signal=USR1@<seconds>` before the end of a job


class Preempted(Exception):
    """Every process stopped at ``step`` after its checkpoint was saved (and finished writing)."""

    def __init__(self, step: int, directory):
        self.step, self.directory = step, directory
        super().__init__(f"preempted at step {step}: checkpoint saved in {directory}; relaunch the same command "
                         "to resume")


class Preemption:
    """``with Preemption() as preemption:`` around the step loop; ``preemption.reached()`` once per step, on
    every process, says whether all processes stop after this step. Signal handlers installed here are
    restored on exit, so a SIGTERM after the loop (during the export) acts as it did before."""

    def __init__(self):
        self.mode = "off"
        self.calls = 0
        self.received: str | None = None  # the signal's name, in one-process mode
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Preemption:
        import jax

        if jax.distributed.is_initialized():
            from jax.experimental import multihost_utils

            try:
                multihost_utils.reached_preemption_sync_point(0)  # 0: nothing run yet (the service's initial counter)
            except RuntimeError as e:  # jax_enable_preemption_service is off
                warnings.warn(f"preemption is not handled: {e}; a SIGTERM ends the run without a checkpoint",
                              stacklevel=2)
                return self
            self.mode = "jax"
            self._install({signal.SIGUSR1: self._relay_as_sigterm})  # JAX's notifier listens to SIGTERM only
        elif jax.process_count() == 1:
            self.mode = "flag"
            self._install({getattr(signal, name): self._set_flag for name in SIGNALS})
        else:
            warnings.warn(f"preemption is not handled: {jax.process_count()} processes without jax.distributed "
                          "(no preemption service); a SIGTERM ends the run without a checkpoint", stacklevel=2)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def reached(self) -> bool:
        """Whether every process stops after the step just run (call once per step on every process)."""
        self.calls += 1
        if self.mode == "jax":
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(self.calls)
        return self.mode == "flag" and self.received is not None

    def _install(self, handlers: dict) -> None:
        try:
            for signum, handler in handlers.items():
                self._previous[signum] = signal.signal(signum, handler)
        except ValueError as e:  # signal handlers can only be set from the main thread
            self.__exit__()
            lost = ("SIGUSR1 is not relayed to the preemption service" if self.mode == "jax"
                    else "a SIGTERM ends the run without a checkpoint")
            self.mode = "jax" if self.mode == "jax" else "off"
            warnings.warn(f"preemption signals are not caught ({e}): {lost}", stacklevel=3)

    def _set_flag(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            print(f"{self.received} received: saving a checkpoint after this step", file=sys.stderr, flush=True)

    @staticmethod
    def _relay_as_sigterm(signum, frame) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
