"""One source item -> one training record or a skip reason: the per-example work of every builder.

``ExampleMaker(options)(item) -> Outcome``. Both the single-machine builder (``mm_jax.data.build``)
and the Beam pipeline of the TFDS builders (``mm_jax.data.tfds``) call it, so both write the same
records. Steps: caption check (+ optional rewrite, ``mm_jax.data.captions``) -> read the target
(JPEG frames, up to ``max_frames``) -> the largest face per frame (box + 5 landmarks; frames without
one are recorded as such) -> the target's ArcFace embedding (mean over its faces, normalized) -> a
reference face: the item's ``ref`` image if given, else for a clip the face frame farthest from
the middle frame [ours], for a lone image the image itself -> cosine filter (reference vs target,
``min_similarity``, 0.5 as magic_mirror_reference.md 5) -> the record (``mm_jax.data.records``),
with the reference stored as its CLIP-aligned crop (``ref_size`` px square: the image encoder's
``image_size``) + ArcFace embedding.

Skip reasons: bad_listing (a listing line or file that could not be read, ``sources.invalid_item``),
no_class_word, unreadable, no_face, unreadable_ref, no_face_in_ref, low_similarity,
and "error: <type>: <message>" for anything unexpected (a bug or an odd file never stops a build).
"""
from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np

from mm_jax.data.captions import CaptionCheck, CaptionRule, fix_caption, rules_to_json
from mm_jax.data.records import DEFAULT_REF_SIZE, encode_record
from mm_jax.data.sources import IMAGE_EXT, item_kind, source_name
from mm_jax.text import CLASS_WORDS

SKIP_REASONS = ("bad_listing", "no_class_word", "unreadable", "no_face", "unreadable_ref", "no_face_in_ref",
                "low_similarity")


@dataclasses.dataclass(frozen=True)
class ExampleOptions:
    face_models: str
    max_frames: int = 49
    min_similarity: float = 0.5
    det_size: int = 640
    jpeg_quality: int = 95
    class_words: tuple[str, ...] = CLASS_WORDS
    caption_rules: tuple[CaptionRule, ...] = ()
    ref_size: int = DEFAULT_REF_SIZE  # px of the stored reference crop: the image encoder's image_size

    def problems(self) -> list[str]:
        """The out-of-range settings, each as "--flag value: must be ..." (empty when all are valid);
        the dataset CLIs refuse them before anything is written."""
        bad = [(f"--max-frames {self.max_frames}", ">= 1") if self.max_frames < 1 else None,
               (f"--min-similarity {self.min_similarity}", "in [-1, 1] (a cosine similarity)")
               if not -1.0 <= self.min_similarity <= 1.0 else None,
               (f"--det-size {self.det_size}", "a positive multiple of 32") if self.det_size < 32
               or self.det_size % 32 else None,
               (f"--jpeg-quality {self.jpeg_quality}", "in [1, 100]") if not 1 <= self.jpeg_quality <= 100 else None,
               (f"--ref-size {self.ref_size}", ">= 32 (the image encoder's image_size)") if self.ref_size < 32 else None]
        return [f"{flag}: must be {allowed}" for flag, allowed in (b for b in bad if b)]

    def settings(self) -> dict[str, Any]:
        """What decides the records' content, for summaries and dataset metadata."""
        return {"face_models": self.face_models, "max_frames": self.max_frames, "min_similarity": self.min_similarity,
                "det_size": self.det_size, "jpeg_quality": self.jpeg_quality,
                "caption_rules": rules_to_json(self.caption_rules), "ref_size": self.ref_size}


def add_example_arguments(ap) -> None:
    """The per-example options of ``ExampleOptions`` as flags of a dataset CLI (``build``, ``prepare``)."""
    d = ExampleOptions(face_models="")
    ap.add_argument("--max-frames", type=int, default=d.max_frames, help="frames kept per clip")
    ap.add_argument("--min-similarity", type=float, default=d.min_similarity, help="ArcFace cosine reference vs target")
    ap.add_argument("--det-size", type=int, default=d.det_size, help="detector input size")
    ap.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    ap.add_argument("--ref-size", type=int, default=d.ref_size,
                    help="reference face crop size: the image encoder's image_size (its config.json; 336 for a "
                         "336-px tower)")
    ap.add_argument("--caption-rules", default="none",
                    help="rewrite captions without a class word: none, default ('a person' rules) or a JSON rules file")


@dataclasses.dataclass
class Outcome:
    status: str                # "ok" | "skip"
    caption: CaptionCheck      # the caption check (counted by the builders)
    kind: str | None = None    # "image" | "video" when ok
    example: dict | None = None  # the record's fields (``mm_jax.data.records``) when ok
    reason: str | None = None  # when skipped

    @property
    def record(self) -> bytes | None:
        """The example as an MMR1 record (``records.encode_record``), as the shard builder writes it."""
        return None if self.example is None else encode_record(self.example)


# -- reading -------------------------------------------------------------------------------------
def _decode_clip(src, *, span=None, frames=None, max_frames: int) -> np.ndarray:
    """RGB uint8 (F, H, W, 3) of a clip (a path or a file object), limited to ``span`` seconds or
    the ``frames`` [f0, f1) range, at most ``max_frames`` frames."""
    import av

    out = []
    with av.open(src) as container:
        stream = container.streams.video[0]
        if span and span[0] > 0 and stream.time_base:
            container.seek(int(span[0] / stream.time_base), stream=stream)  # to the keyframe before
        for i, frame in enumerate(container.decode(stream)):
            t = float(frame.pts * stream.time_base) if frame.pts is not None and stream.time_base else None
            if frames and i < frames[0]:
                continue
            if frames and i >= frames[1]:
                break
            if span and t is not None and t < span[0]:
                continue
            if span and t is not None and t >= span[1]:
                break
            out.append(frame.to_ndarray(format="rgb24"))
            if len(out) >= max_frames:
                break
    if not out:
        raise ValueError("no frames decoded")
    return np.stack(out)


