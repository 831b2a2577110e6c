"""Build a training set: ``python -m mm_jax.data.build --src DIR|manifest.jsonl --out DIR --face-models PACK``.

Input: a folder of images/videos with ``captions.jsonl`` (``{"file": ..., "caption": ...}``) or a
``<name>.txt`` caption beside each file, or a JSONL manifest of ``{"path": ..., "caption": ...,
"ref": optional same-identity reference image}``. Output: ArrayRecord shards
(``image-NNNNN.array_record`` and ``video-NNNNN.array_record``) of ``mm_jax.data.records`` examples, ``summary.json`` and
``done.jsonl`` (what was processed, so a re-run resumes without duplicating records).

Per example: the target (JPEG frames, up to ``--max-frames``), caption, the largest face per frame
(box + 5 landmarks; frames without one are recorded as such), the target's ArcFace embedding (mean
over its faces, normalized) and a reference face: the manifest's ``ref`` image if given, else for a
clip the face frame farthest from the middle frame [ours], for a lone image the image itself. The
reference is stored as its 224 CLIP-aligned crop + ArcFace embedding; pairs whose cosine similarity
to the target is below ``--min-similarity`` (0.5, magic_mirror_reference.md 5) are dropped and counted.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from mm_jax.data.records import encode_record
from mm_jax.text import CLASS_WORDS, has_class_word

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_EXT = {".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv"}
SHARD_PATTERN = "{}-{:05d}.array_record"  # kind ("image" | "video"), number: a stage picks its kinds by name


class BuildError(ValueError):
    pass


# -- what to process -------------------------------------------------------------------------------
def list_items(src: str | Path) -> list[dict[str, Any]]:
    """-> [{"path", "caption", "ref"}], from a folder or a JSONL manifest; errors name the problem."""
    src = Path(src)
    if src.is_file():
        items = []
        for n, line in enumerate(src.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                path = Path(d["path"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BuildError(f"{src}:{n}: not a manifest line with a 'path' ({e})") from None
            path = path if path.is_absolute() else src.parent / path
            ref = d.get("ref")
            items.append({"path": str(path), "caption": d.get("caption", ""),
                          "ref": None if not ref else str(ref if Path(ref).is_absolute() else src.parent / ref)})
        return items
    if not src.is_dir():
        raise BuildError(f"--src {src}: no such folder or manifest file")
    captions = {}
    if (src / "captions.jsonl").exists():
        for line in (src / "captions.jsonl").read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                captions[d["file"]] = d.get("caption", "")
    media = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXT | VIDEO_EXT)
    if not media:
        raise BuildError(f"--src {src}: no images or videos in the folder (extensions "
                         f"{sorted(IMAGE_EXT | VIDEO_EXT)})")
    items = []
    for p in media:
        cap = captions.get(p.name)
        if cap is None and p.with_suffix(".txt").exists():
            cap = p.with_suffix(".txt").read_text().strip()
        items.append({"path": str(p), "caption": cap or "", "ref": None})
    return items


def item_key(item: dict) -> str:
    """Identifies a source file version: path, size, mtime (and the reference's path)."""
    try:
        st = os.stat(item["path"])
        ver = f"{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        ver = "missing"
    return f"{item['path']}|{ver}|{item.get('ref') or ''}"


# -- one item -------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _analyzer(face_models: str, det_size: int):
    """One analyzer per (pack, detector size) and process: loading the ONNX sessions is the slow part,
    and a second pack or size in the same process must get its own (each worker builds its own)."""
    from mm_jax.face import FaceAnalyzer

    return FaceAnalyzer(face_models, det_size=det_size)


def _read(path: str, max_frames: int) -> tuple[str, np.ndarray]:
    """-> (kind, RGB uint8 frames (F, H, W, 3))."""
    import imageio.v3 as iio

    from mm_jax.video_io import read_video

    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXT:
        img = np.asarray(iio.imread(path))
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return "image", img[None, ..., :3]
    frames = read_video(path)
    if frames.ndim != 4 or len(frames) == 0:
        raise ValueError(f"no frames decoded (shape {frames.shape})")
    return "video", frames[:max_frames]


def _jpeg(rgb: np.ndarray, quality: int) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()


def process_item(item: dict, options: dict) -> tuple[str, Any]:
    """-> ("ok", (kind, record bytes)) or ("skip", reason). Never raises for bad input."""
    if not has_class_word(item["caption"], options["class_words"]):
        return "skip", "no_class_word"
    try:
        kind, frames = _read(item["path"], options["max_frames"])
    except Exception:  # any decoder failure: the file is unreadable
        return "skip", "unreadable"
    fa = _analyzer(str(options["face_models"]), int(options["det_size"]))
    n = len(frames)
    boxes = np.full((n, 4), np.nan, np.float32)
    kps = np.zeros((n, 5, 2), np.float32)
    found = np.zeros((n,), bool)
    crops = []
    for i, f in enumerate(frames):
        bgr = np.ascontiguousarray(f[..., ::-1])
        dets, pts = fa.detect(bgr)
        if len(dets):
            j = int(np.argmax((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])))
            boxes[i], kps[i], found[i] = dets[j, :4], pts[j], True
            crops.append(fa.align(bgr, pts[j], fa.models.rec_size))
    if not found.any():
        return "skip", "no_face"
    emb = fa.embed_crops(crops)
    target = emb.mean(0)
    target = (target / max(np.linalg.norm(target), 1e-12)).astype(np.float32)
    if item.get("ref"):
        try:
            from mm_jax.face import read_image

            ref_bgr = read_image(item["ref"])
        except Exception:
            return "skip", "unreadable_ref"
        dets, pts = fa.detect(ref_bgr)
        if not len(dets):
            return "skip", "no_face_in_ref"
        j = int(np.argmax((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])))
        ref_kps, ref_frame = pts[j], -1
        ref_emb = fa.embed_crops([fa.align(ref_bgr, ref_kps, fa.models.rec_size)])[0]
    else:
        idx = np.flatnonzero(found)
        ref_frame = int(idx[np.argmax(np.abs(idx - (n - 1) / 2))])  # farthest from the middle frame
        ref_bgr = np.ascontiguousarray(frames[ref_frame][..., ::-1])
        ref_kps = kps[ref_frame]
        ref_emb = emb[int(np.searchsorted(idx, ref_frame))]
    similarity = float(np.dot(ref_emb, target))
    if similarity < options["min_similarity"]:
        return "skip", "low_similarity"
    ref_crop = fa.align(ref_bgr, ref_kps, 224)[..., ::-1]
    q = options["jpeg_quality"]
    record = {"kind": kind, "source": item["path"], "caption": item["caption"], "height": int(frames.shape[1]),
              "width": int(frames.shape[2]), "frames": [_jpeg(f, q) for f in frames], "boxes": boxes, "kps": kps,
              "face_found": found, "ref_crop": _jpeg(ref_crop, q), "ref_embedding": ref_emb.astype(np.float32),
              "target_embedding": target, "ref_frame": ref_frame, "similarity": similarity}
    return "ok", (kind, encode_record(record))


