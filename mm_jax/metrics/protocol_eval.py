"""Run a named protocol (``mm_jax/metrics/protocols.py``) over paired videos: the per-video rows, the
means over videos, the not-computed metrics with their reasons, and the JSON report in the form of
``--protocol ours`` (``videos``, ``mean``, ``absent``, ``definitions``, ``settings``) plus
``protocol`` and ``not_computed``."""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from mm_jax.metrics.protocols import Protocol

NO_PROMPT = "not computed for this video: it has no prompt (--prompts or the manifest's prompt)"
BUFFALO_L = ("det_10g.onnx", "w600k_r50.onnx")
MODEL_FLAGS = {  # argparse dest -> how to make the file
    "curricularface": "convert ConsisID's glint360k_curricular_face_r101_backbone.bin with "
                      "tools/convert_weights/curricularface_save.py",
    "inception": "tools/convert_weights/inception_v3.py inception_v3_google-0cc3c7bd.pth --out X.safetensors",
    "raft": "tools/convert_weights/raft.py raft-things.pth --out X.safetensors",
}


def check_args(proto: Protocol, args) -> None:
    """Refusals before any work: a model path the protocol needs, a setting it fixes."""
    if proto.needs_clip and not args.clip:
        raise ValueError(f"--protocol {proto.name} needs --clip DIR: openai/clip-vit-base-patch32 converted with "
                         "python -m tools.convert_weights.from_torch --src clip-vit-base-patch32 --dst DIR "
                         "--components clip (its clipscore uses CLIP ViT-B/32)")
    if args.det_thresh != proto.det_thresh:
        raise ValueError(f"--det-thresh {args.det_thresh}: --protocol {proto.name} fixes it at {proto.det_thresh} "
                         "(the reference script's)")
    for flag, how in MODEL_FLAGS.items():
        path = getattr(args, flag, None)
        if not path:
            continue
        if flag not in proto.enabled_by.values():
            warnings.warn(f"--{flag} {path}: --protocol {proto.name} has no metric that uses it; ignored", stacklevel=2)
        elif not Path(path).is_file():
            raise ValueError(f"--{flag} {path}: no such file ({how})")
    if getattr(args, "fps", None) is not None and "raft" not in proto.enabled_by.values():
        warnings.warn(f"--fps {args.fps}: only --protocol magicmirror's dynamic_degree reads a frame rate; ignored",
                      stacklevel=2)
    pack = Path(args.face_models)
    if pack.is_dir() and not all(any(pack.rglob(f)) for f in BUFFALO_L):
        warnings.warn(f"--face-models {pack}: no {' and '.join(BUFFALO_L)}; --protocol {proto.name}'s reference "
                      f"uses insightface's {proto.face_pack} pack, so the numbers may not compare", stacklevel=2)


def _face_rows(proto: Protocol, frames, ref, analyzer, cur_model, fid_fn=None) -> dict:
    """FaceSim-Arc, and FaceSim-Cur (``cur_model``) and the face FID (``fid_fn``) on the same detections and
    224 crops; ``ref``: (ArcFace embedding, CurricularFace embedding or None, 224 crop or None)."""
    from mm_jax.metrics import consisid, face_fid, facesim_cur

    rule = proto.frames["facesim_arc"]
    hits = consisid.frame_hits(frames, analyzer, rule)
    row = consisid.facesim_arc(frames, ref[0], analyzer, rule, hits=hits)
    for m, model in (("facesim_cur", cur_model), ("face_fid", fid_fn)):
        if model is not None and proto.frames[m] != rule:
            raise ValueError(f"--protocol {proto.name}: {m} and facesim_arc read different frames")
    idx, found = hits
    crops = None
    if cur_model is not None or fid_fn is not None:  # cut once, read by both
        crops = {k: consisid.aligned_face(frames[idx[k]], h) for k, h in enumerate(found) if h is not None}
    if cur_model is not None:
        cur = facesim_cur.facesim_cur(frames, hits, ref[1], cur_model, drop_zeros=proto.name == "opens2v",
                                      crops=crops)
        row["per_frame"].update(cur.pop("per_frame"))
        row.update(cur)
    if fid_fn is not None:
        score, fids = face_fid.video_face_fid(fid_fn, ref[2], list(crops.values()))
        per = [None] * len(found)
        for k, v in zip(crops, fids):
            per[k] = float(v)
        row.update(face_fid=score, face_fid_faces=len(crops))
        row["per_frame"]["face_fid"] = per
    return row


