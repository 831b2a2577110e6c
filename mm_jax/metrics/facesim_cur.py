"""FaceSim-Cur (ConsisID ``eval/get_facesim_fid.py``, OpenS2V-Eval ``eval/get_facesim.py``) on our
CurricularFace IR-101 (``mm_jax.models.curricularface``), and the weights file ``--curricularface`` reads.

Per image (the reference photo, each chosen frame) their ``process_image`` finds the face as FaceSim-Arc
does (``consisid.face_embedding``: buffalo_l at 320, largest face, grey-pad retry) and crops
``norm_crop(image_bgr, kps, 224)`` of the UNPADDED image -> RGB (``consisid.aligned_face``); ``inference``
resizes to 112, normalises and embeds (``curricularface_embed``). Per frame with a face
``max(cos(e_ref, e_frame), 0)``; a frame without a face is skipped. The video's score:

* ConsisID: the mean over the frames with a face (0 when none has one);
* OpenS2V-Eval: the same mean with the zero scores also dropped (``if cur_score != 0.0``).

Weights: ``tools/convert_weights/curricularface_save.py`` converts the published
``glint360k_curricular_face_r101_backbone.bin`` (a torch file) into a ``.safetensors`` of our
parameters and BatchNorm statistics with the config in its metadata; ``load`` reads it (no torch).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FORMAT = "mm_jax.curricularface"
BATCH = 16  # faces per compiled embedding batch


def _flat(model):
    from flax import nnx

    from mm_jax.checkpoint import flat_key

    return [(flat_key(p), v) for p, v in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))]


def save(model, path: str | Path) -> int:
    """Write ``model`` (a ``CurricularFaceIR``) to ``path`` (.safetensors); returns the tensor count."""
    from safetensors.numpy import save_file

    tensors = {k: np.asarray(v.get_value(), np.float32) for k, v in _flat(model)}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(model.config.to_dict())})
    return len(tensors)


def load(path: str | Path):
    """The ``CurricularFaceIR`` saved at ``path`` by ``save``; a ValueError names what does not match."""
    import jax.numpy as jnp
    from flax import nnx
    from safetensors import safe_open

    from mm_jax.models.curricularface import CurricularFaceConfig, CurricularFaceIR

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"--curricularface {path}: expected the .safetensors that "
                         "tools/convert_weights/curricularface_save.py writes from the published .bin")
    with safe_open(str(path), "np") as f:
        meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"--curricularface {path}: metadata format {meta.get('format')!r}, expected {FORMAT!r} "
                             "(convert with tools/convert_weights/curricularface_save.py)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    cfg = CurricularFaceConfig.from_dict(json.loads(meta["config"]))
    model = nnx.eval_shape(lambda: CurricularFaceIR(cfg, rngs=nnx.Rngs(0)))
    flat = _flat(model)
    wrong = sorted(set(tensors) ^ {k for k, _ in flat})
    wrong += [k for k, v in flat if k in tensors and tuple(tensors[k].shape) != tuple(v.get_value().shape)]
    if wrong:
        raise ValueError(f"--curricularface {path}: tensors missing, unexpected or misshapen: {wrong[:8]}")
    for k, v in flat:
        v.set_value(jnp.asarray(tensors[k], v.get_value().dtype))
    return model


def embed_faces(model, faces_224_rgb: list[np.ndarray]) -> np.ndarray:
    """``(len, 512)`` L2-normalised embeddings of aligned 224 RGB crops (their ``inference``), in
    zero-padded batches of ``BATCH`` (one compiled shape; rows are independent in inference)."""
    from mm_jax.metrics.curricularface_embed import embed, resize_aligned

    small = resize_aligned(np.stack(faces_224_rgb))
    out = []
    for i in range(0, len(small), BATCH):
        chunk = small[i:i + BATCH]
        pad = np.zeros((BATCH - len(chunk),) + chunk.shape[1:], np.uint8)
        out.append(embed(model, np.concatenate([chunk, pad]))[:len(chunk)])
    return np.concatenate(out)


def reference_embedding(model, image, hit) -> np.ndarray:
    """The reference photo's embedding from its ``consisid.reference_hit``."""
    from mm_jax.metrics.consisid import aligned_face

    return embed_faces(model, [aligned_face(image, hit)])[0]


def facesim_cur(frames: np.ndarray, hits, ref_emb: np.ndarray, model, drop_zeros: bool = False,
                crops: dict | None = None) -> dict:
    """FaceSim-Cur of (N, H, W, 3) RGB uint8 frames given ``consisid.frame_hits`` (shared with
    FaceSim-Arc): the score, the faces counted, and per read frame the clamped cosine (None: no face).
    ``drop_zeros``: OpenS2V-Eval's rule (clamped-to-zero frames leave the mean too). ``crops``: read position ->
    its ``consisid.aligned_face`` crop when already cut (shared with the face FID)."""
    from mm_jax.metrics.consisid import aligned_face

    idx, hits = hits
    found = [k for k, h in enumerate(hits) if h is not None]
    per_frame = [None] * len(hits)
    if found:
        cut = [crops[k] if crops is not None else aligned_face(frames[idx[k]], hits[k]) for k in found]
        embs = embed_faces(model, cut).astype(np.float64)
        ref = np.asarray(ref_emb, np.float64)
        cos = embs @ ref / np.maximum(np.linalg.norm(embs, axis=-1) * np.linalg.norm(ref), 1e-8)
        for k, c in zip(found, cos):
            per_frame[k] = max(0.0, float(c))
    counted = [s for s in per_frame if s is not None and not (drop_zeros and s == 0.0)]
    return {"facesim_cur": float(np.mean(counted)) if counted else 0.0, "facesim_cur_faces": len(counted),
            "per_frame": {"facesim_cur": per_frame}}
