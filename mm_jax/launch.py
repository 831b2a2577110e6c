"""Run a command as several JAX processes on this machine: ``python -m mm_jax.launch --processes N
--devices-per-process M -- <command> [args...]``.

The N processes form one JAX run of N x M CPU devices, as the hosts of a TPU pod or the nodes of a
SLURM job do: each child gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port),
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, ``JAX_PLATFORMS=cpu`` and M fake devices
(``--xla_force_host_platform_device_count``, the other ``XLA_FLAGS`` kept), and
``mm_jax.distributed.initialize()`` joins them with gloo collectives. It is how the tests run the
multi-process paths (training, resume, preemption, sampling) on one CPU machine, and how a user
checks a pod launch before paying for one.

- Output: every line of a child is printed with a ``[pK]`` prefix, stdout to stdout, stderr to stderr.
- Signals: SIGTERM, SIGINT and SIGUSR1 are forwarded to every child (a training run saves a
  checkpoint and exits 75, ``mm_jax.exit_codes.PREEMPTED``).
- Failure: when a child exits non-zero on its own, the others cannot go on (their collectives wait
  for it): they get SIGTERM, then SIGKILL after ``--grace`` seconds.
- Exit code: the worst child's. A child that failed first wins over the peers it took down; else
  by severity: killed by a signal (128 + signal) and crashes (1) over diverged (3) over refused
  (2) over preempted (75) over success (0).

On real clusters the platform starts one process per host (TPU pod: ``gcloud compute tpus tpu-vm
ssh NAME --worker=all --command="python -m mm_jax.train ..."``; SLURM: ``srun python -m
mm_jax.train ...``) and ``jax.distributed.initialize()`` finds the others: this launcher is not used
there (README, "Several processes").
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

from mm_jax import exit_codes

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
_DEVICE_FLAG = re.compile(r"--xla_force_host_platform_device_count=\S+")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, *, process_id: int, processes: int, devices: int, port: int) -> dict:
    """The environment of child ``process_id``: the launcher's, plus the coordinator variables and
    ``devices`` fake CPU devices. ``NPROC`` is dropped: ``mm_jax`` sizes XLA's CPU thread pool for
    the child's own device count (``mm_jax.fake_devices``)."""
    env = {k: v for k, v in base.items() if k != "NPROC"}
    flags = _DEVICE_FLAG.sub("", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return env


def severity(code: int) -> int:
    """How bad an exit code is (higher: worse), for choosing the launcher's own code."""
    order = {exit_codes.OK: 0, exit_codes.PREEMPTED: 1, exit_codes.REFUSED: 2, exit_codes.DIVERGED: 3}
    return order.get(code, 4)


def returncode(popen_code: int) -> int:
    """Popen's code, with death by signal s (negative) as the shell's 128 + s."""
    return 128 - popen_code if popen_code < 0 else popen_code


def _die_with_parent() -> None:
    """Linux: a child gets SIGKILL when the launcher dies (kill -9 of the launcher leaves no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _pump(stream, out, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        out.buffer.write(prefix.encode() + line)
        out.flush()
    stream.close()


class Launch:
    """N children of one command; ``run()`` -> the exit code (module docstring)."""

    def __init__(self, command: list[str], processes: int, devices: int, *, port: int | None = None,
                 grace: float = 10.0, env: dict | None = None):
        self.command, self.n, self.grace = command, processes, grace
        port = port or free_port()
        base = dict(os.environ if env is None else env)
        self.envs = [child_env(base, process_id=i, processes=processes, devices=devices, port=port)
                     for i in range(processes)]
        self.children: list[subprocess.Popen] = []
        self.first_failure: int | None = None  # index of the child that failed on its own

    def _signal_all(self, sig: int) -> None:
        for c in self.children:
            if c.poll() is None:
                try:
                    c.send_signal(sig)
                except ProcessLookupError:
                    pass

    def run(self) -> int:
        pumps = []
        for i, env in enumerate(self.envs):
            c = subprocess.Popen(self.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 start_new_session=True, preexec_fn=_die_with_parent)
            self.children.append(c)
            for stream, out in ((c.stdout, sys.stdout), (c.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, out, f"[p{i}] "), daemon=True)
                t.start()
                pumps.append(t)
        previous = {s: signal.signal(s, lambda sig, _f: self._signal_all(sig)) for s in FORWARDED}
        try:
            killed_at = None
            while any(c.poll() is None for c in self.children):
                if self.first_failure is None:
                    for i, c in enumerate(self.children):
                        code = c.poll()
                        if code is not None and code not in (exit_codes.OK, exit_codes.PREEMPTED):
                            self.first_failure = i
                            print(f"[launch] process {i} exited {returncode(code)}: stopping the others",
                                  file=sys.stderr, flush=True)
                            self._signal_all(signal.SIGTERM)
                            killed_at = time.monotonic()
                            break
                elif killed_at is not None and time.monotonic() - killed_at > self.grace:
                    self._signal_all(signal.SIGKILL)
                    killed_at = None
                time.sleep(0.1)
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
        for t in pumps:
            t.join(timeout=5)
        codes = [returncode(c.returncode) for c in self.children]
        summary = ", ".join(f"p{i} {c}" for i, c in enumerate(codes))
        if self.first_failure is not None:
            code = codes[self.first_failure]
        else:
            code = max(codes, key=severity)
        print(f"[launch] exit codes: {summary} -> {code}"
              f"{' (' + exit_codes.MEANING[code] + ')' if code in exit_codes.MEANING else ''}",
              file=sys.stderr, flush=True)
        return code


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.launch", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 usage="python -m mm_jax.launch --processes N --devices-per-process M -- command [args...]")
    ap.add_argument("--processes", type=int, required=True, help="local JAX processes to start")
    ap.add_argument("--devices-per-process", type=int, required=True, help="fake CPU devices in each")
    ap.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    ap.add_argument("--grace", type=float, default=10.0,
                    help="seconds between SIGTERM and SIGKILL for the peers of a failed process")
    return ap


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        build_parser().print_usage(sys.stderr)
        print("error: give the command after '--'", file=sys.stderr)
        return exit_codes.REFUSED
    split = argv.index("--")
    ap = build_parser()
    args = ap.parse_args(argv[:split])
    command = argv[split + 1:]
    problems = [f"--{k.replace('_', '-')} {v}: must be >= 1" for k, v in
                (("processes", args.processes), ("devices_per_process", args.devices_per_process)) if v < 1]
    if not command:
        problems.append("no command after '--'")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return exit_codes.REFUSED
    return Launch(command, args.processes, args.devices_per_process, port=args.port, grace=args.grace).run()


if __name__ == "__main__":
    sys.exit(main())
