"""Read safetensors files tensor by tensor with ``safetensors.safe_open``, never a whole shard.

``read_folder`` lists every tensor of a component folder (name, file, dtype, shape) from the
headers alone. ``TensorInfo.load`` then opens the tensor's shard memory-mapped
(``safe_open(framework="numpy")``; bfloat16 comes back as ``ml_dtypes.bfloat16``, which is why
``ml_dtypes`` is imported first), copies out that one tensor and closes the shard again: the
mapping's pages leave the process with it, so converting holds one tensor (or one layer of a
stack, ``mm_jax.checkpoint.Stacked``) at a time, whatever the shard's size.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers numpy's "bfloat16", which safe_open's numpy arrays use)
import numpy as np
from safetensors import SafetensorError, safe_open

# the safetensors dtypes we convert, and their numpy types
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and tensor."""


def _unreadable(path: Path, e: Exception) -> CheckpointError:
    return CheckpointError(f"{path.name}: truncated shard or corrupt safetensors header ({e})")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str   # the safetensors dtype name, one of DTYPES
    shape: tuple[int, ...]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.dtype])

    def load(self) -> np.ndarray:
        """This tensor's values, copied out of its memory-mapped shard (closed again on return)."""
        try:
            with safe_open(self.file, framework="numpy") as f:
                return f.get_tensor(self.name)
        except SafetensorError as e:
            raise _unreadable(self.file, e) from None


def read_header(path: Path) -> dict[str, TensorInfo]:
    """``{name: TensorInfo}`` of one safetensors file, read from its header (no tensor data)."""
    path = Path(path)
    try:
        with safe_open(path, framework="numpy") as f:
            specs = {name: f.get_slice(name) for name in f.keys()}
            out = {name: TensorInfo(name, path, s.get_dtype(), tuple(s.get_shape())) for name, s in specs.items()}
    except SafetensorError as e:
        raise _unreadable(path, e) from None
    for info in out.values():
        if info.dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {info.name!r} has unsupported dtype {info.dtype!r} "
                                  f"(supported: {', '.join(DTYPES)})")
    return out


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a component folder: those named by an index, or all of them."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        with open(indexes[0]) as fh:
            weight_map = json.load(fh).get("weight_map", {})
        files = sorted({folder / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{indexes[0].name} names shard(s) that are missing from {folder}: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weights found (a component folder needs config.json "
                              "and *.safetensors, optionally with a .safetensors.index.json)")
    return files


def read_folder(folder: Path) -> dict[str, TensorInfo]:
    """All tensors of a component folder, by name (a name in two shards is an error)."""
    tensors: dict[str, TensorInfo] = {}
    for f in find_weight_files(folder):
        for name, info in read_header(f).items():
            if name in tensors:
                raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    return tensors
