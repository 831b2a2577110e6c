"""Shared test helpers: seeded torch references, the converter, and the error measure."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MANIFESTS = ROOT / "tests" / "data" / "manifests"  # key/shape lists + configs of the real checkpoints

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def fake_devices_env(n: int = 8) -> dict:
    """The environment for a subprocess on ``n`` fake CPU devices. The collectives' rendezvous
    timeout is raised from XLA's 40 s: on 2 busy cores the 8 device threads can take longer to
    arrive, and XLA then aborts the process."""
    flags = (f"--xla_force_host_platform_device_count={n} --xla_cpu_collective_call_terminate_timeout_seconds=900 "
             "--xla_cpu_collective_timeout_seconds=900")
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the reference's scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def randomize_torch_params(module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every parameter (norms and zero-inits included) non-trivial random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            if name.endswith("norm.weight") or ".norm_" in name and name.endswith("weight"):
                noise = 1.0 + noise
            p.copy_(noise.to(p.dtype))


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return MANIFESTS
