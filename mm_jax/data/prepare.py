"""Build a TFDS dataset of training records on Apache Beam (the ``tfds`` extra).

    python -m mm_jax.data.prepare --builder mm_faces_manifest --src data/raw --out data/tfds \\
        --face-models models/antelopev2 [--workers 4]                      # DirectRunner, this machine
    python -m mm_jax.data.prepare ... --beam_pipeline_options "runner=DataflowRunner,project=P,..."

``--builder`` picks the source layout (``mm_jax.data.layouts``): mm_faces_manifest (folder or JSONL
manifest), mm_laion_face, mm_sfhq, mm_clips_csv (OpenVid / Panda), mm_consisid, mm_opens2v. The
dataset lands in ``<out>/<builder>/1.0.0/`` as ArrayRecord splits ``image`` and ``video``; train on
it with ``data.path=<out>`` (``mm_jax.data.loader`` reads it through ``tfds.data_source``).

The records are the shard builder's (``mm_jax.data.build``): the same ``ExampleMaker`` makes them,
and with ``--precompute --checkpoint DIR`` the same ``precompute.Encoders`` adds the VAE latents
and T5 embeddings (a Beam step; the dataset then holds only the kinds of that stage).

A build is written to an ``incomplete.*`` folder and renamed when it completes, so readers never
see part of a split. A killed build restarts from scratch on the next run (its stale folder is
removed first); a complete one is reused (no-op) unless its settings differ (error) or
``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from pathlib import Path

from etils import epath

from mm_jax.data.captions import load_rules
from mm_jax.data.example import ExampleOptions, add_example_arguments
from mm_jax.data.precompute import add_precompute_arguments, precompute_settings
from mm_jax.data.records import DEFAULT_REF_SIZE
from mm_jax.data.sources import BuildError
from mm_jax.text import CLASS_WORDS

BUILDER_NAMES = ("mm_faces_manifest", "mm_laion_face", "mm_sfhq", "mm_clips_csv", "mm_consisid", "mm_opens2v")


def pipeline_args(beam_pipeline_options: str, workers: int) -> list[str]:
    """``"runner=DataflowRunner,project=p"`` (the ``tfds build`` syntax) -> ["--runner=DataflowRunner",
    "--project=p"]; a value may hold commas (``experiments=a,b``), a key may have its dashes; without options the DirectRunner: in-process (workers <= 1) or ``workers`` processes."""
    if beam_pipeline_options:  # a comma starts a new option only before "key=": values may hold commas
        parts = re.split(r",(?=\s*-*[A-Za-z_][\w.-]*=)", beam_pipeline_options)
        return [f"--{kv.strip().lstrip('-')}" for kv in parts if kv.strip()]
    if workers <= 1:
        return ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
    return ["--runner=DirectRunner", "--direct_running_mode=multi_processing", f"--direct_num_workers={workers}",
            "--default_sdk_harness_log_level=WARNING"]  # the worker processes log every step at INFO


def _remote(path) -> bool:
    """A URL-style path (gs://, s3://, http://): read and written through etils epath, not pathlib."""
    return "://" in str(path)


def _is_local(args: list[str]) -> bool:
    runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "DirectRunner")
    return runner in ("DirectRunner", "direct")


def remove_incomplete(builder) -> list[str]:
    """Delete the ``incomplete.*`` folders that a killed build left beside the dataset's version folder."""
    stale = [p for p in epath.Path(builder.data_path).parent.glob("incomplete.*") if p.is_dir()]
    for p in stale:
        p.rmtree()
    return [str(p) for p in stale]


