"""VBench's dynamic degree (``vbench/dynamic_degree.py``, the Magic Mirror paper's motion metric) on our RAFT.

The rule, as VBench computes it per video:

1. Frames: every decoded frame at full resolution (no resize), RGB as float in [0, 255], keeping frames
   ``0, k, 2k, ...`` with ``k = max(1, round(fps / 8))`` (Python's ``round``: 12 fps -> 2, 20 fps -> 2).
2. Each consecutive pair of kept frames is padded to multiples of 8 (RAFT's ``InputPadder``, "sintel" mode:
   edge replication, split evenly with the extra row/column at the bottom/right) and run through RAFT for
   20 updates; the pair's score is the mean of the largest ``int(0.05 * h * w)`` flow magnitudes of the
   full-resolution flow at the padded size ``h, w``.
3. The threshold is ``6 * min(H, W) / 256`` on the unpadded frame size and the needed count is
   ``round(4 * n / 16)`` with ``n`` the number of kept frames (not pairs); the video is dynamic when at
   least that many pair scores exceed the threshold (with a needed count of 0, any pair at all suffices;
   a single kept frame is never dynamic).
4. The score of a set of videos is the fraction that is dynamic.

Weights (``--raft``): the ``.safetensors`` that ``tools/convert_weights/raft.py raft-things.pth --out
raft.safetensors`` writes (RAFT's torch names and layout, the config in the metadata); :func:`load_raft` reads it
without torch. The frame rate comes from the video (:func:`video_fps`: an mp4's container rate) or, for frames
without one (.npy, .gif, a folder of images), from ``--fps``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

ITERS = 20           # RAFT updates VBench runs
TOP_FRACTION = 0.05  # the pair score averages the top 5% of flow magnitudes
TARGET_FPS = 8       # frames kept every round(fps / 8)
FORMAT = "mm_jax.raft"
DROP_PARTS = ("bn",)  # our norm holder, no torch module
HOW = ("tools/convert_weights/raft.py raft-things.pth --out raft.safetensors writes it from princeton-vl/RAFT's "
       "published raft-things.pth, the file VBench uses")


def frame_interval(fps: float) -> int:
    """Keep every ``max(1, round(fps / 8))``-th frame."""
    if not fps > 0:
        raise ValueError(f"fps={fps}: must be positive")
    return max(1, round(fps / TARGET_FPS))


def sintel_padding(h: int, w: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` rows/columns that make ``h, w`` multiples of 8, split evenly."""
    ph, pw = (-h) % 8, (-w) % 8
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


def pad_frames(frames: np.ndarray) -> np.ndarray:
    """``(..., H, W, C)`` -> edge-replicated to multiples of 8 (``F.pad(mode='replicate')``)."""
    top, bottom, left, right = sintel_padding(*frames.shape[-3:-1])
    pad = [(0, 0)] * (frames.ndim - 3) + [(top, bottom), (left, right), (0, 0)]
    return np.pad(frames, pad, mode="edge")


def thresholds(h: int, w: int, n_frames: int) -> tuple[float, int]:
    """``(magnitude threshold, pairs needed)`` for kept frames of size ``h x w``, ``n_frames`` of them."""
    return 6.0 * (min(h, w) / 256.0), round(4 * (n_frames / 16.0))


def pair_score(flow: np.ndarray) -> float:
    """Mean of the top 5% flow magnitudes of one ``(h, w, 2)`` flow (float32 arithmetic, as VBench)."""
    flow = np.asarray(flow, np.float32)
    if flow.ndim != 3 or flow.shape[-1] != 2:
        raise ValueError(f"flow shape {flow.shape}: expected (h, w, 2)")
    rad = np.sqrt(np.square(flow[..., 0]) + np.square(flow[..., 1])).ravel()
    cut = int(rad.size * TOP_FRACTION)
    if cut < 1:
        raise ValueError(f"flow shape {flow.shape}: under 20 pixels, no top 5% to average")
    return np.mean(np.sort(rad)[::-1][:cut]).item()


