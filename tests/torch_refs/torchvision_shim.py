"""Let the CPU torch import the torchvision 0.28.0 wheel the registry offers (a CUDA build).

That wheel's compiled ops do not load next to the CPU torch 2.13.0, and ``import torchvision`` then
fails in ``torchvision/_meta_registrations.py`` (``operator torchvision::nms does not exist``) while
registering fake (meta) kernels for them. Skipping those registrations lets torchvision, timm,
facexlib and ``consisid_eva_clip`` import; their Python code (transforms, the models) works, only the
compiled ops (``torchvision.ops.nms``, ``roi_align``...) stay unusable. Call :func:`install` before the
first ``import torchvision``; tests/torch_refs/conftest.py does.
"""
from __future__ import annotations

import functools

_PREFIX = "torchvision::"


def install() -> None:
    """Make ``torch.library.register_fake`` a no-op for ``torchvision::`` ops; idempotent."""
    import torch

    original = torch.library.register_fake
    if getattr(original, "_mm_jax_torchvision_shim", False):
        return

    @functools.wraps(original)
    def register_fake(op, func=None, /, **kwargs):
        if isinstance(op, str) and op.startswith(_PREFIX):
            return func if func is not None else (lambda f: f)
        return original(op, func, **kwargs)

    register_fake._mm_jax_torchvision_shim = True
    torch.library.register_fake = register_fake
