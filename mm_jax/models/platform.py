"""The platform being compiled for (a TPU or GPU program compiled from a CPU host is not "cpu")."""
from __future__ import annotations

import jax


def target_platform(mesh=None) -> str:
    """The platform the code is being compiled for: the current mesh's devices' (a TPU topology
    compiled from a CPU host says "tpu" here while ``jax.default_backend()`` says "cpu"), else the
    default backend."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return getattr(device, "platform", None) or jax.default_backend()
