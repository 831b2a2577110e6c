"""Helpers shared by the benchmark scripts: timing and FLOP counts."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_it(fn: Callable[[], object], repeat: int = 3, sync: Callable[[object], object] = lambda x: x):
    """Median wall time of ``repeat`` calls (after none: call ``fn`` once yourself to warm up)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def dit_forward_flops(cfg, batch: int, frames: int, height: int, width: int, text_len: int, layers: int | None = None) -> float:
    """Matmul FLOPs of one DiT forward (linear layers + attention scores and values)."""
    d = cfg.inner_dim
    p = cfg.patch_size
    s = text_len + frames * (height // p) * (width // p)
    per_block = 2 * s * (4 * d * d + 2 * 4 * d * d) + 2 * 2 * s * s * d
    return batch * (layers or cfg.num_layers) * per_block


# -- what a CPU figure depends on ---------------------------------------------------------------
# Timings on a shared 2-core machine move with the load (torch's OpenMP GEMMs more than XLA's
# thread pool: a descheduled OpenMP thread stalls the whole GEMM at its barrier), with the threads
# each side uses and with XLA/OMP flags. Each benchmark prints these next to its figure.

ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "XLA_FLAGS", "JAX_PLATFORMS",
            "TF_CPP_MIN_LOG_LEVEL")


def load_average() -> float:
    """The 1-minute load average (runnable threads; 2 means both cores busy)."""
    import os

    return os.getloadavg()[0]


def machine_report(argv: list[str]) -> str:
    """The exact command, CPU, cores this process may use, the env vars above and the busiest
    other processes (what else ran), as printed lines."""
    import os
    import platform
    import shlex
    import subprocess

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    env = {k: os.environ[k] for k in ENV_VARS if k in os.environ}
    try:
        top = subprocess.run(["ps", "-eo", "pcpu,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
        top = [f"{ln.split()[0]}% {' '.join(ln.split()[1:])[:70]}" for ln in top.splitlines()[1:5]]
    except OSError:
        top = []
    return "\n".join([f"command: python {shlex.join(argv)}",
                      f"machine: {cpu}; {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable here; "
                      f"1-min load average {load_average():.2f}",
                      f"env: {env or 'none of ' + ', '.join(ENV_VARS)}",
                      "busiest processes at start (ps %CPU over their lifetime): " + (" | ".join(top) or "n/a")])


def side_report(name: str) -> dict:
    """Versions and threads of one side, measured in its own process ("ours" or "torch")."""
    import os

    if name == "torch":
        import torch

        return {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "interop_threads": torch.get_num_interop_threads(), "mkldnn": torch.backends.mkldnn.is_available()}
    import jax
    import jaxlib

    # XLA:CPU sizes its intra-op thread pool to the cores this process may run on
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(),
            "devices": len(jax.devices()), "threads": len(os.sched_getaffinity(0))}
