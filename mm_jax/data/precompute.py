"""Precompute the frozen encoders' outputs into a built set, so training skips the VAE and T5.

For each record: ``frames`` frames from frame 0 at ``frame_stride`` (``loader.precomputed_frames``:
the frames whose face boxes the loader's precomputed path masks), resized and centre-cropped to
(height, width) exactly as the loader does, through the VAE encoder -> the posterior's mean and
std (both x scaling_factor; the training step draws the sample, as encoding at step time would),
and the caption through T5 -> ``text_embedding`` (max_text_length, T). The empty prompt's
embedding goes to ``null_text.npy`` (caption dropout). Each record's ``precomputed`` dict holds
frames, frame_stride, height, width, the encoded ``frame_indices``, max_text_length and the
checkpoint; the loader refuses a record whose values differ from its config's, by name. Shards are
rewritten one at a time, aside and renamed; finished shards are skipped on a re-run.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mm_jax.data.records import decode_record, encode_record


def _frames(r: dict, height: int, width: int, picks: list[int]) -> np.ndarray:
    import cv2

    from mm_jax.data.loader import _cover_crop, _decode_jpeg

    if len(r["frames"]) <= picks[-1]:
        raise ValueError(f"{r.get('source')}: {len(r['frames'])} frames; precomputing frames {picks[0]}..{picks[-1]} "
                         f"({len(picks)} at stride {picks[1] - picks[0] if len(picks) > 1 else 1}) needs "
                         f"{picks[-1] + 1}: lower --frames or --frame-stride, or rebuild with longer clips")
    _, rh, rw, top, left = _cover_crop(r["height"], r["width"], height, width)
    video = np.stack([cv2.resize(_decode_jpeg(r["frames"][i]), (rw, rh), interpolation=cv2.INTER_AREA)
                      [top:top + height, left:left + width] for i in picks])
    return video.astype(np.float32) / 127.5 - 1.0


def precompute(out: str | Path, checkpoint_dir: str | Path, *, height: int, width: int, frames: int,
               frame_stride: int = 1, max_text_length: int = 226, progress: bool = True) -> dict:
    """Add ``latents``, ``latents_std`` and ``text_embedding`` to every record of ``out``."""
    import jax
    import jax.numpy as jnp
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter
    from tqdm.auto import tqdm

    from mm_jax import checkpoint
    from mm_jax import text as text_lib
    from mm_jax.data.loader import precomputed_frames
    from mm_jax.frame_counts import check_frames

    out = Path(out)
    check_frames("video" if frames > 1 else "image", frames)
    if frame_stride < 1:
        raise ValueError(f"frame_stride={frame_stride}: must be >= 1")
    picks = precomputed_frames(frames, frame_stride)
    vae = checkpoint.load_component(checkpoint_dir, "vae")
    t5 = checkpoint.load_component(checkpoint_dir, "text_encoder")
    tok = text_lib.load_tokenizer(Path(checkpoint_dir) / "tokenizer")
    settings = {"height": height, "width": width, "frames": frames, "frame_stride": frame_stride,
                "frame_indices": picks, "max_text_length": max_text_length, "checkpoint": str(checkpoint_dir)}
    encode = jax.jit(lambda x: vae.encode(x))
    np.save(out / "null_text.npy", np.asarray(text_lib.encode_prompts(t5, tok, [""], max_text_length)[0], np.float32))
    shards = sorted(out.glob("*-*.array_record"))
    for shard in tqdm(shards, desc="precomputing", unit="shard", disable=not progress):
        kinds = ("video",) if frames > 1 else ("image", "video")
        if not shard.name.split("-")[0] in kinds:
            continue
        reader = ArrayRecordReader(str(shard))
        records = [decode_record(x, f"shard {shard.name}, record {i}") for i, x in enumerate(reader.read_all())]
        reader.close()
        if all(r.get("precomputed") == settings for r in records):
            continue
        tmp = shard.with_name(shard.name + ".tmp")
        w = ArrayRecordWriter(str(tmp), "group_size:1")
        for r in records:
            post = encode(jnp.asarray(_frames(r, height, width, picks)[None]))
            scale = vae.cfg.scaling_factor
            r["latents"] = np.asarray(post.mean[0] * scale, np.float32)
            r["latents_std"] = np.asarray(post.std[0] * scale, np.float32)
            r["text_embedding"] = np.asarray(text_lib.encode_prompts(t5, tok, [r["caption"]], max_text_length)[0],
                                             np.float32)
            r["precomputed"] = settings
            w.write(encode_record(r))
        w.close()
        os.replace(tmp, shard)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary["precomputed"] = settings
    summary_path.write_text(json.dumps(summary, indent=2))
    return summary
