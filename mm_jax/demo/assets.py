"""The setup hook of the tiny/demo training presets: ``prepare(cfg, workdir)`` builds what the run
reads in its workdir instead of reading it from disk (a random tiny backbone and adapter, a
stand-in insightface pack, a synthetic dataset, a reference face) and points the config at it.

The presets name it (``cfg.setup = "mm_jax.demo.assets:prepare"``) and the train CLI imports it by
that name, so the trainer never imports test assets. Each asset is built once (re-used when the
workdir already has it), so restarts are cheap.
"""
from __future__ import annotations

from pathlib import Path


def _done(folder: Path) -> bool:
    return (folder / ".complete").exists()


def _mark(folder: Path) -> Path:
    (folder / ".complete").write_text("ok\n")
    return folder


def tiny_models(workdir: Path) -> tuple[Path, Path]:
    from mm_jax.demo.tiny_checkpoint import build_tiny_adapter, build_tiny_checkpoint

    backbone, adapter = workdir / "tiny_models" / "backbone", workdir / "tiny_models" / "adapter"
    if not _done(backbone):
        _mark(build_tiny_checkpoint(backbone))
    if not _done(adapter):
        _mark(build_tiny_adapter(adapter, backbone))
    return backbone, adapter


def standin_faces(workdir: Path) -> Path:
    """The stand-in detector with boxes of 6 strides a side (about a sixth of a 64-pixel frame), so
    the face-weighted loss covers the synthetic face and its ring."""
    from mm_jax.demo.standin_faces import make_detector, make_recognizer

    pack = workdir / "standin_faces"
    if not _done(pack):
        pack.mkdir(parents=True, exist_ok=True)
        make_detector(pack / "det_10g.onnx", box=6.0)
        make_recognizer(pack / "w600k_r50.onnx")
        _mark(pack)
    return pack


def synthetic_dataset(workdir: Path, synthetic_cfg, face_models: Path, seed: int, data_format: str = "shards") -> Path:
    """The demo set, built by ``mm_jax.data.build`` ("shards") or by the TFDS builder on Beam ("tfds")."""
    from mm_jax.demo.synthetic import make_demo_source

    source = workdir / "synthetic_source"
    out = workdir / ("synthetic_data" if data_format == "shards" else "synthetic_tfds")
    if not _done(out):
        if not _done(source):
            _mark(make_demo_source(source, num_clips=synthetic_cfg.num_clips, num_images=synthetic_cfg.num_images,
                                   frames=synthetic_cfg.frames, height=synthetic_cfg.height,
                                   width=synthetic_cfg.width, seed=seed))
        if data_format == "tfds":
            from mm_jax.data.prepare import prepare

            prepare("mm_faces_manifest", source, out, face_models, workers=0, progress=False)
        else:
            from mm_jax.data.build import build_dataset

            build_dataset(source, out, face_models, progress=False)
        _mark(out)
    return out


def reference_face(workdir: Path) -> Path:
    """The demo's reference photo: one stand-in face. Its size is fixed (not the sample's) so that
    the detector, which resizes to 640, sees the square as exactly one face."""
    import imageio.v3 as iio

    from mm_jax.demo.standin_faces import face_image

    path = workdir / "reference_face.png"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        iio.imwrite(path, face_image(h=320, w=320, at=(160, 160), seed=7))
    return path


def prepare(cfg, workdir: str | Path) -> None:
    """Build the assets the config's markers ask for and replace the markers by their paths (in
    place): ``model.checkpoint`` / ``model.adapter`` "tiny", ``data.face_models`` "standin",
    ``data.path`` "synthetic" (from ``data.synthetic``), ``sample.ref`` "synthetic"."""
    workdir = Path(workdir).absolute()
    # refuse what would fail later before anything is written
    if cfg.data.path == "synthetic" and not cfg.data.face_models:
        raise ValueError("data.path=synthetic needs data.face_models (a pack folder, or 'standin')")
    if cfg.data.path != "synthetic":  # a real dataset given to a tiny preset
        from mm_jax.data.loader import locate_records

        locate_records(cfg.data.path, cfg.data.stage, cfg.data.get("format", "shards"))
    if cfg.model.checkpoint == "tiny" or cfg.model.adapter == "tiny":
        backbone, adapter = tiny_models(workdir)
        if cfg.model.checkpoint == "tiny":
            cfg.model.checkpoint = str(backbone)
        if cfg.model.adapter == "tiny":
            cfg.model.adapter = str(adapter)
    if cfg.data.face_models == "standin":
        cfg.data.face_models = str(standin_faces(workdir))
    if cfg.data.path == "synthetic":
        cfg.data.path = str(synthetic_dataset(workdir, cfg.data.synthetic, Path(cfg.data.face_models),
                                              int(cfg.train.seed), cfg.data.get("format", "shards")))
    if cfg.sample.ref == "synthetic" and cfg.sample.enabled:
        cfg.sample.ref = str(reference_face(workdir))
