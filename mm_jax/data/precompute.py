"""Precompute the frozen encoders' outputs into a built set, so training skips the VAE and T5.

For each record: ``frames`` frames from frame 0 at ``frame_stride`` (``transform.precomputed_frames``:
the frames whose face boxes the loader's precomputed path masks), resized and centre-cropped to
(height, width) exactly as the loader does, through the VAE encoder -> the posterior's mean and
std (both x scaling_factor; the training step draws the sample, as encoding at step time would),
and the caption through T5 -> ``text_embedding`` (max_text_length, T). The empty prompt's
embedding goes to ``null_text.npy`` (caption dropout). Each record's ``precomputed`` dict holds
frames, frame_stride, height, width, the encoded ``frame_indices``, max_text_length and the
checkpoint; the loader refuses a record whose values differ from its config's, by name.

``Encoders`` is the one implementation, called by both builders: ``precompute`` rewrites a shard
folder's shards one at a time, aside and renamed (finished shards are skipped on a re-run); the
TFDS builders run it as a Beam step after the records are made (``prepare --precompute``).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from mm_jax.data.records import decode_record, encode_record


def _frames(r: dict, height: int, width: int, picks: list[int]) -> np.ndarray:
    import cv2

    from mm_jax.data.transform import cover_crop, decode_jpeg

    if len(r["frames"]) <= picks[-1]:
        raise ValueError(f"{r.get('source')}: {len(r['frames'])} frames; precomputing frames {picks[0]}..{picks[-1]} "
                         f"({len(picks)} at stride {picks[1] - picks[0] if len(picks) > 1 else 1}) needs "
                         f"{picks[-1] + 1}: lower --frames or --frame-stride, or rebuild with longer clips")
    _, rh, rw, top, left = cover_crop(r["height"], r["width"], height, width)
    video = np.stack([cv2.resize(decode_jpeg(r["frames"][i]), (rw, rh), interpolation=cv2.INTER_AREA)
                      [top:top + height, left:left + width] for i in picks])
    return video.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class PrecomputeSettings:
    """What ``--precompute`` encodes: the checkpoint, the crop size, the clip frames and the text length."""
    checkpoint: str
    height: int = 480
    width: int = 720
    frames: int = 49
    frame_stride: int = 1
    max_text_length: int = 226

    def check(self) -> None:
        """A ValueError naming the flag for a frame count the VAE cannot round-trip or a size < 1."""
        from mm_jax.frame_counts import check

        check(self.frames, "--frames")
        if min(self.height, self.width, self.max_text_length, self.frame_stride) < 1:
            raise ValueError(f"--height {self.height} --width {self.width} --max-text-length {self.max_text_length} "
                             f"--frame-stride {self.frame_stride}: must be positive")

    def kinds(self) -> tuple[str, ...]:
        """The records it applies to: clips for a video stage, images and clips for the image stage."""
        return ("video",) if self.frames > 1 else ("image", "video")

    def record_settings(self) -> dict:
        """The ``precomputed`` dict each record carries (the loader compares it with its config)."""
        from mm_jax.data.transform import precomputed_frames

        return {"height": self.height, "width": self.width, "frames": self.frames, "frame_stride": self.frame_stride,
                "frame_indices": precomputed_frames(self.frames, self.frame_stride),
                "max_text_length": self.max_text_length, "checkpoint": str(self.checkpoint)}


def add_precompute_arguments(ap) -> None:
    """The ``--precompute`` flags of both dataset CLIs (``build``, ``prepare``)."""
    d = PrecomputeSettings(checkpoint="")
    pre = ap.add_argument_group("precompute (training then skips the VAE and T5: data.precomputed=True)")
    pre.add_argument("--precompute", action="store_true", help="also store VAE latents and T5 text embeddings")
    pre.add_argument("--checkpoint", help="converted CogVideoX folder (VAE, T5, tokenizer)")
    pre.add_argument("--height", type=int, default=d.height)
    pre.add_argument("--width", type=int, default=d.width)
    pre.add_argument("--frames", type=int, default=d.frames, help="1 for the image stage; clips: a count the VAE "
                                                                  "decodes exactly (python -m mm_jax.sample --help)")
    pre.add_argument("--frame-stride", type=int, default=d.frame_stride,
                     help="encode frames 0, s, 2s, ... (data.frame_stride)")
    pre.add_argument("--max-text-length", type=int, default=d.max_text_length)


def precompute_settings(ap, args) -> PrecomputeSettings | None:
    """The settings the flags ask for (None without --precompute), checked before anything is
    written: a bad value raises ValueError naming the flag; --precompute without --checkpoint is a
    usage error (exit 2)."""
    if not args.precompute:
        return None
    if not args.checkpoint:
        ap.error("--precompute needs --checkpoint")
    s = PrecomputeSettings(args.checkpoint, args.height, args.width, args.frames, args.frame_stride,
                           args.max_text_length)
    s.check()
    return s


class Encoders:
    """The frozen VAE and T5, loaded once: ``encoders(record)`` adds latents, latents_std,
    text_embedding and precomputed; the shard builder and the Beam pipeline both call it."""

    def __init__(self, settings: PrecomputeSettings):
        import jax

        from mm_jax import checkpoint
        from mm_jax import text as text_lib

        settings.check()
        self.settings, self.record_settings = settings, settings.record_settings()
        self.picks = self.record_settings["frame_indices"]
        self.vae = checkpoint.load_component(settings.checkpoint, "vae")
        self.t5 = checkpoint.load_component(settings.checkpoint, "text_encoder")
        self.tok = text_lib.load_tokenizer(Path(settings.checkpoint) / "tokenizer")
        self._encode = jax.jit(lambda x: self.vae.encode(x))

    def text(self, caption: str) -> np.ndarray:
        from mm_jax import text as text_lib

        return np.asarray(text_lib.encode_prompts(self.t5, self.tok, [caption], self.settings.max_text_length)[0],
                          np.float32)

    def null_text(self) -> np.ndarray:
        """The empty prompt's embedding (``null_text.npy``: caption dropout)."""
        return self.text("")

    def __call__(self, r: dict) -> dict:
        import jax.numpy as jnp

        s = self.settings
        post = self._encode(jnp.asarray(_frames(r, s.height, s.width, self.picks)[None]))
        scale = self.vae.cfg.scaling_factor
        return {**r, "latents": np.asarray(post.mean[0] * scale, np.float32),
                "latents_std": np.asarray(post.std[0] * scale, np.float32), "text_embedding": self.text(r["caption"]),
                "precomputed": self.record_settings}