def _consisid_row(frames, ref, prompt, analyzer, scorer, cur_model, fid_fn) -> dict:
    from mm_jax.metrics import consisid, protocols

    row = _face_rows(protocols.get("consisid"), frames, ref, analyzer, cur_model, fid_fn)
    if scorer is not None and prompt:
        cs = consisid.clipscore(frames, prompt, scorer)
        row["per_frame"].update(cs.pop("per_frame"))
        row.update(cs)
    else:
        row["clipscore"] = None
        row["absent"] = {"clipscore": NO_PROMPT}
    return row


def _magicmirror_row(frames, ref, analyzer, batch_size, flow_fn=None, fps=None) -> dict:
    """FM_ref/FM_inter as ``ours``; with ``flow_fn`` (RAFT) VBench's dynamic-degree verdict: ``dynamic_degree``
    1.0 or 0.0 (the mean over videos is VBench's fraction), the pair scores, threshold and needed count.
    ``fps``: ``(rate, source)``."""
    from mm_jax.metrics import dynamic_degree as dd
    from mm_jax.metrics.video_eval import evaluate_video

    m = evaluate_video(frames, ref, analyzer, batch_size)
    keep = ("fm_ref", "fm_ref_frames", "fm_inter", "fm_inter_pairs", "face_fraction", "frames_without_face")
    row = {k: m[k] for k in keep} | {"per_frame": {"found": m["per_frame"]["found"],
                                                   "fm_ref": m["per_frame"]["fm_ref"]}}
    if flow_fn is not None:
        v = dd.video_dynamic(frames, fps[0], flow_fn)
        row |= {"dynamic_degree": float(v["dynamic"]), "dynamic": v["dynamic"], "dynamic_scores": v["scores"],
                "dynamic_threshold": v["threshold"], "dynamic_needed": v["needed"],
                "dynamic_frames": list(range(0, len(frames), v["interval"])), "fps": fps[0], "fps_source": fps[1]}
    return row


def evaluate(proto: Protocol, pairs, analyzer, scorer=None, batch_size: int = 32, progress: bool = True,
             cur_model=None, not_computed: dict | None = None, fid_fn=None, flow_fn=None, fps=None) -> list[dict]:
    """One row per pair with the protocol's metrics (null where not computed: ``not_computed``,
    default the protocol's). ``cur_model``: the CurricularFace IR for facesim_cur; ``fid_fn``: Inception v3
    features for face_fid; ``flow_fn``: RAFT flow for dynamic_degree, with ``fps`` (video path -> (rate, source))."""
    from tqdm import tqdm

    from mm_jax.face import NoFaceError
    from mm_jax.metrics import consisid, facesim_cur
    from mm_jax.metrics.video_eval import analyze_references, load_frames

    not_computed = proto.not_computed if not_computed is None else not_computed
    if proto.name in ("consisid", "opens2v"):
        refs = {}
        for p in pairs:
            if p.ref not in refs:
                try:
                    hit = consisid.reference_hit(analyzer, p.ref)
                except NoFaceError as e:
                    raise ValueError(f"reference {p.ref}: {e}") from None
                refs[p.ref] = (hit.embedding, None if cur_model is None else
                               facesim_cur.reference_embedding(cur_model, p.ref, hit),
                               None if fid_fn is None else consisid.aligned_face(p.ref, hit))
    elif proto.name == "magicmirror":
        refs = analyze_references(pairs, analyzer)
    rows = []
    for p in tqdm(pairs, unit="video", desc=f"evaluate ({proto.name})", disable=not progress):
        frames = load_frames(p.video)
        row = {"name": p.name, "video": str(p.video), "ref": str(p.ref), "prompt": p.prompt, "frames": len(frames)}
        if proto.name == "consisid":
            row |= _consisid_row(frames, refs[p.ref], p.prompt, analyzer, scorer, cur_model, fid_fn)
        elif proto.name == "opens2v":
            row |= _face_rows(proto, frames, refs[p.ref], analyzer, cur_model)
        elif proto.name == "magicmirror":
            row |= _magicmirror_row(frames, refs[p.ref], analyzer, batch_size, flow_fn,
                                    None if fps is None else fps[p.video])
        row |= {m: None for m in not_computed}
        rows.append(row)
    return rows