def _work(args):
    item, options = args
    try:
        return item, process_item(item, options)
    except Exception as e:  # a bug or an odd file must not kill the whole build
        return item, ("skip", f"error: {type(e).__name__}: {e}")


# -- the build --------------------------------------------------------------------------------------
def _write_shard(path: Path, records: list[bytes]) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path.with_name(path.name + ".tmp")
    w = ArrayRecordWriter(str(tmp), "group_size:1")
    for r in records:
        w.write(r)
    w.close()
    os.replace(tmp, path)


def _read_done(out: Path) -> list[dict]:
    path = out / "done.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def summarize(out: Path, options: dict | None = None) -> dict:
    done = _read_done(out)
    skipped: dict[str, list[str]] = {}
    for d in done:
        if d["status"] == "skip":
            skipped.setdefault(d["reason"], []).append(d["path"])
    shards = sorted(p.name for p in out.glob("*-*.array_record"))
    summary = {"records": sum(1 for d in done if d["status"] == "ok"), "shards": shards,
               "kinds": dict(Counter(d.get("kind", "?") for d in done if d["status"] == "ok")),
               "skipped": {k: {"count": len(v), "files": v} for k, v in sorted(skipped.items())},
               "processed": len(done)}
    if options is not None:
        summary["settings"] = {k: v for k, v in options.items() if k != "class_words"}
    return summary


def check_options(*, workers: int, shard_size: int, max_frames: int, min_similarity: float,
                  jpeg_quality: int) -> None:
    """Refuse build settings that would silently make a wrong dataset; names the flag and the range."""
    bad = [(f"--workers {workers}", ">= 0 (0: in-process)") if workers < 0 else None,
           (f"--shard-size {shard_size}", ">= 1") if shard_size < 1 else None,
           (f"--max-frames {max_frames}", ">= 1") if max_frames < 1 else None,
           (f"--min-similarity {min_similarity}", "in [-1, 1] (a cosine similarity)")
           if not -1.0 <= min_similarity <= 1.0 else None,
           (f"--jpeg-quality {jpeg_quality}", "in [1, 100]") if not 1 <= jpeg_quality <= 100 else None]
    bad = [b for b in bad if b]
    if bad:
        raise BuildError("; ".join(f"{flag}: must be {allowed}" for flag, allowed in bad))


