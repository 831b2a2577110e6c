"""The training loop and what it writes: ``train(cfg, workdir)`` runs (or resumes) a run; ``export``
writes the trained adapter folder, ``sample_video`` a video from it, ``init_from`` starts stage 2
from stage 1. The CLI (``mm_jax.train``) parses the config and calls ``train``.

Stage 1 (``configs/image.py``) pre-trains on images, stage 2 (``configs/video.py``) fine-tunes on
clips starting from stage 1 (``init_from``). Re-running with the same workdir resumes from its
latest checkpoint (params, optimizer, step, data position). Outputs in the workdir:
``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``adapter/`` (the trained adapter folder
for ``python -m mm_jax.sample --adapter``), ``samples/``, ``config.json``, ``summary.json``.

The whole step is one ``jax.jit`` over a (data, fsdp, tensor) mesh of every device of every process;
several hosts are joined with ``jax.distributed`` when launched by a cluster launcher.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
import time
import warnings
from pathlib import Path

import jax


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the latest checkpoint is the last good one."""


def _meta(cfg, step: int, data_state, loss: float) -> dict:
    return {"step": step, "seed": int(cfg.train.seed), "stage": cfg.stage, "loss": loss, "data_state": data_state}


def init_from(path: str, state) -> dict:
    """Stage-2 start: adapter params from a stage-1 workdir (its latest checkpoint) or an exported
    adapter folder. Optimizer state and step start fresh."""
    from flax import nnx

    from mm_jax import checkpoint
    from mm_jax.training.checkpoints import TrainCheckpoints

    p = Path(path)
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


def _trained_modules(params, aux) -> dict:
    from mm_jax.training.step import merge_params

    graphdefs, templates, rest, _ = aux
    host = jax.device_get(params)
    return {k: merge_params(graphdefs[k], templates[k], rest[k], v) for k, v in host.items()}


