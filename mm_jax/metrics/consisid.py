"""ConsisID's evaluation arithmetic (PKU-YuanGroup/ConsisID ``eval/get_facesim_fid.py`` and
``eval/get_clipscore.py``), on our face front end (``mm_jax.face``) and CLIP (``text_alignment``).

FaceSim-Arc of a video against a reference photo:

1. frames ``np.linspace(0, N - 1, 16, dtype=int)`` (repeats read again);
2. per image (BGR, as insightface sees it): detect at 320x320 (threshold 0.5); take the face with
   the largest box area (the last of equal areas, as a stable ascending sort's ``[-1]``); if there
   is none, pad the image by ``int(0.25 h)`` rows top and bottom and ``int(0.25 w)`` columns left and
   right with grey (128, 128, 128) and detect again; the embedding is the ArcFace embedding of the
   face in the image it was found in (padded or not); still none: the frame is skipped;
3. per frame ``max(cos(e_ref, e_frame), 0)``; the video's score is the mean over the frames with a
   face, 0 when no chosen frame has one. The reference uses the same rule (no face: an error).

CLIPScore of a video and its prompt: frames ``int(i * N / 16)``, i < 16, fed to CLIP as the BGR
arrays OpenCV decodes (their script passes them to ``CLIPProcessor`` unconverted), the prompt
tokenized to at most 77 tokens; score = mean over frames of ``logits_per_image`` =
``exp(logit_scale) * cos(E_img, E_txt)`` (= 100 cos for openai/clip-vit-base-patch32), not clamped.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mm_jax.face import FaceAnalyzer, NoFaceError, arcface_template, read_image
from mm_jax.metrics.protocols import FrameRule, frame_indices

PAD_SCALE = 1.25
PAD_GREY = (128, 128, 128)
FACESIM_FRAMES = FrameRule("linspace", 16)
CLIPSCORE_FRAMES = FrameRule("strided", 16)


def pad_grey(img_bgr: np.ndarray, scale: float = PAD_SCALE) -> np.ndarray:
    """The image with ``int(h * (scale - 1))`` grey rows above and below and ``int(w * (scale - 1))``
    grey columns left and right."""
    import cv2

    h, w = img_bgr.shape[:2]
    dy, dx = int(h * (scale - 1.0)), int(w * (scale - 1.0))
    return cv2.copyMakeBorder(img_bgr, dy, dy, dx, dx, cv2.BORDER_CONSTANT, value=PAD_GREY)


@dataclasses.dataclass
class FaceHit:
    embedding: np.ndarray     # (D,) ArcFace embedding of the face, in the image it was found in
    kps: np.ndarray           # (5, 2) its landmarks in the ORIGINAL image's pixels (the pad subtracted)
    padded: bool              # found only after the grey pad


def _largest(analyzer: FaceAnalyzer, img_bgr: np.ndarray):
    dets, kps = analyzer.detect(img_bgr)
    if len(dets) == 0:
        return None
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    i = int(np.argsort(area, kind="stable")[-1])
    return analyzer.embed_crops([analyzer.align(img_bgr, kps[i], analyzer.models.rec_size)])[0], kps[i]


def face_embedding(analyzer: FaceAnalyzer, image) -> FaceHit | None:
    """The largest face of an image (path or RGB uint8 array) by ConsisID's rule, or None. The
    landmarks come back in the original image's pixels, as their ``process_image`` returns them for
    the 224 crop that FaceSim-Cur and the face FID read (``norm_crop`` of the UNPADDED image)."""
    img = read_image(image)
    hit = _largest(analyzer, img)
    if hit is not None:
        return FaceHit(hit[0], hit[1], False)
    hit = _largest(analyzer, pad_grey(img))
    if hit is None:
        return None
    h, w = img.shape[:2]
    shift = np.array([int(w * (PAD_SCALE - 1.0)), int(h * (PAD_SCALE - 1.0))], np.float32)  # (left, top)
    return FaceHit(hit[0], hit[1] - shift, True)


def reference_hit(analyzer: FaceAnalyzer, path) -> FaceHit:
    hit = face_embedding(analyzer, path)
    if hit is None:
        raise NoFaceError(f"no face found in {path}, even padded 25% with grey (ConsisID's rule)")
    return hit


def reference_embedding(analyzer: FaceAnalyzer, path) -> np.ndarray:
    return reference_hit(analyzer, path).embedding


def aligned_face(image, hit: FaceHit, size: int = 224) -> np.ndarray:
    """Their ``process_image`` crop: ``norm_crop(image_bgr, kps, size)`` of the UNPADDED image, then
    BGR -> RGB; (size, size, 3) RGB uint8 (what FaceSim-Cur and the face FID read).

    The matrix is scikit-image's float64 ``SimilarityTransform`` onto the ArcFace template, as
    insightface's ``estimate_norm`` computes it: ``FaceAnalyzer.align``'s float32 matrix moves 40-60
    of the 224x224x3 crop's values by one level, which shifts a FaceSim-Cur cosine by ~1e-4."""
    import cv2
    from skimage.transform import SimilarityTransform

    m = SimilarityTransform.from_estimate(np.asarray(hit.kps), arcface_template(size)).params[:2]
    crop = cv2.warpAffine(read_image(image), m, (size, size), borderValue=0.0)
    return np.ascontiguousarray(crop[..., ::-1])


