"""``python -m mm_jax.launch``: N local processes form one JAX run, their output is prefixed,
signals reach every child, a failed child takes its peers down, and the exit code is the worst."""
import os
import signal
import subprocess
import sys
import time

from mm_jax import exit_codes

# One run of 2 x 4 devices: each process sums a globally sharded array through the CPU collectives.
SUM = """
import numpy as np
from mm_jax import distributed
distributed.initialize()
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("x",))
x = jax.device_put(np.arange(16.0), NamedSharding(mesh, P("x")))
print(f"process {jax.process_index()}/{jax.process_count()} devices {jax.device_count()} "
      f"local {jax.local_device_count()} sum {float(jax.jit(jnp.sum)(x))}")
"""
# Process 1 fails at once; process 0 would wait forever.
FAIL_ONE = """
import os, sys, time
if os.environ["JAX_PROCESS_ID"] == "1":
    sys.exit(1)
time.sleep(600)
"""
# Each child exits 75 on SIGTERM once it has said it is ready.
PREEMPTIBLE = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: (print("saving", flush=True), sys.exit(75)))
print("ready", flush=True)
time.sleep(600)
"""


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}


def _launch(code, n=2, m=4, **kw):
    return [sys.executable, "-m", "mm_jax.launch", "--processes", str(n), "--devices-per-process", str(m), *kw.get(
        "flags", ()), "--", sys.executable, "-c", code]


def test_two_processes_form_one_run_of_eight_devices_with_prefixed_output():
    r = subprocess.run(_launch(SUM), env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = sorted(line for line in r.stdout.splitlines() if "sum" in line)
    assert lines == ["[p0] process 0/2 devices 8 local 4 sum 120.0", "[p1] process 1/2 devices 8 local 4 sum 120.0"]


def test_a_failed_process_takes_its_peers_down_and_its_code_is_the_launchers():
    t0 = time.monotonic()
    r = subprocess.run(_launch(FAIL_ONE, flags=("--grace", "5")), env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert "process 1 exited 1: stopping the others" in r.stderr
    assert time.monotonic() - t0 < 60


def test_sigterm_reaches_every_process_and_preempted_is_the_exit_code():
    p = subprocess.Popen(_launch(PREEMPTIBLE), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = 0
    while ready < 2:
        line = p.stdout.readline()
        assert line, p.stderr.read()
        ready += line.strip().endswith("ready")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == exit_codes.PREEMPTED, err
    assert sorted(line for line in out.splitlines() if "saving" in line) == ["[p0] saving", "[p1] saving"]


def test_bad_invocations_are_refused_with_exit_code_2():
    base = [sys.executable, "-m", "mm_jax.launch"]
    for args, says in ((["--processes", "2", "--devices-per-process", "4"], "after '--'"),
                       (["--processes", "0", "--devices-per-process", "4", "--", "true"], "--processes 0"),
                       (["--processes", "2", "--devices-per-process", "4", "--"], "no command")):
        r = subprocess.run(base + args, env=_env(), capture_output=True, text=True, timeout=60)
        assert r.returncode == exit_codes.REFUSED and says in r.stderr, (args, r.stderr)
