"""Evaluate identity videos: ``python -m mm_jax.evaluate --videos DIR --refs DIR --face-models DIR --out report.json``.

Pairs each generated video with its reference photo (same file stem, or ``--manifest`` JSONL lines
``{"video": ..., "ref": ..., "prompt": optional}``), runs the face front end (SCRFD + ArcFace from a
local insightface pack) over every frame, and reports per video and averaged over videos:

* id_sim: mean over all frames of cos(ArcFace(frame face), e_id(reference)); a frame without a
  detected face counts as 0 (id_sim_detected: the mean over frames with a face).
* fm_ref: mean over frames with a face of the 5-point landmark distance between the frame face and
  the reference face, each centred on its landmarks' mean and divided by its inter-ocular distance.
* fm_inter: mean over consecutive frame pairs that both have a face of the landmark distance
  divided by the pair's mean inter-ocular distance (pixel positions: head motion counts).
* face_fraction: frames with a detected face / frames. Frames without a face are skipped by the
  FM metrics and listed in the report.

* clip_text_alignment (with ``--clip DIR`` and prompts): mean over frames of
  100 * max(cos(CLIP image embedding, CLIP text embedding of the prompt), 0).

``--protocol consisid|opens2v|magicmirror`` computes a peer's published metrics instead, as its
evaluation script does (``mm_jax/metrics/protocols.py``; metrics whose weights are not given
(``--curricularface`` for facesim_cur, ``--inception`` for face_fid, ``--raft`` for dynamic_degree) or whose
model has no port are null with the reason), and ``--compare published`` prints the published rows beside the
means. ``--benchmark opens2v|consisid DIR`` pairs the videos named ``<case id>`` with a published benchmark's
references and prompts (OpenS2V-Eval's Human-Domain cases; ConsisID's eval set, every photo with every prompt,
case id ``<photo file name>--<index>``; ``mm_jax/metrics/benchmarks.py``) and reports the benchmark's seed.

Exact definitions: ``mm_jax/metrics/face_metrics.py`` and ``mm_jax/metrics/text_alignment.py``.
Metrics not computed (no ``--clip``; dynamic degree, which ``--protocol magicmirror --raft`` computes) are
reported as null with the reason. Bad input (unpaired files, a reference without a
face, an unreadable video or manifest) exits with code 2 and writes nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mm_jax.metrics.protocols import NAMES


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--videos", help="folder of generated videos (.mp4, .gif, .npy, or sub-folders of PNG frames)")
    ap.add_argument("--refs", help="folder of reference photos, paired with the videos by file stem")
    ap.add_argument("--face-models", required=True, help="local insightface model pack (SCRFD detector + ArcFace)")
    ap.add_argument("--manifest", help='JSONL of {"video": ..., "ref": ..., "prompt": optional} instead of stem '
                                       "pairing; relative paths resolve against --videos / --refs, else the manifest's folder")
    ap.add_argument("--prompts", help='JSONL of {"id": video stem, "prompt": ...} (e.g. benchmarks/prompts/person_prompts.jsonl)')
    ap.add_argument("--out", required=True, help="JSON report path")
    ap.add_argument("--csv", help="also write a CSV (one line per video and a mean line)")
    ap.add_argument("--plots", help="folder for one per-frame ID-similarity PNG per video (<name>.png)")
    ap.add_argument("--clip", help="mm_jax checkpoint with the 'clip' component (a whole CLIPModel converted with "
                                   "--components clip): adds clip_text_alignment for videos with a prompt")
    ap.add_argument("--curricularface", metavar="PATH.safetensors",
                    help="CurricularFace IR-101 for facesim_cur (--protocol consisid|opens2v): the file "
                         "tools/convert_weights/curricularface_save.py writes from ConsisID's "
                         "face_encoder/glint360k_curricular_face_r101_backbone.bin (the conversion reads the .bin "
                         "with torch; the evaluation needs no torch); without it facesim_cur is null")
    ap.add_argument("--inception", metavar="PATH.safetensors",
                    help="Inception v3 for face_fid (--protocol consisid): the file tools/convert_weights/inception_v3.py "
                         "writes with --out from torchvision's published inception_v3_google-0cc3c7bd.pth (the "
                         "conversion reads the .pth with torch; the evaluation needs no torch); without it face_fid is null")
    ap.add_argument("--raft", metavar="PATH.safetensors",
                    help="RAFT for dynamic_degree (--protocol magicmirror): the file tools/convert_weights/raft.py "
                         "writes with --out from princeton-vl/RAFT's published raft-things.pth (the file VBench uses); "
                         "without it dynamic_degree is null")
    ap.add_argument("--fps", type=float, default=None,
                    help="frame rate of videos that carry none (.npy, .gif, folders of frames) for dynamic_degree; "
                         "an mp4's own rate is used")
    ap.add_argument("--benchmark", nargs=2, metavar=("NAME", "DIR"),
                    help="a published benchmark folder in its own layout (opens2v: BestWishYsh/OpenS2V-Eval with "
                         "Human-Domain_Eval.json; consisid: BestWishYsh/ConsisID-preview-Data with "
                         "video_caption_eval_old.csv and eval/face_images/): pairs the --videos named <case id> "
                         "(.mp4, .gif, .npy or a folder of frames) with its references and prompts instead of "
                         "--refs; sets --protocol NAME")
    ap.add_argument("--protocol", default=None, choices=NAMES,
                    help="whose metrics: ours (the default), or a peer's published protocol (mm_jax/metrics/protocols.py)")
    ap.add_argument("--compare", choices=("published",),
                    help="print the published rows of the protocol's paper beside your means (not with 'ours')")
    ap.add_argument("--batch-size", type=int, default=32, help="frames per recognizer batch")
    ap.add_argument("--det-thresh", type=float, default=0.5, help="face detector score threshold")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="persistent compilation cache for the CLIP scorer (default: $MM_JAX_COMPILE_CACHE or "
                         "~/.cache/mm_jax/xla; 'off' disables)")
    return ap


def _pairs(args):
    from mm_jax.metrics import pairing

    if args.benchmark:
        from mm_jax.metrics import benchmarks

        if args.manifest or args.refs or args.prompts:
            raise ValueError(f"--benchmark {' '.join(args.benchmark)} pairs videos with its own references and "
                             "prompts: leave out --manifest, --refs and --prompts")
        if not args.videos:
            raise ValueError("--benchmark NAME DIR needs --videos DIR (the generated videos, named <case id>.mp4)")
        return benchmarks.pairs(args.benchmark[0], args.benchmark[1], Path(args.videos))
    prompts = pairing.read_prompts(Path(args.prompts)) if args.prompts else None
    if args.manifest:
        return pairing.pair_by_manifest(Path(args.manifest), args.videos and Path(args.videos),
                                        args.refs and Path(args.refs), prompts)
    if not (args.videos and args.refs):
        raise ValueError("give --videos DIR and --refs DIR (paired by file stem), or --manifest JSONL")
    return pairing.pair_by_stem(Path(args.videos), Path(args.refs), prompts)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.benchmark:
        from mm_jax.metrics.benchmarks import NAMES as BENCHMARKS

        if args.benchmark[0] not in BENCHMARKS or args.protocol not in (None, args.benchmark[0]):
            print(f"error: --benchmark {args.benchmark[0]}: known benchmarks are {list(BENCHMARKS)}, each "
                  f"evaluated with its own protocol (not --protocol {args.protocol})", file=sys.stderr)
            return 2
        args.protocol = args.benchmark[0]
    args.protocol = args.protocol or "ours"
    if args.protocol != "ours":
        from mm_jax.metrics import protocol_eval

        return protocol_eval.run(args, _pairs)
    if args.compare:
        print("error: --compare published needs a peer protocol (--protocol consisid|opens2v|magicmirror); "
              "no paper publishes numbers for 'ours'", file=sys.stderr)
        return 2
    for flag, metric, protos in (("curricularface", "facesim_cur", "consisid or opens2v"),
                                 ("inception", "face_fid", "consisid"), ("raft", "dynamic_degree", "magicmirror")):
        if getattr(args, flag):
            print(f"warning: --{flag} {getattr(args, flag)}: --protocol ours has no {metric}; ignored "
                  f"(use --protocol {protos})", file=sys.stderr)
    from mm_jax import compile_cache
    from mm_jax.face import FaceAnalyzer
    from mm_jax.metrics import face_metrics, report, video_eval

    t0 = time.time()
    try:
        compile_cache.enable(compile_cache.resolve(args.compile_cache))
        if args.batch_size < 1:
            raise ValueError(f"--batch-size {args.batch_size}: must be >= 1")
        pairs = _pairs(args)
        analyzer = FaceAnalyzer(args.face_models, det_thresh=args.det_thresh)
        scorer = None
        if args.clip:
            from mm_jax.metrics.text_alignment import TextAlignment

            scorer = TextAlignment(args.clip, batch_size=args.batch_size)
        rows = video_eval.evaluate_pairs(pairs, analyzer, args.batch_size, progress=not args.quiet,
                                         text_alignment=scorer)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mean = face_metrics.mean_over_videos(rows, face_metrics.MEAN_KEYS + (("clip_text_alignment",) if scorer else ()))
    absent = video_eval.absent_metrics(scorer)
    settings = {k: getattr(args, k) for k in ("videos", "refs", "manifest", "prompts", "face_models", "clip",
                                              "batch_size", "det_thresh")}
    settings["seconds"] = round(time.time() - t0, 2)
    rep = report.build_report(rows, mean, absent, face_metrics.__doc__, settings)
    print(report.format_table(rows, mean))
    for r in rows:
        if r["frames_without_face"]:
            print(f"{r['name']}: no face in {len(r['frames_without_face'])} of {r['frames']} frames "
                  f"{r['frames_without_face']}", file=sys.stderr)
    for k, why in absent.items():
        print(f"{k}: {why}", file=sys.stderr)
    for r in rows:
        for k, why in r.get("absent", {}).items():
            print(f"{r['name']}: {k} {why}", file=sys.stderr)
    report.write_json(Path(args.out), rep)
    written = [args.out]
    if args.csv:
        written.append(str(report.write_csv(Path(args.csv), rows, mean)))
    if args.plots:
        for r in rows:
            report.plot_id_similarity(Path(args.plots) / f"{r['name']}.png", r["name"], r["per_frame"]["id_sim"],
                                      r["per_frame"]["found"])
        written.append(f"{args.plots}/ ({len(rows)} plots)")
    print(f"wrote {', '.join(written)} in {settings['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
