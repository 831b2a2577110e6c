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
# With the cuda12 extra installed on a machine without a driver, the CUDA plugin's start-up check
# fails (cuInit 303) and the plugin is dropped; skipping the check keeps it for compiling GPU
# targets (tests/test_plan.py). It changes nothing where the extra is absent.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# libtpu (test extra) takes a process lock when JAX starts its backends; without TPU chips that
# only stops a second process (a subprocess test, the notebook's kernel) from compiling for TPU
# topologies. Set before any backend starts.
from mm_jax.plan.targets import allow_compile_only_libtpu  # noqa: E402

allow_compile_only_libtpu()


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
