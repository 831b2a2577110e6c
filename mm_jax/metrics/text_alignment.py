"""CLIP text alignment of a video with its prompt, from a CLIP model the user supplies.

    scorer = TextAlignment("clip_ckpt")      # an mm_jax checkpoint with the ``clip`` component
    scorer.score(frames, "a man reading")    # {"clip_text_alignment": ..., "per_frame": [...]}

Definition: the mean over frames of ``100 * max(cos(E_img(frame), E_txt(prompt)), 0)``, the
CLIPScore convention of torchmetrics, where E are CLIP's projected embeddings. Frames are
preprocessed as transformers' ``CLIPImageProcessor`` does: shortest side resized to the tower's
image size (bicubic, PIL), centre crop, scaled to [0, 1], normalized with CLIP's mean and std.
Convert a Hugging Face CLIP folder with
``python -m tools.convert_weights.from_torch --src clip-vit-large-patch14 --dst clip_ckpt --components clip``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mm_jax.face import CLIP_MEAN, CLIP_STD


def preprocess(frames: np.ndarray, size: int) -> np.ndarray:
    """(F, H, W, 3) uint8 -> (F, size, size, 3) float32 CLIP-normalized pixels."""
    from PIL import Image

    out = []
    for f in np.asarray(frames):
        h, w = f.shape[:2]
        short, long_ = (h, w) if h <= w else (w, h)
        new_long = int(size * long_ / short)
        nh, nw = (size, new_long) if h <= w else (new_long, size)
        img = np.asarray(Image.fromarray(f).resize((nw, nh), Image.Resampling.BICUBIC)) if (nh, nw) != (h, w) else f
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(img[top:top + size, left:left + size])
    x = np.stack(out).astype(np.float32) / 255.0
    return ((x - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class TextAlignment:
    """CLIP loaded once; prompts and frames embedded in jitted batches."""

    def __init__(self, clip_dir: str | Path, *, batch_size: int = 32, mesh=None):
        import jax
        from flax import nnx
        from transformers import AutoTokenizer

        from mm_jax import checkpoint

        clip_dir = Path(clip_dir)
        tok_dir = clip_dir / "clip" / "tokenizer"
        if not tok_dir.is_dir():
            raise FileNotFoundError(f"--clip {clip_dir}: no clip/tokenizer folder; convert a Hugging Face CLIP folder "
                                    "with tools/convert_weights/from_torch.py --components clip")
        self.model = checkpoint.load_component(clip_dir, "clip", mesh=mesh)
        self.tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        self.size = self.model.cfg.vision.image_size
        self.max_len = self.model.cfg.text.max_position_embeddings
        self.batch_size = batch_size
        self._text = nnx.jit(lambda m, ids: m.text_embeds(ids))
        self._image = nnx.jit(lambda m, px: m.image_embeds(px))
        self._jax = jax

    def text_embedding(self, prompt: str) -> np.ndarray:
        """(D,) unit-norm embedding of one prompt (truncated to the tower's positions)."""
        ids = self.tokenizer([prompt], padding="max_length", max_length=self.max_len, truncation=True,
                             return_tensors="np").input_ids
        return _unit(np.asarray(self._text(self.model, np.asarray(ids, np.int32)), np.float64))[0]

    def image_embeddings(self, frames: np.ndarray) -> np.ndarray:
        """(F, D) unit-norm embeddings of (F, H, W, 3) uint8 frames; the last batch is padded to the
        batch size so one compiled shape serves every video."""
        out = []
        for i in range(0, len(frames), self.batch_size):
            px = preprocess(frames[i:i + self.batch_size], self.size)
            n = len(px)
            if n < self.batch_size:
                px = np.concatenate([px, np.zeros((self.batch_size - n,) + px.shape[1:], px.dtype)])
            out.append(np.asarray(self._image(self.model, px), np.float64)[:n])
        return _unit(np.concatenate(out))

    def score(self, frames: np.ndarray, prompt: str) -> dict:
        """``clip_text_alignment`` (mean over frames) and its per-frame values."""
        cos = self.image_embeddings(frames) @ self.text_embedding(prompt)
        per_frame = 100.0 * np.maximum(cos, 0.0)
        return {"clip_text_alignment": float(per_frame.mean()), "per_frame": per_frame.tolist()}
