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
