"""Writing and reading frames: mp4 / gif / a PNG folder / raw .npy, plus a settings sidecar.

Frames are float arrays (F, H, W, 3) in [0, 1] (channels-last, like everything in mm_jax).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".gif", ".npy")


def output_kind(path: str | Path) -> str:
    """"mp4" | "gif" | "npy" | "png" (a folder of PNG frames: a path without one of the suffixes)."""
    suffix = Path(path).suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        return suffix[1:]
    if suffix in ("", ".png", ".frames"):
        return "png"
    raise ValueError(f"--out {path}: unsupported output type {suffix!r}; use .mp4, .gif, .npy or a folder for PNG frames")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(frames, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_frames(path: str | Path, frames: np.ndarray, fps: int = 8, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write frames atomically (temp name, then rename) and a ``<path>.json`` sidecar with ``metadata``."""
    import imageio.v3 as iio

    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {frames.shape}")
    kind = output_kind(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}{path.suffix}")
    if kind == "npy":
        np.save(tmp, frames.astype(np.float32))
    elif kind == "mp4":
        iio.imwrite(tmp, to_uint8(frames), plugin="pyav", codec="libx264", fps=fps)
    elif kind == "gif":
        iio.imwrite(tmp, to_uint8(frames), plugin="pillow", duration=1000 / fps, loop=0)
    else:
        tmp.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(to_uint8(frames)):
            iio.imwrite(tmp / f"frame_{i:04d}.png", f)
    if path.exists() and path.is_dir():
        import shutil

        shutil.rmtree(path)
    os.replace(tmp, path)
    if metadata is not None:
        Path(str(path) + ".json").write_text(json.dumps(dict(metadata), indent=1, default=str))
    return path


def read_video(path: str | Path) -> np.ndarray:
    """(F, H, W, 3) uint8 from an mp4/gif, a .npy of floats in [0,1], or a folder of images."""
    import imageio.v3 as iio

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
        return np.stack([iio.imread(f)[..., :3] for f in files])
    if path.suffix.lower() == ".npy":
        return to_uint8(np.load(path))
    plugin = "pyav" if path.suffix.lower() == ".mp4" else None
    return np.asarray(iio.imread(path, plugin=plugin, index=None))[..., :3]