def format_table(proto: Protocol, rows: list[dict], mean: dict) -> str:
    cols = proto.metrics
    head = "name".ljust(24) + "".join(c.rjust(16) for c in cols)
    cell = lambda v: ("-" if v is None else f"{v:.4f}").rjust(16)
    lines = [head, "-" * len(head)]
    lines += [r["name"][:24].ljust(24) + "".join(cell(r.get(c)) for c in cols) for r in rows]
    lines += ["-" * len(head), f"mean ({mean['videos']})".ljust(24) + "".join(cell(mean.get(c)) for c in cols)]
    return "\n".join(lines)


def run(args, pairs_fn) -> int:
    """``python -m mm_jax.evaluate --protocol NAME ...`` for NAME other than ``ours``."""
    from mm_jax import compile_cache
    from mm_jax.face import FaceAnalyzer
    from mm_jax.metrics import face_metrics, protocols, published, report

    t0 = time.time()
    try:
        proto = protocols.get(args.protocol)
        if args.compare:
            published.table(proto.name)
        check_args(proto, args)
        not_computed = proto.not_computed_with(args)
        cur_model = None
        if "facesim_cur" in proto.metrics and "facesim_cur" not in not_computed:
            from mm_jax.metrics import facesim_cur

            cur_model = facesim_cur.load(args.curricularface)
        fid_fn = flow_fn = fps = None
        if "face_fid" in proto.metrics and "face_fid" not in not_computed:
            from mm_jax.metrics import face_fid

            fid_fn = face_fid.load(args.inception)
        if "dynamic_degree" in proto.metrics and "dynamic_degree" not in not_computed:
            from mm_jax.metrics import dynamic_degree as dd

            flow_fn = dd.raft_flow_fn(dd.load_raft(args.raft))
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        compile_cache.enable(compile_cache.resolve(args.compile_cache))
        pairs = pairs_fn(args)
        if flow_fn is not None:  # every video's frame rate, before any work
            fps = {p.video: dd.video_fps(p.video, args.fps) for p in pairs}
        analyzer = FaceAnalyzer(args.face_models, det_size=proto.det_size, det_thresh=proto.det_thresh)
        scorer = None
        if proto.needs_clip:
            from mm_jax.metrics.text_alignment import TextAlignment

            scorer = TextAlignment(args.clip, batch_size=args.batch_size)
            if (scorer.model.cfg.vision.patch_size, scorer.size) != (32, 224):
                warnings.warn(f"--clip {args.clip}: ViT patch {scorer.model.cfg.vision.patch_size} at {scorer.size} px; "
                              f"{proto.name}'s published clipscore uses ViT-B/32 at 224", stacklevel=1)
        rows = evaluate(proto, pairs, analyzer, scorer, args.batch_size, progress=not args.quiet,
                        cur_model=cur_model, not_computed=not_computed, fid_fn=fid_fn, flow_fn=flow_fn, fps=fps)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mean = face_metrics.mean_over_videos(rows, proto.metrics)
    settings = {k: getattr(args, k) for k in ("videos", "refs", "manifest", "prompts", "face_models", "clip",
                                              "curricularface", "inception", "raft", "fps", "batch_size")}
    if args.benchmark:
        settings["benchmark"] = {"name": args.benchmark[0], "dir": args.benchmark[1], "seed": proto.seed}
    settings["seconds"] = round(time.time() - t0, 2)
    rep = report.build_report(rows, mean, dict(not_computed), protocols.__doc__, settings)
    rep |= {"protocol": proto.describe(), "not_computed": dict(not_computed)}
    print(format_table(proto, rows, mean))
    if args.compare:
        rep["compare"] = {"source": published.table(proto.name)["source"],
                          "rows": published.compare_rows(proto.name, mean)}
        print(published.format_compare(proto.name, mean))
    for k, why in not_computed.items():
        print(f"{k}: null, {why}", file=sys.stderr)
    for k, why in proto.reimplemented.items():
        print(f"{k}: {why}", file=sys.stderr)
    report.write_json(Path(args.out), rep)
    print(f"wrote {args.out} in {settings['seconds']} s", file=sys.stderr)
    return 0