def frame_hits(frames: np.ndarray, analyzer: FaceAnalyzer, rule: FrameRule = FACESIM_FRAMES):
    """``(indices, hits)``: the frames ``rule`` reads and each one's ``face_embedding`` (None: no face);
    every repeat is detected again, as their loop does."""
    idx = frame_indices(rule, len(frames))
    return idx, [face_embedding(analyzer, frames[i]) for i in idx]


def facesim_arc(frames: np.ndarray, ref_emb: np.ndarray, analyzer: FaceAnalyzer,
                rule: FrameRule = FACESIM_FRAMES, hits=None) -> dict:
    """FaceSim-Arc of (N, H, W, 3) RGB uint8 frames: the score, the frame indices read, and per read
    frame the clamped cosine (None: skipped, no face) and whether the pad retry found the face.
    ``rule``: ConsisID's 16 linspace frames; OpenS2V-Eval's ``get_facesim.py`` reads 32 and is
    otherwise the same (its zero check, ``arc_scores != 0.0``, tests the list, so zeros stay).
    ``hits``: ``frame_hits(frames, analyzer, rule)`` when already computed (shared with FaceSim-Cur)."""
    idx, hits = hits if hits is not None else frame_hits(frames, analyzer, rule)
    per_frame, padded = [], []
    ref = np.asarray(ref_emb, np.float64)
    for hit in hits:
        padded.append(hit is not None and hit.padded)
        if hit is None:
            per_frame.append(None)
            continue
        e = np.asarray(hit.embedding, np.float64)
        per_frame.append(max(0.0, float(e @ ref / max(np.linalg.norm(e) * np.linalg.norm(ref), 1e-8))))
    scored = [s for s in per_frame if s is not None]
    return {"facesim_arc": float(np.mean(scored)) if scored else 0.0,
            "facesim_arc_frames": [int(i) for i in idx], "facesim_arc_faces": len(scored),
            "per_frame": {"facesim_arc": per_frame, "facesim_arc_padded": padded}}


def clipscore(frames: np.ndarray, prompt: str, scorer) -> dict:
    """ConsisID's CLIPScore of (N, H, W, 3) RGB uint8 frames with ``scorer`` a
    ``text_alignment.TextAlignment`` (its CLIP and tokenizer); the frames go in as BGR."""
    idx = frame_indices(CLIPSCORE_FRAMES, len(frames))
    bgr = np.ascontiguousarray(np.asarray(frames)[idx][..., ::-1])
    cos = scorer.image_embeddings(bgr) @ scorer.text_embedding(prompt)
    logits = float(np.exp(np.asarray(scorer.model.logit_scale.value, np.float64))) * cos
    return {"clipscore": float(logits.mean()), "clipscore_frames": [int(i) for i in idx],
            "per_frame": {"clipscore": logits.tolist()}}
