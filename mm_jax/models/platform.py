"""The platform being compiled for (a TPU or GPU program compiled from a CPU host is not "cpu")."""
from __future__ import annotations

import jax

from mm_jax import parallel


def target_platform(mesh=None) -> str:
    """The platform the code is being compiled for: the current mesh's devices' (a TPU topology
    compiled from a CPU host says "tpu" here while ``jax.default_backend()`` says "cpu"), else the
    default backend."""
    mesh = parallel.current_mesh() if mesh is None else mesh
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()


def target_device_kind(mesh=None) -> str:
    """The device kind compiled for ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...): the current mesh's
    devices', else the default backend's first device's."""
    mesh = parallel.current_mesh() if mesh is None else mesh
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "device_kind", None) or jax.devices()[0].device_kind


# TPU generations whose Mosaic compiler refuses the splash kernel's bf16 matmuls (compiled for a
# v2-8 here: "E2001: CompileTimeMosaicUnsupportedRhsType: Unsupported matmul RHS type on target:
# vector<128x128xbf16>"); they take the chunked XLA attention
NO_PALLAS_TPUS = ("TPU v2", "TPU v3")