def build_dataset(src: str | Path, out: str | Path, face_models: str | Path, *, workers: int = 0,
                  shard_size: int = 256, max_frames: int = 49, min_similarity: float = 0.5, det_size: int = 640,
                  jpeg_quality: int = 95, class_words=CLASS_WORDS, progress: bool = True) -> dict:
    """Build (or resume building) the set; returns the summary (also written to ``out/summary.json``)."""
    from tqdm.auto import tqdm

    out = Path(out)
    check_options(workers=workers, shard_size=shard_size, max_frames=max_frames, min_similarity=min_similarity,
                  jpeg_quality=jpeg_quality)
    _analyzer(str(face_models), int(det_size))  # fail early, with the face module's message, on a bad pack or size
    items = list_items(src)  # and on a missing or empty source, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    options = dict(face_models=str(face_models), max_frames=int(max_frames), min_similarity=float(min_similarity),
                   det_size=int(det_size), jpeg_quality=int(jpeg_quality), class_words=tuple(class_words))
    for stale in out.glob("*.tmp"):  # a shard a killed run did not finish; its items are redone
        stale.unlink()
    done = {d["key"] for d in _read_done(out)}
    todo = [it for it in items if item_key(it) not in done]
    pending: dict[str, list[tuple[dict, bytes]]] = {"image": [], "video": []}
    log = (out / "done.jsonl").open("a")

    def flush(kind: str):
        if not pending[kind]:
            return
        name = SHARD_PATTERN.format(kind, len(list(out.glob(f"{kind}-*.array_record"))))
        _write_shard(out / name, [r for _, r in pending[kind]])
        for it, _ in pending[kind]:  # only now are these items done: a kill before this line redoes them
            log.write(json.dumps({"key": item_key(it), "path": it["path"], "status": "ok", "shard": name,
                                  "kind": kind}) + "\n")
        log.flush()
        pending[kind] = []

    jobs = ((it, options) for it in todo)
    if workers > 0:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        results: Iterator = pool.imap(_work, jobs, chunksize=1)
    else:
        pool, results = None, map(_work, jobs)
    try:
        for it, (status, value) in tqdm(results, total=len(todo), desc="building", unit="file", disable=not progress):
            if status == "ok":
                kind, record = value
                pending[kind].append((it, record))
                if len(pending[kind]) >= shard_size:
                    flush(kind)
            else:
                log.write(json.dumps({"key": item_key(it), "path": it["path"], "status": "skip", "reason": value}) + "\n")
                log.flush()
        flush("image")
        flush("video")
    finally:
        log.close()
        if pool is not None:
            pool.close()
            pool.join()
    summary = summarize(out, options)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.data.build", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--src", required=True, help="folder of images/videos (+ captions) or a JSONL manifest")
    ap.add_argument("--out", required=True, help="output folder (re-run to resume)")
    ap.add_argument("--face-models", required=True, help="insightface model pack folder")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="processes (0: in-process)")
    ap.add_argument("--shard-size", type=int, default=256, help="records per ArrayRecord shard")
    ap.add_argument("--max-frames", type=int, default=49, help="frames kept per clip")
    ap.add_argument("--min-similarity", type=float, default=0.5, help="ArcFace cosine reference vs target")
    ap.add_argument("--det-size", type=int, default=640, help="detector input size")
    ap.add_argument("--jpeg-quality", type=int, default=95)
    pre = ap.add_argument_group("precompute (training then skips the VAE and T5: data.precomputed=True)")
    pre.add_argument("--precompute", action="store_true", help="also store VAE latents and T5 text embeddings")
    pre.add_argument("--checkpoint", help="converted CogVideoX folder (VAE, T5, tokenizer)")
    pre.add_argument("--height", type=int, default=480)
    pre.add_argument("--width", type=int, default=720)
    pre.add_argument("--frames", type=int, default=49, help="1 for the image stage; clips: a count the VAE decodes "
                                                            "exactly (python -m mm_jax.sample --help lists them)")
    pre.add_argument("--max-text-length", type=int, default=226)
    args = ap.parse_args(argv)
    if args.precompute and not args.checkpoint:
        ap.error("--precompute needs --checkpoint")
    try:
        if args.precompute:  # checked before the build writes anything
            from mm_jax import frame_counts

            frame_counts.check(args.frames, "--frames")
            if min(args.height, args.width, args.max_text_length) < 1:
                raise BuildError(f"--height {args.height} --width {args.width} --max-text-length "
                                 f"{args.max_text_length}: must be positive")
        s = build_dataset(args.src, args.out, args.face_models, workers=args.workers, shard_size=args.shard_size,
                          max_frames=args.max_frames, min_similarity=args.min_similarity, det_size=args.det_size,
                          jpeg_quality=args.jpeg_quality)
        if args.precompute:
            from mm_jax.data.precompute import precompute

            s = precompute(args.out, args.checkpoint, height=args.height, width=args.width, frames=args.frames,
                           max_text_length=args.max_text_length)
    except (BuildError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}: {v['count']}" for k, v in s["skipped"].items()) or "none"
    print(f"{s['records']} records in {len(s['shards'])} shard(s) at {args.out}; skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
