"""Preemption signals (mm_jax.training.preemption): one process stops at the step after a SIGTERM
or SIGUSR1 and puts the previous handlers back; two processes agree on one step when only one of
them is signalled (SLURM's SIGUSR1, relayed to JAX's preemption service). The training runs that
save a checkpoint there and exit 75 are in tests/test_multiprocess_train.py."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from mm_jax import exit_codes
from mm_jax.training.preemption import Preempted, Preemption
from tests.conftest import fake_devices_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1"])
def test_one_process_stops_after_the_step_a_signal_arrives_in_and_restores_handlers(name):
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    with Preemption() as preemption:
        assert preemption.mode == "flag"
        assert not preemption.reached() and not preemption.reached()
        os.kill(os.getpid(), signum)  # the handler runs before the next bytecode: no sleep needed
        assert preemption.received == name
        assert preemption.reached()
    assert signal.getsignal(signum) is before


def test_preempted_names_the_step_and_says_to_relaunch():
    text = str(Preempted(12, "/w/checkpoints"))
    assert text.startswith("preempted at step 12: checkpoint saved") and "relaunch the same command" in text


# Every step runs a collective (as a train step does), the processes run at different speeds, and
# only process 1 gets the signal: both must stop after the same step.
_CHILD = """
import sys, time
from mm_jax import distributed
distributed.initialize()
import jax, jax.numpy as jnp
from jax.experimental import multihost_utils
from mm_jax.training.preemption import Preemption
with Preemption() as preemption:
    assert preemption.mode == "jax", preemption.mode
    for step in range(1, 2000):
        multihost_utils.process_allgather(jnp.ones(1))
        print(f"step {step}", flush=True)
        time.sleep(0.02 * (1 + 3 * jax.process_index()))
        if preemption.reached():
            print(f"stopped after step {step}", flush=True)
            sys.exit(75)
sys.exit(1)
"""


def _child(launcher: subprocess.Popen, index: int) -> psutil.Process:
    for child in psutil.Process(launcher.pid).children():
        if child.environ().get("JAX_PROCESS_ID") == str(index):
            return child
    raise AssertionError(f"launcher {launcher.pid} has no process {index}")


@pytest.mark.slow  # two JAX processes start and join: ~30 s on 2 CPU cores
def test_sigusr1_to_one_of_two_processes_stops_both_after_the_same_step():
    launcher = subprocess.Popen([sys.executable, "-m", "mm_jax.launch", "--processes", "2", "--devices-per-process",
                                 "1", "--", sys.executable, "-c", _CHILD], cwd=ROOT, env=fake_devices_env(1),
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    try:
        for line in launcher.stdout:
            lines.append(line.strip())
            if line.startswith("[p1] step 5"):
                _child(launcher, 1).send_signal(signal.SIGUSR1)
        assert launcher.wait(timeout=120) == exit_codes.PREEMPTED, lines[-10:]
    finally:
        if launcher.poll() is None:
            launcher.kill()
    stops = {line.split(" ")[0]: int(line.rsplit(" ", 1)[1]) for line in lines if "stopped after step" in line}
    assert set(stops) == {"[p0]", "[p1]"} and stops["[p0]"] == stops["[p1]"] >= 5, stops