def is_dynamic(scores: list[float], threshold: float, needed: int) -> bool:
    """VBench's ``check_move``: count scores above the threshold, true once the count reaches ``needed``."""
    count = 0
    for s in scores:
        count += s > threshold
        if count >= needed:
            return True
    return False


def video_dynamic(frames: np.ndarray, fps: float, flow_fn: Callable, batch: int = 4) -> dict:
    """One video's verdict. ``frames (T, H, W, 3)`` RGB in [0, 255] (all decoded frames); ``flow_fn(im1,
    im2)`` maps ``(B, h, w, 3)`` float32 pairs to the ``(B, h, w, 2)`` full-resolution flow (``raft_flow_fn``).
    Returns ``dynamic``, the pair ``scores``, ``threshold``, ``needed`` and the frame ``interval``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames shape {frames.shape}: expected (T, H, W, 3) with T >= 1")
    k = frame_interval(fps)
    kept = frames[::k].astype(np.float32)
    threshold, needed = thresholds(kept.shape[1], kept.shape[2], len(kept))
    padded = pad_frames(kept)
    scores = []
    for i in range(0, len(padded) - 1, batch):
        j = min(i + batch, len(padded) - 1)
        flows = np.asarray(flow_fn(padded[i:j], padded[i + 1:j + 1]))
        scores += [pair_score(f) for f in flows]
    return {"dynamic": is_dynamic(scores, threshold, needed), "scores": scores, "threshold": threshold,
            "needed": needed, "interval": k}


def dynamic_degree(verdicts: list[bool]) -> float:
    """The fraction of dynamic videos (VBench's ``np.mean`` of the booleans)."""
    if not verdicts:
        raise ValueError("verdicts is empty: no video to score")
    return float(np.mean(verdicts))


def raft_flow_fn(model, iters: int = ITERS) -> Callable:
    """``flow_fn`` for ``video_dynamic`` from a loaded ``mm_jax.models.raft.RAFT``: jitted, ``iters`` updates."""
    from flax import nnx

    run = nnx.jit(lambda m, a, b: m(a, b, iters)[1])
    return lambda a, b: run(model, a, b)


def save_raft(model, path) -> int:
    """Write a ``RAFT`` to ``path`` (.safetensors, torch names, config in the metadata); the tensor count."""
    import json

    from mm_jax.metrics import torch_named

    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}
    return torch_named.save(model, path, meta, DROP_PARTS)


def load_raft(path):
    """The ``RAFT`` that :func:`save_raft` wrote to ``path``; a ValueError names what does not match."""
    import json

    from flax import nnx

    from mm_jax.metrics import torch_named
    from mm_jax.models.raft import RAFT, RAFTConfig

    tensors, meta = torch_named.read(path, "--raft", HOW)
    if meta.get("format") != FORMAT:
        raise ValueError(f"--raft {path}: metadata format {meta.get('format')!r}, expected {FORMAT!r} ({HOW})")
    cfg = RAFTConfig.from_dict({k: v for k, v in json.loads(meta["config"]).items() if k not in RAFTConfig.TAG})
    model = nnx.eval_shape(lambda: RAFT(cfg, rngs=nnx.Rngs(0)))
    torch_named.fill(model, tensors, f"--raft {path}", DROP_PARTS)
    return model


def video_fps(path, fps: float | None = None) -> tuple[float, str]:
    """``(frame rate, where it came from)`` of a video: an mp4's container rate (it wins over ``fps``), else
    ``fps`` (``--fps``); a ValueError when neither gives one."""
    from pathlib import Path

    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".mp4":
        import imageio.v3 as iio

        rate = float(iio.immeta(path, plugin="pyav").get("fps") or 0)
        if rate > 0:
            return rate, "mp4"
    if fps is None:
        raise ValueError(f"video {path}: no frame rate in the file (.npy, .gif, image folders carry none); "
                         "pass --fps (dynamic_degree keeps every round(fps/8)-th frame)")
    if not fps > 0:
        raise ValueError(f"--fps {fps}: must be positive")
    return float(fps), "--fps"
