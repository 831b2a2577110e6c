"""Identity benchmark: sample one video per person-centric prompt with ``mm_jax.sample``, then score
them all with ``mm_jax.evaluate``.

    python benchmarks/eval_prompts.py --checkpoint ckpt/cogvideox5b --adapter ckpt/magic_mirror \
        --face-models models/antelopev2 --refs faces/ --out-dir runs/bench [--clip ckpt/clip] \
        [--prompts benchmarks/prompts/person_prompts.jsonl] [--limit N] [--all-refs] [--dry-run] \
        [-- sample options, e.g. --frames 49 --steps 50 --seed 0]

Prompt i is paired with reference i mod len(refs) (``--all-refs``: every prompt with every
reference). Videos go to ``OUT/videos/<prompt id>_<ref stem>.mp4``; a video already there is kept
(a rerun resumes). All missing videos are sampled by ONE ``python -m mm_jax.sample --prompts
OUT/todo.jsonl`` call: the models load once, every prompt is encoded before the DiT is placed,
and the face models and CLIP tower run once per reference. ``OUT/manifest.jsonl`` pairs videos,
references and prompts; the report is ``OUT/report.json`` / ``report.csv`` / ``plots/``, over the
videos that exist (``OUT/evaluated.jsonl``): a prompt that failed to sample (named by the sampler)
leaves the others scored, and the exit code is 1.
``--dry-run`` writes the manifest and the prompts file and prints the sample command.

``--benchmark opens2v DIR`` takes the prompts and references from a published benchmark folder instead
(``mm_jax/metrics/benchmarks.py``: OpenS2V-Eval's Human-Domain cases, no ``--refs``/``--prompts``): video
``OUT/videos/<case id>.mp4`` per case, sampled with the benchmark's seed (42; a ``--seed`` after ``--`` is
refused), then ``python -m mm_jax.evaluate --benchmark opens2v DIR --videos OUT/videos`` (the opens2v protocol;
``--curricularface`` computes its FaceSim-Cur) writes ``OUT/report.json``. ``--benchmark consisid DIR`` (ConsisID's
eval set, BestWishYsh/ConsisID-preview-Data) samples every photo of ``eval/face_images`` with every prompt of
``video_caption_eval_old.csv`` to ``OUT/videos/<photo file name>--<index>.mp4`` with seed 42 (the sampler's
defaults, 50 steps and guidance 6.0, are their script's) and evaluates with the consisid protocol, which needs
``--clip`` (CLIP ViT-B/32); ``--curricularface`` and ``--inception`` add FaceSim-Cur and the face FID.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mm_jax.metrics.pairing import IMAGE_SUFFIXES, read_prompts

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "person_prompts.jsonl"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--face-models", required=True)
    ap.add_argument("--refs", help="a reference photo, or a folder of them (not with --benchmark)")
    ap.add_argument("--benchmark", nargs=2, metavar=("NAME", "DIR"),
                    help="a published benchmark folder (opens2v: BestWishYsh/OpenS2V-Eval; consisid: "
                         "BestWishYsh/ConsisID-preview-Data) instead of --prompts/--refs")
    ap.add_argument("--curricularface", metavar="PATH.safetensors",
                    help="with --benchmark opens2v|consisid: CurricularFace IR-101 for FaceSim-Cur (see mm_jax.evaluate)")
    ap.add_argument("--inception", metavar="PATH.safetensors",
                    help="with --benchmark consisid: Inception v3 for its face FID (see mm_jax.evaluate)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--prompts", default=None, help='JSONL of {"id", "prompt", "class_word"} '
                                                   f"(default {DEFAULT_PROMPTS.relative_to(DEFAULT_PROMPTS.parents[2])})")
    ap.add_argument("--clip", help="mm_jax 'clip' checkpoint: also report CLIP text alignment (see mm_jax.evaluate)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    ap.add_argument("--all-refs", action="store_true", help="every prompt with every reference")
    ap.add_argument("--dry-run", action="store_true", help="write the manifest, print the sample commands, run nothing")
    return ap


def plan(prompts: dict[str, str], refs: list[Path], out: Path, all_refs: bool) -> list[dict]:
    """Manifest entries {"video", "ref", "prompt"} (video relative to ``out``)."""
    jobs = []
    for i, (pid, text) in enumerate(prompts.items()):
        for ref in (refs if all_refs else [refs[i % len(refs)]]):
            jobs.append({"video": f"videos/{pid}_{ref.stem}.mp4", "ref": str(ref.resolve()), "prompt": text})
    return jobs


def plan_benchmark(name: str, root: Path, limit: int | None = None) -> tuple[list[dict], int]:
    """Manifest entries {"video", "ref", "prompt", "seed"} for a benchmark's cases, and its seed."""
    from mm_jax.metrics import benchmarks, protocols

    seed = protocols.get(name).seed
    cases = benchmarks.cases(name, root)[:limit]
    return [{"video": f"videos/{c.id}.mp4", "ref": str(c.ref.resolve()), "prompt": c.prompt, "seed": seed}
            for c in cases], seed