def read_media(item: dict, max_frames: int) -> tuple[str, np.ndarray]:
    """-> (kind, RGB uint8 frames (F, H, W, 3)). Raises for anything unreadable."""
    import imageio.v3 as iio

    from mm_jax.video_io import read_video

    kind, data = item_kind(item), item.get("data")
    if kind == "image":
        ext = "." + (item.get("member") or item["path"]).rsplit(".", 1)[-1].lower()
        img = np.asarray(iio.imread(data, extension=ext if ext in IMAGE_EXT else None) if data is not None
                         else iio.imread(item["path"]))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return "image", img[None, ..., :3]
    if data is not None or item.get("span") or item.get("frames"):
        src = io.BytesIO(data) if data is not None else item["path"]
        return "video", _decode_clip(src, span=item.get("span"), frames=item.get("frames"), max_frames=max_frames)
    frames = read_video(item["path"])
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"no frames decoded (shape {frames.shape})")
    return "video", frames[:max_frames]


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def _largest(dets: np.ndarray) -> int:
    return int(np.argmax((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])))


# -- one item --------------------------------------------------------------------------------------
class ExampleMaker:
    """``maker(item) -> Outcome``; the face models load on first use (once per process or Beam
    worker: keep one maker per process)."""

    def __init__(self, options: ExampleOptions):
        self.options = options
        self._analyzer = None

    def analyzer(self):
        if self._analyzer is None:
            from mm_jax.face import FaceAnalyzer

            self._analyzer = FaceAnalyzer(self.options.face_models, det_size=self.options.det_size)
        return self._analyzer

    def __call__(self, item: dict) -> Outcome:
        """Never raises for bad input; an unexpected exception becomes the skip reason "error: ..."."""
        if item.get("invalid"):  # an unreadable listing entry: its caption was never read, so not checked
            return Outcome("skip", CaptionCheck(caption="", had_class_word=True, rule=None), reason="bad_listing")
        check = fix_caption(item.get("caption") or "", self.options.caption_rules, self.options.class_words)
        try:
            return self._make(item, check)
        except Exception as e:  # a bug or an odd file must not kill the whole build
            return Outcome("skip", check, reason=f"error: {type(e).__name__}: {e}")

    def _make(self, item: dict, check: CaptionCheck) -> Outcome:
        o = self.options
        if not check.ok:
            return Outcome("skip", check, reason="no_class_word")
        try:
            kind, frames = read_media(item, o.max_frames)
        except Exception:  # any decoder failure: the file is unreadable
            return Outcome("skip", check, reason="unreadable")
        fa = self.analyzer()
        n = len(frames)
        boxes = np.full((n, 4), np.nan, np.float32)
        kps = np.zeros((n, 5, 2), np.float32)
        found = np.zeros((n,), bool)
        crops = []
        for i, f in enumerate(frames):
            bgr = np.ascontiguousarray(f[..., ::-1])
            dets, pts = fa.detect(bgr)
            if len(dets):
                j = _largest(dets)
                boxes[i], kps[i], found[i] = dets[j, :4], pts[j], True
                crops.append(fa.align(bgr, pts[j], fa.models.rec_size))
        if not found.any():
            return Outcome("skip", check, reason="no_face")
        emb = fa.embed_crops(crops)
        target = emb.mean(0)
        target = (target / max(np.linalg.norm(target), 1e-12)).astype(np.float32)
        if item.get("ref"):
            try:
                from mm_jax.face import read_image

                ref_bgr = read_image(item["ref"])
            except Exception:
                return Outcome("skip", check, reason="unreadable_ref")
            dets, pts = fa.detect(ref_bgr)
            if not len(dets):
                return Outcome("skip", check, reason="no_face_in_ref")
            ref_kps, ref_frame = pts[_largest(dets)], -1
            ref_emb = fa.embed_crops([fa.align(ref_bgr, ref_kps, fa.models.rec_size)])[0]
        else:
            idx = np.flatnonzero(found)
            ref_frame = int(idx[np.argmax(np.abs(idx - (n - 1) / 2))])  # farthest from the middle frame
            ref_bgr = np.ascontiguousarray(frames[ref_frame][..., ::-1])
            ref_kps = kps[ref_frame]
            ref_emb = emb[int(np.searchsorted(idx, ref_frame))]
        similarity = float(np.dot(ref_emb, target))
        if similarity < o.min_similarity:
            return Outcome("skip", check, reason="low_similarity")
        ref_crop = fa.align(ref_bgr, ref_kps, o.ref_size)[..., ::-1]
        q = o.jpeg_quality
        record = {"kind": kind, "source": source_name(item), "caption": check.caption,
                  "height": int(frames.shape[1]), "width": int(frames.shape[2]), "frames": [_jpeg(f, q) for f in frames],
                  "boxes": boxes, "kps": kps, "face_found": found, "ref_crop": _jpeg(ref_crop, q),
                  "ref_embedding": ref_emb.astype(np.float32), "target_embedding": target, "ref_frame": ref_frame,
                  "similarity": similarity}
        return Outcome("ok", check, kind=kind, example=record)