def precompute(out: str | Path, checkpoint_dir: str | Path, *, height: int, width: int, frames: int,
               frame_stride: int = 1, max_text_length: int = 226, progress: bool = True) -> dict:
    """Add ``latents``, ``latents_std`` and ``text_embedding`` to every record of the shard folder ``out``."""
    from array_record.python.array_record_module import (
        ArrayRecordReader,
        ArrayRecordWriter,
    )
    from tqdm.auto import tqdm

    out = Path(out)
    enc = Encoders(PrecomputeSettings(str(checkpoint_dir), height, width, frames, frame_stride, max_text_length))
    settings = enc.record_settings
    np.save(out / "null_text.npy", enc.null_text())
    shards = sorted(out.glob("*-*.array_record"))
    for shard in tqdm(shards, desc="precomputing", unit="shard", disable=not progress):
        if not shard.name.split("-")[0] in enc.settings.kinds():
            continue
        reader = ArrayRecordReader(str(shard))
        records = [decode_record(x, f"shard {shard.name}, record {i}") for i, x in enumerate(reader.read_all())]
        reader.close()
        if all(r.get("precomputed") == settings for r in records):
            continue
        tmp = shard.with_name(shard.name + ".tmp")
        w = ArrayRecordWriter(str(tmp), "group_size:1")
        for r in records:
            w.write(encode_record(enc(r)))
        w.close()
        os.replace(tmp, shard)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["precomputed"] = settings
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary
