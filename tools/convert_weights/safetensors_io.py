"""Read safetensors files tensor by tensor without torch and without loading whole shards.

A safetensors file is an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` and the raw data. We parse the header
and read each tensor's own byte range on demand, so converting holds one tensor (or one save
group) in memory at a time, never a whole shard.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointError(ValueError):
    """A source checkpoint that cannot be converted; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute byte offset in the file
    end: int

    def load(self) -> np.ndarray:
        """Read just this tensor's bytes from its file into a fresh array."""
        dt = np.dtype(DTYPES[self.dtype])
        count = int(np.prod(self.shape)) if self.shape else 1
        if self.end - self.start != count * dt.itemsize:
            raise CheckpointError(f"{self.file.name}: tensor {self.name!r} has {self.end - self.start} bytes, "
                                  f"expected {count * dt.itemsize} for {self.dtype}{list(self.shape)}")
        if count == 0:
            return np.zeros(self.shape, dt)
        arr = np.fromfile(self.file, dtype=dt, count=count, offset=self.start)
        if arr.size != count:
            raise CheckpointError(f"{self.file.name}: truncated shard while reading tensor {self.name!r}")
        return arr.reshape(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta.get("dtype") not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        b, e = meta["data_offsets"]
        if base + e > size:
            raise CheckpointError(f"{path.name}: truncated shard: tensor {name!r} ends at byte {base + e} "
                                  f"but the file has {size} bytes")
        out[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), base + b, base + e)
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
