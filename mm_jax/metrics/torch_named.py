"""Metric networks' weights as ``.safetensors`` of torch-named tensors (torch keys, torch layout), read and
written without torch: the file ``tools/convert_weights/inception_v3.py --out`` writes (torchvision's names) and
the one ``tools/convert_weights/raft.py --out`` writes (RAFT's names, config in the metadata).

A model variable at path ``("Mixed_5b", "branch1x1", "conv", "kernel")`` is the torch key
``Mixed_5b.branch1x1.conv.weight``: leaf names ``kernel``/``scale``/``mean``/``var`` become
``weight``/``weight``/``running_mean``/``running_var``, path parts in ``drop_parts`` (holders that are no torch
module, e.g. RAFT's ``bn``) are left out; a conv kernel is stored (out, in, kh, kw) and used (kh, kw, in, out).
Loading is strict: every variable must be in the file with its shape and every tensor of the file must be used,
otherwise a ValueError lists what does not match.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}


def torch_key(path: tuple, drop_parts: tuple = ()) -> str:
    parts = [str(p) for p in path if str(p) not in drop_parts]
    parts[-1] = LEAF_RENAMES.get(parts[-1], parts[-1])
    return ".".join(parts)


def _variables(model, drop_parts: tuple) -> list:
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return [(torch_key(path, drop_parts), str(path[-1]), var) for path, var in flat]


def tensors_of(model, drop_parts: tuple = ()) -> dict[str, np.ndarray]:
    """``{torch key: float32 array in torch layout}`` of ``model``'s parameters and BatchNorm statistics."""
    out = {}
    for key, leaf, var in _variables(model, drop_parts):
        arr = np.asarray(var.get_value(), np.float32)
        out[key] = np.ascontiguousarray(arr.transpose(3, 2, 0, 1) if leaf == "kernel" else arr)
    return out


def save(model, path: str | Path, metadata: dict, drop_parts: tuple = ()) -> int:
    """Write ``model``'s tensors under torch names to ``path`` (.safetensors); returns the tensor count."""
    from safetensors.numpy import save_file

    tensors = tensors_of(model, drop_parts)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in metadata.items()})
    return len(tensors)


def read(path: str | Path, flag: str, how: str) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, metadata)`` of the ``.safetensors`` at ``path``; ``flag`` names the CLI argument and ``how``
    says how to make the file, both for the errors (absent file, another suffix)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{flag} {path}: expected a .safetensors ({how})")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file ({how})")
    with safe_open(str(path), "np") as f:
        return {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}, dict(f.metadata() or {})


def fill(model, tensors: dict, source: str, drop_parts: tuple = ()) -> int:
    """Set every variable of ``model`` (abstract or not) from ``tensors`` (torch names and layout); strict."""
    import jax.numpy as jnp

    problems, used, values = [], set(), []
    for key, leaf, var in _variables(model, drop_parts):
        shape = tuple(var.get_value().shape)
        want = [shape[3], shape[2], shape[0], shape[1]] if leaf == "kernel" else list(shape)
        if key not in tensors:
            problems.append(f"missing {key} {want}")
            continue
        used.add(key)
        arr = tensors[key]
        if list(arr.shape) != want:
            problems.append(f"{key}: shape {list(arr.shape)}, expected {want}")
            continue
        values.append((var, arr.transpose(2, 3, 1, 0) if leaf == "kernel" else arr))
    problems += [f"unexpected {k} {list(tensors[k].shape)}" for k in sorted(set(tensors) - used)]
    if problems:
        raise ValueError(f"{source}: {len(problems)} tensor(s) do not match: " + "; ".join(problems[:8])
                         + (" ..." if len(problems) > 8 else ""))
    for var, arr in values:
        var.set_value(jnp.asarray(arr, var.get_value().dtype))
    return len(values)
