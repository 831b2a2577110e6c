"""What a run makes of its trained adapter: ``export`` (the adapter folder, and the backbone when
the DiT trains too), ``sample_video`` (a video from it), and ``init_from`` (stage 2 starting from
stage 1's adapter). Every process calls them (SPMD); process 0 writes the files.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
from etils import epath

from mm_jax.training.workdir import copytree, is_url, workdir_path, write_atomically


def init_from(path: str, state) -> dict:
    """Stage-2 start: adapter params from a stage-1 workdir (its latest checkpoint) or an exported
    adapter folder. Optimizer state and step start fresh."""
    from flax import nnx

    from mm_jax import checkpoint
    from mm_jax.training.checkpoints import TrainCheckpoints

    p = workdir_path(path)
    if (p / "checkpoints").is_dir():
        prev = TrainCheckpoints(p / "checkpoints", keep=1, every=1, async_save=False)
        step = prev.latest_step()
        if step is None:
            raise FileNotFoundError(f"init_from={path}: the workdir has no checkpoint yet")
        params = prev.restore_params(step, state.params)
        prev.close()
        return params
    if (p / "adapter" / "config.json").exists():
        adapter = checkpoint.load_component(p, "adapter", param_dtype="float32")
        pure = nnx.to_pure_dict(nnx.state(adapter, nnx.Param))
        shapes = jax.tree.map(lambda a, b: a.shape == b.shape, pure, state.params)
        if not all(jax.tree.leaves(shapes)):
            raise ValueError(f"init_from={path}: the adapter's shapes differ from this run's adapter config")
        return jax.device_put(pure, state.param_shardings)
    raise FileNotFoundError(f"init_from={path}: neither a training workdir (checkpoints/) nor an adapter folder")


def trained_modules(params, aux) -> dict:
    """{name: module} with the trained params as they are: global arrays, sharded over the mesh
    (no host copy; every process holds the same handles)."""
    from mm_jax.training.step import merge_params

    graphdefs, templates, rest, _ = aux
    return {k: merge_params(graphdefs[k], templates[k], rest[k], v) for k, v in params.items()}


def export(workdir, models, params, aux) -> epath.Path:
    """Write ``<workdir>/adapter`` (image_encoder + trained adapter), the folder ``mm_jax.sample
    --adapter`` takes; when the DiT trains too, also ``<workdir>/backbone`` (the backbone with the
    trained transformer). Each is written aside and renamed into place: never half-written.

    Every process calls it (SPMD). The trained params stay global arrays: every process takes part
    in Orbax's save of them, and Orbax writes each process's shards and coordinates the processes,
    so no host ever holds a whole trained DiT (a gather to process 0 would put the 5B DiT's float32
    master copy, 20 GB, in one host's memory). Process 0 alone copies the frozen folders, writes
    the index and renames the folder into place."""
    from mm_jax import checkpoint

    workdir = epath.Path(workdir)
    trained = trained_modules(params, aux)
    main = jax.process_index() == 0

    def adapter_folder(tmp):
        if main:
            copytree(epath.Path(models.adapter_dir) / "image_encoder", tmp / "image_encoder")
        checkpoint.save_module(tmp, "adapter", trained["adapter"])
        if main:
            checkpoint.write_index(tmp, ["image_encoder", "adapter"])

    def backbone_folder(tmp):
        names = checkpoint.read_index(models.backbone_dir)
        if main:
            for name in names:
                if name != "transformer":
                    copytree(epath.Path(models.backbone_dir) / name, tmp / name)
        checkpoint.save_module(tmp, "transformer", trained["dit"])
        if main:
            checkpoint.write_index(tmp, names)

    if "dit" in trained:
        write_atomically(workdir / "backbone", backbone_folder, "backbone")
    return write_atomically(workdir / "adapter", adapter_folder, "adapter")


def sample_video(cfg, workdir, step: int, models, params, aux) -> epath.Path | None:
    """Sample the fixed reference + prompt with the exported adapter -> ``samples/step_XXXXXX.mp4``.
    Every process calls it (the denoising steps run over the global mesh); process 0 writes the video."""
    from mm_jax import identity, video_io

    if not cfg.sample.ref or not cfg.data.face_models:
        if jax.process_index() == 0:
            print("sample skipped: sample.ref and data.face_models are needed", file=sys.stderr)
        return None
    workdir = epath.Path(workdir)
    with tempfile.TemporaryDirectory() as local:
        adapter_dir = workdir / "adapter"
        if is_url(adapter_dir):  # the face and adapter loaders read local folders: the trained adapter comes down
            copytree(adapter_dir / "adapter", Path(local) / "adapter")
            ident = identity.compute(cfg.sample.ref, cfg.data.face_models, models.adapter_dir, local)
        else:
            ident = identity.compute(cfg.sample.ref, cfg.data.face_models, adapter_dir, adapter_dir)
        frames = _generate(cfg, models, params, aux, ident)
    out = workdir / "samples" / f"step_{step:06d}.mp4"
    if jax.process_index() == 0:
        meta = {"step": step, "prompt": cfg.sample.prompt, "ref": cfg.sample.ref}
        if is_url(out):  # the video encoder writes local files: encode aside, then copy up
            with tempfile.TemporaryDirectory() as d:
                video_io.write_frames(Path(d) / out.name, frames, fps=8, metadata=meta)
                out.parent.mkdir(parents=True, exist_ok=True)
                for f in Path(d).iterdir():  # the video and its .json sidecar
                    epath.Path(f).copy(out.parent / f.name, overwrite=True)
        else:
            video_io.write_frames(Path(out), frames, fps=8, metadata=meta)
    return out


def _generate(cfg, models, params, aux, ident):
    from mm_jax import pipeline

    settings = pipeline.SampleSettings(prompt=cfg.sample.prompt, frames=cfg.sample.frames,
                                       height=cfg.sample.height, width=cfg.sample.width, steps=cfg.sample.steps,
                                       guidance=cfg.sample.guidance, seed=cfg.sample.seed,
                                       max_sequence_length=cfg.data.max_text_length)
    dit = trained_modules(params, aux).get("dit", models.dit)
    return pipeline.generate(models.backbone_dir, settings, dtype=cfg.model.dtype, progress=False,
                             identity=ident, vae=models.vae, transformer=dit)