def _benchmark(args, extra) -> tuple[list[dict], list[str]]:
    """(jobs, evaluate arguments) for --benchmark; ValueError / FileNotFoundError on bad input."""
    if args.refs or args.prompts or args.all_refs:
        raise ValueError(f"--benchmark {' '.join(args.benchmark)} brings its own references and prompts: "
                         "leave out --refs, --prompts and --all-refs")
    if "--seed" in extra:
        raise ValueError(f"--benchmark {args.benchmark[0]}: the published numbers use the benchmark's seed; "
                         "leave --seed out of the sample options")
    from mm_jax.metrics import protocols

    jobs, _ = plan_benchmark(args.benchmark[0], Path(args.benchmark[1]), args.limit)
    needs_clip = protocols.get(args.benchmark[0]).needs_clip
    if needs_clip and not args.clip:
        raise ValueError(f"--benchmark {args.benchmark[0]}: its protocol's clipscore needs --clip (CLIP ViT-B/32 "
                         "converted with --components clip; see python -m mm_jax.evaluate --help)")
    if args.clip and not needs_clip:
        print(f"warning: --clip {args.clip}: --benchmark {args.benchmark[0]}'s protocol has no CLIP metric; ignored",
              file=sys.stderr)
    out = Path(args.out_dir)
    flags = ("clip",) * needs_clip + ("curricularface", "inception")
    models = [x for flag in flags if getattr(args, flag) for x in (f"--{flag}", getattr(args, flag))]
    ev = ["--benchmark", *args.benchmark, "--videos", str(out / "videos"), "--face-models", args.face_models,
          "--out", str(out / "report.json"), *models]
    return jobs, ev


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    from mm_jax import evaluate, sample

    if args.benchmark:
        try:
            jobs, eval_args = _benchmark(args, extra)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        refs_path = Path(args.refs) if args.refs else None
        refs = ([] if refs_path is None else
                sorted(p for p in refs_path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if refs_path.is_dir()
                else [refs_path] if refs_path.is_file() else [])
        if not refs:
            print(f"error: --refs {refs_path}: no reference images ({', '.join(IMAGE_SUFFIXES)})" if refs_path else
                  "error: give --refs (a photo or a folder of them) or --benchmark NAME DIR", file=sys.stderr)
            return 2
        try:
            prompts = read_prompts(Path(args.prompts or DEFAULT_PROMPTS))
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        prompts = dict(list(prompts.items())[:args.limit]) if args.limit else prompts
        out = Path(args.out_dir)
        jobs = plan(prompts, refs, out, args.all_refs)
        eval_args = ["--manifest", str(out / "evaluated.jsonl"), "--face-models", args.face_models,
                     "--out", str(out / "report.json"), "--csv", str(out / "report.csv"),
                     "--plots", str(out / "plots"), *(["--clip", args.clip] if args.clip else [])]
    out = Path(args.out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    (out / "ids").mkdir(exist_ok=True)
    (out / "manifest.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    todo = [{"prompt": j["prompt"], "out": str(out / j["video"]), "ref": j["ref"]}
            | ({"seed": j["seed"]} if "seed" in j else {}) for j in jobs if not (out / j["video"]).exists()]
    (out / "todo.jsonl").write_text("".join(json.dumps(t) + "\n" for t in todo))
    cmd = ["--checkpoint", args.checkpoint, "--adapter", args.adapter, "--face-models", args.face_models,
           "--prompts", str(out / "todo.jsonl"), *extra]
    print(f"{len(todo)} of {len(jobs)} videos to sample: python -m mm_jax.sample {shlex.join(cmd)}", file=sys.stderr)
    if args.dry_run:
        print(f"dry run: wrote {out / 'manifest.jsonl'} ({len(jobs)} videos)", file=sys.stderr)
        return 0
    rc = sample.main(cmd) if todo else 0
    if rc not in (0, 1):  # 1: some lines failed (named above), the others were written
        return rc
    done = [j for j in jobs if (out / j["video"]).exists()]
    if not done:
        print("error: no video was sampled; nothing to evaluate", file=sys.stderr)
        return 2
    if len(done) < len(jobs):
        print(f"evaluating the {len(done)} of {len(jobs)} videos that were sampled", file=sys.stderr)
    (out / "evaluated.jsonl").write_text("".join(json.dumps(j) + "\n" for j in done))
    rc_eval = evaluate.main(eval_args)
    return rc_eval or rc


if __name__ == "__main__":
    sys.exit(main())