def _write_atomically(out: Path, fill) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    fill(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def export(workdir: Path, models, params, aux) -> Path:
    """Write ``<workdir>/adapter`` (image_encoder + trained adapter), the folder ``mm_jax.sample
    --adapter`` takes; when the DiT trains too, also ``<workdir>/backbone`` (the backbone with the
    trained transformer). Each is written aside and renamed into place: never half-written."""
    from mm_jax import checkpoint

    trained = _trained_modules(params, aux)

    def adapter_folder(tmp: Path):
        shutil.copytree(models.adapter_dir / "image_encoder", tmp / "image_encoder")
        checkpoint.save_module(tmp, "adapter", trained["adapter"])
        checkpoint.write_index(tmp, ["image_encoder", "adapter"])

    def backbone_folder(tmp: Path):
        names = checkpoint.read_index(models.backbone_dir)
        for name in names:
            if name != "transformer":
                shutil.copytree(models.backbone_dir / name, tmp / name)
        checkpoint.save_module(tmp, "transformer", trained["dit"])
        checkpoint.write_index(tmp, names)

    if "dit" in trained:
        _write_atomically(workdir / "backbone", backbone_folder)
    return _write_atomically(workdir / "adapter", adapter_folder)


def sample_video(cfg, workdir: Path, step: int, models, params, aux) -> Path | None:
    """Sample the fixed reference + prompt with the exported adapter -> ``samples/step_XXXXXX.mp4``."""
    from mm_jax import identity, pipeline, video_io

    if not cfg.sample.ref or not cfg.data.face_models:
        print("sample skipped: sample.ref and data.face_models are needed", file=sys.stderr)
        return None
    adapter_dir = workdir / "adapter"
    ident = identity.compute(cfg.sample.ref, cfg.data.face_models, adapter_dir, adapter_dir)
    settings = pipeline.SampleSettings(prompt=cfg.sample.prompt, frames=cfg.sample.frames,
                                       height=cfg.sample.height, width=cfg.sample.width, steps=cfg.sample.steps,
                                       guidance=cfg.sample.guidance, seed=cfg.sample.seed,
                                       max_sequence_length=cfg.data.max_text_length)
    dit = _trained_modules(params, aux).get("dit", models.dit)
    frames = pipeline.generate(models.backbone_dir, settings, dtype=cfg.model.dtype, progress=False,
                               identity=ident, vae=models.vae, transformer=dit)
    out = workdir / "samples" / f"step_{step:06d}.mp4"
    out.parent.mkdir(parents=True, exist_ok=True)
    video_io.write_frames(out, frames, fps=8, metadata={"step": step, "prompt": cfg.sample.prompt, "ref": cfg.sample.ref})
    return out


def check(cfg) -> None:
    """The config checks that need neither data nor models (run before anything is written);
    a ValueError names the field, its value and what is allowed."""
    from mm_jax import parallel, pipeline
    from mm_jax.data.loader import check_frames
    from mm_jax.training.step import TRAINABLE

    check_frames(cfg.data.stage, int(cfg.data.frames))
    t = cfg.train
    if t.steps < 0:
        raise ValueError(f"train.steps={t.steps}: must be >= 0")
    if t.global_batch_size < 1 or t.global_batch_size % jax.process_count():
        raise ValueError(f"train.global_batch_size={t.global_batch_size}: must be a positive multiple of the "
                         f"{jax.process_count()} processes")
    for name in ("checkpoint_every", "keep_checkpoints"):
        if t[name] < 1:
            raise ValueError(f"train.{name}={t[name]}: must be >= 1")
    if "adapter" not in t.trainable or set(t.trainable) - set(TRAINABLE):
        raise ValueError(f"train.trainable={tuple(t.trainable)}: must include 'adapter' and only names from {TRAINABLE}")
    if not 0.0 <= t.face_loss_prob <= 1.0:
        raise ValueError(f"train.face_loss_prob={t.face_loss_prob}: must lie in [0, 1]")
    drops = (cfg.data.drop_text, cfg.data.drop_id, cfg.data.drop_both)
    if min(drops) < 0 or sum(drops) > 1:
        raise ValueError(f"data.drop_text/drop_id/drop_both={drops}: each >= 0, together <= 1")
    if cfg.data.num_workers < 0:
        raise ValueError(f"data.num_workers={cfg.data.num_workers}: must be >= 0 (0: in-process)")
    if cfg.optimizer.lr <= 0 or cfg.optimizer.warmup_steps < 0:
        raise ValueError(f"optimizer.lr={cfg.optimizer.lr}, optimizer.warmup_steps={cfg.optimizer.warmup_steps}: "
                         "lr must be positive, warmup_steps >= 0")
    if cfg.mesh:
        parallel.parse_mesh_spec(cfg.mesh)
    if cfg.sample.enabled:
        s = cfg.sample
        try:
            pipeline.SampleSettings(prompt=s.prompt, frames=s.frames, height=s.height, width=s.width, steps=s.steps,
                                    guidance=s.guidance, seed=s.seed).validate()
        except ValueError as e:
            raise ValueError(f"sample.{e}") from None
        if s.every < 0:
            raise ValueError(f"sample.every={s.every}: must be >= 0 (0: only after the last step)")


def train(cfg, workdir: str | Path, *, progress: bool = True, return_state: bool = False):
    """Run (or resume) training; returns a summary dict (first/last loss, steps, timings), and
    with ``return_state`` also the final trainable params and the frozen states (for tests)."""
    from tqdm.auto import tqdm

    from mm_jax import distributed, parallel
    from mm_jax.data.loader import locate_records, make_loader
    from mm_jax.training.checkpoints import TrainCheckpoints
    from mm_jax.training.logs import MetricLog
    from mm_jax.training.models import count, load_models
    from mm_jax.training.optim import learning_rate, make_optimizer
    from mm_jax.training.step import init_state, make_train_step, put_batch

    distributed.initialize()
    cfg = cfg.copy_and_resolve_references()
    check(cfg)  # cheap checks first: a bad config writes nothing
    locate_records(cfg.data.path, cfg.data.stage, cfg.data.get("format", "shards"))
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    main_process = jax.process_index() == 0
    if main_process:
        (workdir / "config.json").write_text(cfg.to_json(indent=2))
    mesh = parallel.make_mesh(cfg.mesh or None)
    n_batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    unsplit = parallel.unsplit_batch_note(cfg.train.global_batch_size, dict(mesh.shape))
    if unsplit and main_process:
        warnings.warn(unsplit, stacklevel=2)
    models = load_models(cfg.model, dict(cfg.adapter), mesh, precomputed=bool(cfg.data.precomputed))
    tx = make_optimizer(cfg.optimizer)
    lr_fn = learning_rate(cfg.optimizer)
    trainable = tuple(cfg.train.trainable)
    state, aux = init_state(models, tx, mesh, trainable)
    frozen = aux[-1]
    ckpts = TrainCheckpoints(workdir / "checkpoints", keep=cfg.train.keep_checkpoints,
                             every=cfg.train.checkpoint_every, async_save=cfg.train.async_checkpointing)
    loader = make_loader(cfg.data, tokenizer=models.tokenizer, global_batch_size=cfg.train.global_batch_size,
                         seed=cfg.train.seed)
    start = ckpts.latest_step() or 0
    params, opt_state = state.params, state.opt_state
    if start:
        params, opt_state, meta = ckpts.restore(start, params, opt_state)
        if meta.get("data_state") is not None:
            loader.set_state(meta["data_state"])
        print(f"resumed from {ckpts.directory}/{start} (loss {meta.get('loss')})")
    elif cfg.init_from:
        params = init_from(cfg.init_from, state)
        print(f"adapter initialized from {cfg.init_from}")
    step_fn = make_train_step(models, tx, state, aux, cfg.train, mesh)
    log = MetricLog(workdir, resume_step=start, enabled=main_process)
    if main_process:
        print(f"training {count(params):,} params of {'+'.join(trainable)} ({cfg.stage} stage) over {count(frozen):,} frozen; mesh "
              f"{dict(mesh.shape)}; global batch {cfg.train.global_batch_size} ({n_batch_shards} batch shards)")
    first_loss, loss, data_wait, step_time, compile_s = None, float("nan"), 0.0, 0.0, None
    bar = tqdm(total=cfg.train.steps, initial=start, desc=f"train {cfg.stage}", unit="step",
               disable=not (progress and main_process), dynamic_ncols=True)
    try:
        for step in range(start, cfg.train.steps):
            t0 = time.perf_counter()
            batch = next(loader)
            t1 = time.perf_counter()
            with jax.set_mesh(mesh):
                params, opt_state, metrics = step_fn(params, opt_state, frozen, put_batch(batch, mesh), step)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            t2 = time.perf_counter()
            loss = metrics["loss"]
            done = step + 1
            if not math.isfinite(loss):
                ckpts.wait()
                last = ckpts.latest_step()
                raise TrainingDiverged(f"loss is {loss} at step {done}: training stopped; the last good checkpoint "
                                       f"is {f'step {last} in {ckpts.directory}' if last else 'none (no step finished)'}"
                                       f"; lower optimizer.lr or check the data")
            if step == start:
                compile_s = t2 - t1
            else:
                data_wait += t1 - t0
                step_time += t2 - t0
            first_loss = loss if first_loss is None else first_loss
            lr = float(lr_fn(step))
            scalars = dict(metrics, lr=lr, data_wait_s=t1 - t0, step_s=t2 - t0,
                           samples_per_s=cfg.train.global_batch_size / max(t2 - t0, 1e-9))
            log.write(done, scalars)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", step_s=f"{t2 - t0:.2f}",
                            sps=f"{scalars['samples_per_s']:.1f}", refresh=False)
            final = done == cfg.train.steps
            if ckpts.should_save(done, final):
                ckpts.save(done, params, opt_state, _meta(cfg, done, loader.get_state(), loss))
            if main_process and cfg.sample.enabled and ((cfg.sample.every and done % cfg.sample.every == 0) or final):
                export(workdir, models, params, aux)
                path = sample_video(cfg, workdir, done, models, params, aux)
                if path:
                    bar.write(f"sample: {path}")
        ckpts.wait()
        if main_process and cfg.train.steps > start:
            export(workdir, models, params, aux)
    finally:
        bar.close()
        log.close()
        ckpts.close()
        loader.close()  # stops mp_prefetch workers and frees their shared memory
    timed = max(cfg.train.steps - start - 1, 0)
    summary = {"start_step": start, "steps": cfg.train.steps, "first_loss": first_loss, "last_loss": loss,
               "compile_s": compile_s, "mean_step_s": step_time / timed if timed else None,
               "data_wait_fraction": data_wait / step_time if step_time else None, "workdir": str(workdir)}
    if main_process:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return (summary, params, frozen) if return_state else summary
