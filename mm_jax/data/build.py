"""Build a training set: ``python -m mm_jax.data.build --src DIR|manifest.jsonl --out DIR --face-models PACK``.

Input: a folder of images/videos with ``captions.jsonl`` (``{"file": ..., "caption": ...}``) or a
``<name>.txt`` caption beside each file, or a JSONL manifest of ``{"path": ..., "caption": ...,
"ref": optional same-identity reference image}``. Output: ArrayRecord shards
(``image-NNNNN.array_record`` and ``video-NNNNN.array_record``) of ``mm_jax.data.records`` examples, ``summary.json`` and
``done.jsonl`` (what was processed, so a re-run resumes without duplicating records).

Per example (``mm_jax.data.example.ExampleMaker``, shared with the TFDS builders of
``mm_jax.data.prepare``): the target's JPEG frames (up to ``--max-frames``), caption, the largest
face per frame, the target's ArcFace embedding and a reference face (the manifest's ``ref``, else a
frame of the target); pairs below ``--min-similarity`` are dropped and counted, and so are captions
without a class word (``--caption-rules`` can rewrite them first, ``mm_jax.data.captions``).
``--precompute`` then adds the frozen encoders' outputs (``mm_jax.data.precompute.Encoders``, the
same step the TFDS builders run on Beam).

Why two front ends on one core: on one machine this one is faster for small sets and resumes item
by item (``done.jsonl``); ``prepare`` scales out on Beam and restarts a killed build from scratch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

from mm_jax.data.captions import load_rules
from mm_jax.data.example import (
    ExampleMaker,
    ExampleOptions,
    Outcome,
    add_example_arguments,
)
from mm_jax.data.precompute import add_precompute_arguments, precompute_settings
from mm_jax.data.records import DEFAULT_REF_SIZE
from mm_jax.data.sources import BuildError, item_key, list_items  # noqa: F401  (BuildError: part of this CLI's API)
from mm_jax.text import CLASS_WORDS

SHARD_PATTERN = "{}-{:05d}.array_record"  # kind ("image" | "video"), number: a stage picks its kinds by name

_MAKER: ExampleMaker | None = None  # one per worker process: the face models load once


def _work(args) -> tuple[dict, Outcome]:
    global _MAKER
    item, options = args
    if _MAKER is None or _MAKER.options != options:
        _MAKER = ExampleMaker(options)
    return item, _MAKER(item)


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


def caption_counts(done: list[dict]) -> dict:
    """How many captions lacked a class word, how many a rule repaired (by rule), how many were dropped."""
    lacking = [d for d in done if d.get("class_word") is False]
    rules = Counter(d["caption_rule"] for d in lacking if d.get("caption_rule"))
    return {"without_class_word": len(lacking), "rewritten": dict(sorted(rules.items())),
            "dropped": sum(1 for d in lacking if not d.get("caption_rule"))}


def summarize(out: Path, options: ExampleOptions | None = None) -> dict:
    done = _read_done(out)
    skipped: dict[str, list[str]] = {}
    for d in done:
        if d["status"] == "skip":
            skipped.setdefault(d["reason"], []).append(d["path"])
    shards = sorted(p.name for p in out.glob("*-*.array_record"))
    summary = {"records": sum(1 for d in done if d["status"] == "ok"), "shards": shards,
               "kinds": dict(Counter(d.get("kind", "?") for d in done if d["status"] == "ok")),
               "skipped": {k: {"count": len(v), "files": v} for k, v in sorted(skipped.items())},
               "captions": caption_counts(done), "processed": len(done)}
    if options is not None:
        summary["settings"] = options.settings()
    return summary


def check_options(options: ExampleOptions, *, workers: int, shard_size: int) -> None:
    """Refuse build settings that would silently make a wrong dataset; names the flag and the range."""
    bad = ([f"--workers {workers}: must be >= 0 (0: in-process)"] if workers < 0 else []) + \
          ([f"--shard-size {shard_size}: must be >= 1"] if shard_size < 1 else []) + options.problems()
    if bad:
        raise BuildError("; ".join(bad))


def build_dataset(src: str | Path, out: str | Path, face_models: str | Path, *, workers: int = 0,
                  shard_size: int = 256, max_frames: int = 49, min_similarity: float = 0.5, det_size: int = 640,
                  jpeg_quality: int = 95, ref_size: int = DEFAULT_REF_SIZE, class_words=CLASS_WORDS, caption_rules=(), progress: bool = True) -> dict:
    """Build (or resume building) the set; returns the summary (also written to ``out/summary.json``).
    ``caption_rules``: ``mm_jax.data.captions`` rules that repair captions without a class word."""
    from tqdm.auto import tqdm

    out = Path(out)
    options = ExampleOptions(face_models=str(face_models), max_frames=int(max_frames),
                             min_similarity=float(min_similarity), det_size=int(det_size),
                             jpeg_quality=int(jpeg_quality), ref_size=int(ref_size), class_words=tuple(class_words),
                             caption_rules=tuple(caption_rules))
    check_options(options, workers=workers, shard_size=shard_size)
    global _MAKER
    _MAKER = ExampleMaker(options)
    _MAKER.analyzer()  # fail early, with the face module's message, on a bad pack or size
    items = list_items(src)  # and on a missing or empty source, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.tmp"):  # a shard a killed run did not finish; its items are redone
        stale.unlink()
    done = {d["key"] for d in _read_done(out)}
    todo = [it for it in items if item_key(it) not in done]
    pending: dict[str, list[tuple[dict, Outcome]]] = {"image": [], "video": []}
    log = (out / "done.jsonl").open("a")

    def line(it: dict, o: Outcome, **fields) -> str:
        cap = {"class_word": o.caption.had_class_word}
        if o.caption.rule:
            cap["caption_rule"] = o.caption.rule
        return json.dumps({"key": item_key(it), "path": it["path"], **fields, **cap}) + "\n"

    def flush(kind: str):
        if not pending[kind]:
            return
        name = SHARD_PATTERN.format(kind, len(list(out.glob(f"{kind}-*.array_record"))))
        _write_shard(out / name, [o.record for _, o in pending[kind]])
        for it, o in pending[kind]:  # only now are these items done: a kill before this line redoes them
            log.write(line(it, o, status="ok", shard=name, kind=kind))
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
        for it, o in tqdm(results, total=len(todo), desc="building", unit="file", disable=not progress):
            if o.status == "ok":
                pending[o.kind].append((it, o))
                if len(pending[o.kind]) >= shard_size:
                    flush(o.kind)
            else:
                log.write(line(it, o, status="skip", reason=o.reason))
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
    add_example_arguments(ap)
    add_precompute_arguments(ap)
    args = ap.parse_args(argv)
    try:
        pre = precompute_settings(ap, args)  # checked before the build writes anything
        s = build_dataset(args.src, args.out, args.face_models, workers=args.workers, shard_size=args.shard_size,
                          max_frames=args.max_frames, min_similarity=args.min_similarity, det_size=args.det_size,
                          jpeg_quality=args.jpeg_quality, ref_size=args.ref_size,
                          caption_rules=load_rules(args.caption_rules))
        if pre is not None:
            from mm_jax.data.precompute import precompute

            s = precompute(args.out, pre.checkpoint, height=pre.height, width=pre.width, frames=pre.frames,
                           frame_stride=pre.frame_stride, max_text_length=pre.max_text_length)
    except (BuildError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{k}: {v['count']}" for k, v in s["skipped"].items()) or "none"
    print(f"{s['records']} records in {len(s['shards'])} shard(s) at {args.out}; skipped: {skipped}")
    c = s.get("captions")
    if c and c["without_class_word"]:
        print(f"captions without a class word: {c['without_class_word']} (rewritten: {c['rewritten'] or 'none'}, "
              f"dropped: {c['dropped']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
