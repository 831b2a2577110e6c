"""Face metrics of one video against its reference photo: pure numpy functions of embeddings and
5-point landmarks (insightface order: left eye, right eye, nose, left and right mouth corner).

Definitions (the paper names the metrics; the normalization is ours):

* ``iod(p)``: inter-ocular distance, ``||p_1 - p_0||`` (pixels).
* ``id_sim``: mean over ALL frames of ``cos(e_frame, e_ref)`` (ArcFace embeddings of the largest
  face); a frame with no detected face counts as 0. ``id_sim_detected`` is the same mean over the
  frames with a face only (``null`` when there is none).
* ``fm_ref``: mean over frames with a face of ``mean_k ||s(p_frame)_k - s(p_ref)_k||``, where
  ``s(p) = (p - mean_k p_k) / iod(p)`` puts a face's landmarks in its own frame (centred on their
  mean, in units of its inter-ocular distance). The reference photo and a frame do not share a
  pixel space, so only the face's shape (pose, expression) is compared: translation and scale
  do not count, rotation does. Higher = the face moves away from the reference's pose/expression
  (0 = a pasted copy of the reference's landmark layout).
* ``fm_inter``: mean over consecutive frame pairs (t-1, t) that both have a face of
  ``mean_k ||p_t,k - p_t-1,k|| / ((iod(p_t) + iod(p_t-1)) / 2)``: landmark motion between frames
  in units of inter-ocular distance (frames of one video share a pixel space, so head translation
  counts).
* ``face_fraction``: frames with a detected face / frames.

Frames without a face are skipped by ``fm_ref`` and break the pairs of ``fm_inter`` (a pair needs
both frames); the skipped frames are listed and the numbers of frames / pairs used are reported.
A value with nothing to average over is ``None``.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-8


def iod(kps: np.ndarray) -> np.ndarray:
    """Inter-ocular distance: kps (..., 5, 2) -> (...)."""
    kps = np.asarray(kps, np.float64)
    return np.linalg.norm(kps[..., 1, :] - kps[..., 0, :], axis=-1)


def face_shape(kps: np.ndarray) -> np.ndarray:
    """Landmarks in the face's own frame: (..., 5, 2) -> (..., 5, 2), centred on the landmarks'
    mean and divided by the inter-ocular distance."""
    kps = np.asarray(kps, np.float64)
    return (kps - kps.mean(axis=-2, keepdims=True)) / np.maximum(iod(kps), EPS)[..., None, None]


def fm_ref_per_frame(kps: np.ndarray, ref_kps: np.ndarray) -> np.ndarray:
    """Shape distance of each frame face to the reference face: kps (N, 5, 2), ref_kps (5, 2) -> (N,)."""
    d = face_shape(kps) - face_shape(ref_kps)[None]
    return np.linalg.norm(d, axis=-1).mean(axis=-1)


def fm_inter_per_pair(kps: np.ndarray) -> np.ndarray:
    """Normalized landmark motion between consecutive frames: kps (N, 5, 2) -> (N-1,)."""
    kps = np.asarray(kps, np.float64)
    move = np.linalg.norm(kps[1:] - kps[:-1], axis=-1).mean(axis=-1)
    scale = 0.5 * (iod(kps[1:]) + iod(kps[:-1]))
    return move / np.maximum(scale, EPS)


def cosine(emb: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """cos between each row of emb (N, D) and ref (D,) -> (N,); a zero row gives 0."""
    emb, ref = np.asarray(emb, np.float64), np.asarray(ref, np.float64)
    return emb @ ref / np.maximum(np.linalg.norm(emb, axis=-1) * np.linalg.norm(ref), EPS)


def _mean(x) -> float | None:
    x = np.asarray(x, np.float64)
    return float(x.mean()) if x.size else None


def video_face_metrics(emb: np.ndarray, found: np.ndarray, kps: np.ndarray, ref_emb: np.ndarray,
                       ref_kps: np.ndarray) -> dict:
    """All face metrics of one video. emb (N, D), found (N,) bool, kps (N, 5, 2) of the frames'
    largest faces (anything where ``found`` is False), ref_emb (D,), ref_kps (5, 2) -> a dict of
    the means, the counts behind them and the per-frame values (``None`` where undefined)."""
    found = np.asarray(found, bool)
    n = len(found)
    if n == 0:
        raise ValueError("a video with 0 frames has no metrics")
    sim = np.where(found, cosine(emb, ref_emb), 0.0)
    fm_ref = fm_ref_per_frame(kps, ref_kps)
    pair_ok = found[1:] & found[:-1]
    fm_inter = fm_inter_per_pair(kps)[pair_ok] if n > 1 else np.zeros(0)
    return {
        "frames": n,
        "frames_with_face": int(found.sum()),
        "face_fraction": float(found.mean()),
        "id_sim": float(sim.mean()),
        "id_sim_detected": _mean(sim[found]),
        "fm_ref": _mean(fm_ref[found]),
        "fm_ref_frames": int(found.sum()),
        "fm_inter": _mean(fm_inter),
        "fm_inter_pairs": int(pair_ok.sum()),
        "frames_without_face": [int(i) for i in np.flatnonzero(~found)],
        "per_frame": {
            "found": [bool(f) for f in found],
            "id_sim": [float(s) for s in sim],
            "fm_ref": [float(v) if f else None for v, f in zip(fm_ref, found)],
        },
    }


MEAN_KEYS = ("face_fraction", "id_sim", "id_sim_detected", "fm_ref", "fm_inter")


def mean_over_videos(rows: list[dict], keys=MEAN_KEYS) -> dict:
    """Per-metric mean over videos, skipping videos where the metric is ``None``; ``videos_counted``
    gives how many entered each mean."""
    out, counted = {}, {}
    for k in keys:
        vals = [r[k] for r in rows if r.get(k) is not None]
        out[k] = _mean(vals)
        counted[k] = len(vals)
    out["videos"] = len(rows)
    out["videos_counted"] = counted
    return out