def summarize(builder) -> dict:
    """Records per split, counters (skips by reason, caption checks), settings and the skipped files."""
    data_path = epath.Path(builder.data_path)
    meta = json.loads((data_path / "metadata.json").read_text()) if (data_path / "metadata.json").exists() else {}
    skipped: dict[str, list[str]] = {}
    for f in sorted(data_path.glob("skipped*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                d = json.loads(line)
                reason = d["reason"].split(":")[0] if d["reason"].startswith(("error", "unreadable_file")) else d["reason"]
                skipped.setdefault(reason, []).append(d["path"])
    counters = meta.get("counters", {})
    return {"dataset": str(data_path), "records": {k: v.num_examples for k, v in builder.info.splits.items()},
            "skipped": {k: {"count": len(v), "files": v} for k, v in sorted(skipped.items())},
            "captions": {"without_class_word": counters.get("captions/without_class_word", 0),
                         "rewritten": {k.split("/", 2)[2]: v for k, v in counters.items()
                                       if k.startswith("captions/rewritten/")},
                         "dropped": counters.get("captions/dropped", 0)},
            "counters": counters, "settings": meta.get("settings"), "record_format": meta.get("record_format")}


class _Progress:
    """A tqdm bar fed by the bytes MakeRecords appends to files in a local folder (DirectRunner)."""

    def __init__(self, folder: Path, total: int | None, enabled: bool):
        from tqdm.auto import tqdm

        self.folder, self._stop = folder, threading.Event()
        self.bar = tqdm(total=total, desc="building", unit="item", disable=not enabled)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _count(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir())

    def _run(self):
        total = Path(f"{self.folder}.total")  # written by the builder once it has listed the source
        while not self._stop.wait(0.5):
            if self.bar.total is None and total.is_file():
                try:
                    self.bar.total = int(total.read_text())
                except ValueError:  # caught mid-write: read it next time
                    pass
            self.bar.n = self._count()
            self.bar.refresh()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()
        self.bar.n = self._count()
        self.bar.close()


def prepare(builder: str, src: str | Path, out: str | Path, face_models: str | Path, *, workers: int = 0,
            beam_pipeline_options: str = "", layout_options: dict | None = None, max_frames: int = 49,
            min_similarity: float = 0.5, det_size: int = 640, jpeg_quality: int = 95, ref_size: int = DEFAULT_REF_SIZE, class_words=CLASS_WORDS,
            caption_rules=(), overwrite: bool = False, progress: bool = True, precompute=None) -> dict:
    """Build (or reuse) the dataset; returns ``summarize``'s summary. ``precompute``: the
    ``precompute.PrecomputeSettings`` of a build that also stores latents and text embeddings."""
    if builder not in BUILDER_NAMES:
        raise BuildError(f"--builder {builder}: unknown; one of {', '.join(BUILDER_NAMES)}")
    options = ExampleOptions(face_models=str(face_models), max_frames=int(max_frames),
                             min_similarity=float(min_similarity), det_size=int(det_size),
                             jpeg_quality=int(jpeg_quality), ref_size=int(ref_size), class_words=tuple(class_words),
                             caption_rules=tuple(caption_rules))
    bad = ([f"--workers {workers}: must be >= 0 (0 or 1: in-process)"] if workers < 0 else []) + options.problems()
    if bad:
        raise BuildError("; ".join(bad))
    try:
        import tensorflow_datasets as tfds
        from apache_beam.options.pipeline_options import PipelineOptions

        from mm_jax.data.tfds import BUILDERS
        from mm_jax.data.tfds.builders import build_settings
    except ImportError as e:
        raise BuildError(f"python -m mm_jax.data.prepare needs tensorflow-datasets and apache-beam ({e}): "
                         f"pip install -e '.[tfds]'") from None
    args = pipeline_args(beam_pipeline_options, workers)
    local = _is_local(args)
    tfds.disable_progress_bar()  # ours counts items; tfds' counts splits
    if _remote(src):
        raise BuildError(f"--src {src}: sources are read from a filesystem path (local, or mounted on every worker, "
                         f"e.g. gcsfuse or a Filestore/NFS mount), not from a URL; --out may be a gs:// URL")
    if local:  # on a cluster the pack need only exist where the workers run
        from mm_jax.face import FaceModels

        FaceModels.load(face_models)  # fail early, with the face module's message, on a bad pack
        if not Path(src).exists():
            raise BuildError(f"--src {src}: no such file or folder")
    progress_dir = tempfile.mkdtemp(prefix="mm_prepare_") if local else None
    try:
        def make():
            return BUILDERS[builder](data_dir=str(out), file_format="array_record", src=str(src), options=options,
                                     layout_options=layout_options, progress_dir=progress_dir, precompute=precompute)

        b = make()
        remove_incomplete(b)
        if b.is_prepared():
            settings = json.loads((epath.Path(b.data_path) / "metadata.json").read_text()).get("settings")
            if not overwrite and settings == build_settings(options, precompute):
                return summarize(b)
            if not overwrite:
                raise BuildError(f"--out {out}: {b.data_path} was built with other settings ({settings}); pass "
                                 f"--overwrite to rebuild it or choose another --out")
            epath.Path(b.data_path).rmtree()
            b = make()
        config = tfds.download.DownloadConfig(beam_options=PipelineOptions(args), manual_dir=str(src))
        with _Progress(Path(progress_dir), None, progress and local) if local else _NoProgress():
            try:
                b.download_and_prepare(download_config=config)
            except Exception as e:
                if "total number of generated examples is 0 for split" in str(e):
                    split = str(e).split("for split ")[1].split(".")[0]
                    raise BuildError(f"every {split} item of --src {src} was skipped, so the {split} split would be "
                                     f"empty and nothing was written; check --face-models, the captions (class "
                                     f"words) and --min-similarity on a few files with python -m "
                                     f"mm_jax.data.build") from None
                raise
    finally:
        if progress_dir:
            shutil.rmtree(progress_dir, ignore_errors=True)
            Path(f"{progress_dir}.total").unlink(missing_ok=True)
    downloads = Path(out) / "downloads"
    if not _remote(out) and downloads.is_dir() and not any(p.is_file() for p in downloads.rglob("*")):
        shutil.rmtree(downloads)  # the empty folders tfds' download manager makes: nothing is downloaded
    return summarize(b)


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.data.prepare", description=__doc__.split("\n\n")[0],
                                 epilog="The cluster form and the layouts: README, 'Building a dataset at scale'.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--builder", default="mm_faces_manifest", choices=BUILDER_NAMES, help="source layout")
    ap.add_argument("--src", required=True, help="the source: folder, manifest, CSV, parquet/tar folder, JSON ...")
    ap.add_argument("--out", required=True, help="TFDS data_dir (local folder, or gs://... on a cluster)")
    ap.add_argument("--face-models", required=True, help="insightface model pack folder (on every worker)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                    help="DirectRunner processes (0 or 1: in-process); ignored with --beam_pipeline_options")
    ap.add_argument("--beam_pipeline_options", default="",
                    help="comma-separated key=value Beam options, e.g. runner=DataflowRunner,project=P,region=R,"
                         "temp_location=gs://B/tmp,sdk_container_image=IMAGE")
    ap.add_argument("--captions", help="mm_sfhq: captions file (CSV / JSONL / JSON); default <src>/captions.*")
    ap.add_argument("--video-root", help="mm_clips_csv, mm_opens2v: folder of the clips (default: beside the CSV / "
                                         "<src>/videos)")
    add_example_arguments(ap)
    add_precompute_arguments(ap)
    ap.add_argument("--overwrite", action="store_true", help="rebuild a complete dataset")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    try:
        pre = precompute_settings(ap, args)  # checked before anything is written
        s = prepare(args.builder, args.src, args.out, args.face_models, workers=args.workers,
                    beam_pipeline_options=args.beam_pipeline_options,
                    layout_options={"captions": args.captions, "video_root": args.video_root},
                    max_frames=args.max_frames, min_similarity=args.min_similarity, det_size=args.det_size,
                    jpeg_quality=args.jpeg_quality, ref_size=args.ref_size, caption_rules=load_rules(args.caption_rules),
                    overwrite=args.overwrite, progress=not args.quiet, precompute=pre)
    except (BuildError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    records = ", ".join(f"{k}: {v}" for k, v in s["records"].items())
    skipped = ", ".join(f"{k}: {v['count']}" for k, v in s["skipped"].items()) or "none"
    print(f"{records} records at {s['dataset']}; skipped: {skipped}")
    c = s["captions"]
    print(f"captions without a class word: {c['without_class_word']} (rewritten: {c['rewritten'] or 'none'}, "
          f"dropped: {c['dropped']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
