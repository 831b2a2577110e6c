"""One record -> one training example (the batch contract without the batch axis): frame sampling,
resize + centre crop, face mask, tokenization, condition dropout, the reference face at the image
encoder's size (``ExampleTransform``), and the frame and crop helpers ``precompute`` shares.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mm_jax.data.records import DEFAULT_REF_SIZE, decode_record


def precomputed_frames(frames: int, frame_stride: int) -> list[int]:
    """The frames of a clip that ``--precompute`` encodes and the loader's precomputed path masks:
    ``frames`` frames from frame 0 at ``frame_stride``."""
    return list(range(0, (frames - 1) * frame_stride + 1, frame_stride))


def decode_jpeg(b) -> np.ndarray:
    """JPEG bytes -> RGB uint8; an array (a frame TFDS decoded already) passes as it is."""
    import cv2

    if isinstance(b, np.ndarray):
        return b
    img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("undecodable JPEG")
    return img[..., ::-1]


def cover_crop(h: int, w: int, out_h: int, out_w: int) -> tuple[float, int, int, int, int]:
    """Scale to cover (out_h, out_w) then centre-crop: -> (scale, resized h, resized w, top, left)."""
    s = max(out_h / h, out_w / w)
    rh, rw = max(out_h, int(round(h * s))), max(out_w, int(round(w * s)))
    return s, rh, rw, (rh - out_h) // 2, (rw - out_w) // 2


@dataclasses.dataclass
class ExampleTransform:
    """Record bytes + rng -> one example dict (the batch contract, without the batch axis)."""
    height: int
    width: int
    frames: int
    frame_stride: int
    max_text_length: int
    drops: tuple[float, float, float]
    class_words: tuple[str, ...]
    tokenizer: Any
    precomputed: bool
    null_text: np.ndarray | None
    source_names: tuple[str, ...]
    source_starts: tuple[int, ...]  # global index of each shard's first record
    ref_size: int = DEFAULT_REF_SIZE  # the image encoder's image_size: ref_pixels are (ref_size, ref_size)

    def where(self, index: int) -> str:
        k = int(np.searchsorted(self.source_starts, index, side="right")) - 1
        name = self.source_names[k]
        return f"{name if name.startswith('split ') else 'shard ' + name}, record {index - self.source_starts[k]}"

    def _tok(self):
        if isinstance(self.tokenizer, (str, Path)):
            from mm_jax.text import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        return self.tokenizer

    def _check_precomputed(self, r: dict, index: int) -> None:
        """The record's latents are of the frames and size this config reads, or a ValueError that names
        the field, the record's value and the config's."""
        pre = r.get("precomputed")
        rebuild = (f"rebuild with python -m mm_jax.data.build --precompute --frames {self.frames} --frame-stride "
                   f"{self.frame_stride} --height {self.height} --width {self.width}")
        if not isinstance(pre, dict) or "latents" not in r:
            raise ValueError(f"{self.where(index)}: no precomputed latents (data.precomputed=True); {rebuild}")
        for field, want in (("frames", self.frames), ("frame_stride", self.frame_stride), ("height", self.height),
                            ("width", self.width)):
            if pre.get(field) != want:
                raise ValueError(f"{self.where(index)}: latents precomputed with {field}={pre.get(field)}, but "
                                 f"data.{field}={want}; set data.{field}={pre.get(field)} or {rebuild}")
        picks = precomputed_frames(self.frames, self.frame_stride)
        if pre.get("frame_indices") != picks:
            raise ValueError(f"{self.where(index)}: latents precomputed from frames {pre.get('frame_indices')}, but "
                             f"the loader masks frames {picks}; {rebuild}")

    def __call__(self, item, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index, data = item  # MMR1 bytes (shards) or the record's fields (typed TFDS features)
        r = data if isinstance(data, dict) else decode_record(data, self.where(index))
        n = len(r["frames"])
        span = (self.frames - 1) * self.frame_stride + 1
        found = np.asarray(r["face_found"], bool)
        if self.precomputed:
            self._check_precomputed(r, index)
            start = 0  # the latents were computed from these frames (precomputed_frames), centre crop
        elif self.frames == 1:
            faces = np.flatnonzero(found)
            start = int(rng.choice(faces)) if len(faces) else int(rng.integers(n))
        else:
            if n < span:
                raise ValueError(f"{self.where(index)} ({r.get('source')}) has {n} frames; data.frames={self.frames} at "
                                 f"stride {self.frame_stride} needs {span}: lower them or rebuild with longer clips")
            start = int(rng.integers(n - span + 1))
        picks = list(range(start, start + span, self.frame_stride))[:self.frames]
        s, rh, rw, top, left = cover_crop(r["height"], r["width"], self.height, self.width)
        out: dict[str, np.ndarray] = {}
        if not self.precomputed:
            import cv2

            video = np.stack([cv2.resize(decode_jpeg(r["frames"][i]), (rw, rh), interpolation=cv2.INTER_AREA)
                              [top:top + self.height, left:left + self.width] for i in picks])
            out["pixels"] = (video.astype(np.float32) / 127.5 - 1.0)
        mask = np.zeros((len(picks), self.height, self.width), np.float32)
        for k, i in enumerate(picks):
            if found[i]:
                x1, y1, x2, y2 = r["boxes"][i] * s - np.array([left, top, left, top])
                y1, y2 = int(np.clip(np.floor(y1), 0, self.height)), int(np.clip(np.ceil(y2), 0, self.height))
                x1, x2 = int(np.clip(np.floor(x1), 0, self.width)), int(np.clip(np.ceil(x2), 0, self.width))
                mask[k, y1:y2, x1:x2] = 1.0
        out["face_mask"] = mask
        # condition dropout: one draw, disjoint ranges for text / ID / both
        u = rng.random()
        d_text, d_id, d_both = self.drops
        drop_text = u < d_text or d_text + d_id <= u < d_text + d_id + d_both
        drop_id = d_text <= u < d_text + d_id + d_both
        caption = "" if drop_text else r["caption"]
        from mm_jax.text import tokenize

        tok = self._tok()
        ids = tokenize(tok, [caption], max_length=self.max_text_length)[0].astype(np.int32)
        class_index = -1
        if not drop_text:
            from mm_jax.text import find_class_token

            try:
                class_index = find_class_token(tok, caption, ids, self.class_words)
            except ValueError:
                warnings.warn(f"{self.where(index)}: no class word in {caption!r}; trained without the ID fusion",
                              stacklevel=2)
        if self.precomputed:
            out["latents"] = np.asarray(r["latents"], np.float32)
            out["latents_std"] = np.asarray(r["latents_std"], np.float32)
            out["text_embeddings"] = np.asarray(self.null_text if drop_text else r["text_embedding"], np.float32)
        else:
            out["input_ids"] = ids
        out["class_index"] = np.int32(class_index)
        from mm_jax.face import CLIP_MEAN, CLIP_STD

        ref = decode_jpeg(r["ref_crop"])
        size = self.ref_size
        if ref.shape[:2] != (size, size):  # the same aligned crop at another scale (it scales with its size)
            import cv2

            if ref.shape[0] < size:
                warnings.warn(f"{self.where(index)}: reference crop of {ref.shape[0]} px upsampled to the image "
                              f"encoder's {size}; rebuild with --ref-size {size} for full detail", stacklevel=2)
            ref = cv2.resize(ref, (size, size), interpolation=cv2.INTER_AREA if ref.shape[0] > size
                             else cv2.INTER_CUBIC)
        out["ref_pixels"] = ((ref.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
        out["e_id"] = np.asarray(r["ref_embedding"], np.float32)
        out["has_id"] = np.bool_(not drop_id)
        return out
