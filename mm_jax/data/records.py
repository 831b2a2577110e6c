"""One training example as bytes: ``MMR1`` + header length (uint32 LE) + JSON header + blobs.

The header holds plain values; arrays are ``{"__array__": [dtype, shape, offset, nbytes]}`` and
byte strings ``{"__bytes__": [offset, nbytes]}`` (lists of them for per-frame JPEGs), offsets into
the blob area. No pickle: a record can be read by anything that reads JSON and raw bytes.

Fields written by the builder: kind ("image" | "video"), source, caption, frames (list of JPEG
bytes, RGB), height, width, boxes (F, 4) float32 x1 y1 x2 y2 (NaN where no face), kps (F, 5, 2),
face_found (F,) bool, ref_crop (JPEG of the CLIP-aligned reference
face, ``--ref-size`` px: the image encoder's image_size), ref_embedding (512,),
target_embedding (512,), ref_frame (int, -1 for an external reference), similarity (float);
with ``--precompute``: latents (f, h, w, C), text_embedding (L, T).
"""
from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

from mm_jax import presets

MAGIC = b"MMR1"
# ref_crop's default size: the image encoder's input size, the published CLIP ViT-L/14 tower's
# ``image_size`` (its preset); a 336-px tower (e.g. ConsisID's EVA-CLIP) builds with --ref-size 336
DEFAULT_REF_SIZE = int(presets.load("clip_vit_l14_vision")["image_size"])


class CorruptRecordError(ValueError):
    """A record that cannot be decoded; the message names where it came from."""


def encode_record(example: dict[str, Any]) -> bytes:
    blobs: list[bytes] = []
    offset = 0

    def put(b: bytes) -> list[int]:
        nonlocal offset
        blobs.append(b)
        ref = [offset, len(b)]
        offset += len(b)
        return ref

    def enc(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            a = np.asarray(v, order="C")  # 0-d stays 0-d (ascontiguousarray would make it 1-d)
            return {"__array__": [a.dtype.str, list(a.shape), *put(a.tobytes())]}
        if isinstance(v, (bytes, bytearray)):
            return {"__bytes__": put(bytes(v))}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        if isinstance(v, np.generic):
            return v.item()
        return v

    header = json.dumps({k: enc(v) for k, v in example.items()}).encode()
    return MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def decode_record(data: bytes, where: str = "record") -> dict[str, Any]:
    """Inverse of ``encode_record``; ``where`` (e.g. "shard data-00001.array_record, index 7") names
    the record in the ``CorruptRecordError`` raised for anything malformed."""
    try:
        if data[:4] != MAGIC:
            raise ValueError(f"bad magic {bytes(data[:4])!r}")
        (n,) = struct.unpack("<I", data[4:8])
        header = json.loads(bytes(data[8:8 + n]))
        base = 8 + n
        total = len(data)

        def blob(off: int, size: int) -> bytes:
            if off < 0 or base + off + size > total:
                raise ValueError(f"blob [{off}, {off + size}) outside the record's {total - base} data bytes")
            return bytes(data[base + off:base + off + size])

        def dec(v: Any) -> Any:
            if isinstance(v, dict) and "__array__" in v:
                dtype, shape, off, size = v["__array__"]
                return np.frombuffer(blob(off, size), dtype=np.dtype(dtype)).reshape(shape)
            if isinstance(v, dict) and "__bytes__" in v:
                return blob(*v["__bytes__"])
            if isinstance(v, list):
                return [dec(x) for x in v]
            return v

        return {k: dec(v) for k, v in header.items()}
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise CorruptRecordError(f"corrupt training record ({where}): {e}") from None
