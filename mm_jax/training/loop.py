"""The training loop: ``train(cfg, workdir)`` runs (or resumes) a run, ``check(cfg)`` refuses a bad
config before any work. What it writes of the trained adapter (``export``, ``sample_video``,
``init_from``) is in ``mm_jax.training.export``, the workdir's shared-folder check and atomic
writes in ``mm_jax.training.workdir`` (both importable from here too). The CLI (``mm_jax.train``)
parses the config and calls ``train``.

Stage 1 (``configs/image.py``) pre-trains on images, stage 2 (``configs/video.py``) fine-tunes on
clips starting from stage 1 (``init_from``). Re-running with the same workdir resumes from its
latest checkpoint (params, optimizer, step, data position). Outputs in the workdir:
``checkpoints/``, ``metrics.jsonl``, ``tb/`` (TensorBoard), ``adapter/`` (the trained adapter folder
for ``python -m mm_jax.sample --adapter``), ``samples/``, ``config.json``, ``summary.json``.

The whole step is one ``jax.jit`` over a (data, fsdp, tensor) mesh of every device of every process
(joined by ``mm_jax.distributed.initialize``, which the CLI calls first). Every process runs the
same program: the steps, the export and the samples are SPMD work; only process 0 writes files
(Orbax writes each process's part of a checkpoint itself). The workdir is an ``etils.epath`` path:
a local folder, which several processes must share (checked at start), or a URL such as
``gs://bucket/run`` that every host reaches.

The host never waits for a step: it dispatches step k, then loads and places batch k+1 while the
devices run (``DevicePrefetch``), and fetches the metrics every ``train.log_every`` steps (and
before any checkpoint, sample or export: a checkpoint is written only after every loss before it
was checked finite).
"""
from __future__ import annotations

import collections
import json
import math
import os
import time
import warnings

import jax

from mm_jax.training.export import export, init_from, sample_video  # noqa: F401  (public here too)
from mm_jax.training.workdir import Refused, check_shared_workdir, is_url, workdir_path  # noqa: F401


class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the latest checkpoint is the last good one."""


def _meta(cfg, step: int, data_state, loss: float) -> dict:
    return {"step": step, "seed": int(cfg.train.seed), "stage": cfg.stage, "loss": loss, "data_state": data_state}


def check(cfg) -> None:
    """The config checks that need neither data nor models (run before anything is written);
    a ValueError names the field, its value and what is allowed."""
    from mm_jax import parallel
    from mm_jax.frame_counts import check_frames
    from mm_jax.sample_settings import check_video
    from mm_jax.training.step import TRAINABLE

    check_frames(cfg.data.stage, int(cfg.data.frames))
    t = cfg.train
    if t.steps < 0:
        raise ValueError(f"train.steps={t.steps}: must be >= 0")
    if t.global_batch_size < 1:
        raise ValueError(f"train.global_batch_size={t.global_batch_size}: must be >= 1")
    for name in ("checkpoint_every", "keep_checkpoints", "log_every", "device_prefetch", "profile_steps"):
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
            check_video(s.frames, s.height, s.width, s.steps)
        except ValueError as e:
            raise ValueError(f"sample.{e}") from None
        if not s.prompt:
            raise ValueError("sample.prompt is empty")
        if s.every < 0:
            raise ValueError(f"sample.every={s.every}: must be >= 0 (0: only after the last step)")


class DevicePrefetch:
    """Batches placed on the devices ahead of the step that takes them: ``pop()`` -> (global
    batch arrays, the loader state after it, host seconds it took to load and place); ``fill()``
    reads and places up to ``depth`` batches (called right after a step is dispatched, so the host
    loads while the devices compute). Reads no more than ``limit`` batches in all."""

    def __init__(self, loader, put, depth: int, limit: int):
        self.loader, self.put, self.depth, self.left = loader, put, depth, limit
        self.queue = collections.deque()

    def fill(self) -> None:
        while len(self.queue) < self.depth and self.left > 0:
            t0 = time.perf_counter()
            batch = self.put(next(self.loader))
            self.queue.append((batch, self.loader.get_state(), time.perf_counter() - t0))
            self.left -= 1

    def pop(self):
        if not self.queue:
            self.fill()
        return self.queue.popleft()


class MetricWindow:
    """Each step's metrics stay on the devices until ``flush()`` fetches them all in one transfer,
    checks every loss finite in step order, and writes one log line per step; ``TrainingDiverged``
    at the first non-finite one (after logging the finite ones before it), naming ``last_good()``."""

    def __init__(self, log, lr_fn, global_batch: int, last_good):
        self.log, self.lr_fn, self.global_batch, self.last_good = log, lr_fn, global_batch, last_good
        self.pending: list[tuple[int, dict, float]] = []  # (step done, device metrics, host data seconds)
        self.started = time.perf_counter()
        self.first_loss = self.loss = None
        self.on_step = lambda done, scalars: None

    def add(self, done: int, metrics, data_s: float) -> None:
        self.pending.append((done, metrics, data_s))

    def flush(self) -> float:
        """-> the wall seconds per step over the window (the steps since the last flush)."""
        if not self.pending:
            return 0.0
        fetched = jax.device_get([m for _, m, _ in self.pending])
        now = time.perf_counter()
        step_s = (now - self.started) / len(self.pending)
        self.started = now
        pending, self.pending = self.pending, []
        for (done, _, data_s), metrics in zip(pending, fetched):
            metrics = {k: float(v) for k, v in metrics.items()}
            loss = metrics["loss"]
            if not math.isfinite(loss):
                raise TrainingDiverged(f"loss is {loss} at step {done}: training stopped; the last good checkpoint "
                                       f"is {self.last_good()}; lower optimizer.lr or check the data")
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.loss = loss
            scalars = dict(metrics, lr=float(self.lr_fn(done - 1)), data_wait_s=data_s, step_s=step_s,
                           samples_per_s=self.global_batch / max(step_s, 1e-9))
            self.log.write(done, scalars)
            self.on_step(done, scalars)
        self.log.flush()
        return step_s


def train(cfg, workdir: str | os.PathLike, *, progress: bool = True, return_state: bool = False,
          profile: str | os.PathLike | None = None):
    """Run (or resume) training; returns a summary dict (first/last loss, steps, timings), and
    with ``return_state`` also the final trainable params and the frozen states (for tests).
    ``profile``: a folder for a trace of ``train.profile_steps`` steps (``mm_jax.profiling``).

    Everything checkable before work (the config, the data's presence, the model folders, the mesh,
    a shared workdir) raises ``Refused`` before anything is written; a failure after that propagates as it is."""
    from tqdm.auto import tqdm

    from mm_jax import compile_cache, distributed, parallel, profiling
    from mm_jax.data.loader import locate_records, make_loader
    from mm_jax.training.checkpoints import TrainCheckpoints
    from mm_jax.training.logs import MetricLog
    from mm_jax.training.models import check_model_folders, count, load_models
    from mm_jax.training.optim import learning_rate, make_optimizer
    from mm_jax.training.preemption import Preempted, Preemption
    from mm_jax.training.step import init_state, make_train_step, process_rows, put_batch

    distributed.initialize()
    cfg = cfg.copy_and_resolve_references()
    compile_cache.enable(compile_cache.resolve(cfg.get("compile_cache")))  # a resumed run reuses the compiled step
    workdir = workdir_path(workdir)
    try:
        check(cfg)  # cheap checks first: a bad config writes nothing
        locate_records(cfg.data.path, cfg.data.stage, cfg.data.get("format", "shards"))
        check_model_folders(cfg.model)
        mesh = parallel.make_mesh(cfg.mesh or None, dcn=cfg.mesh_dcn or None)
        rows = process_rows(mesh, int(cfg.train.global_batch_size))
    except (ValueError, FileNotFoundError) as e:
        raise Refused(str(e)) from e
    check_shared_workdir(workdir)
    main_process = jax.process_index() == 0
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(cfg.to_json(indent=2))
    global_batch = int(cfg.train.global_batch_size)
    n_batch_shards = parallel.batch_shards(mesh)
    unsplit = parallel.unsplit_batch_note(global_batch, dict(mesh.shape))
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
    loader = make_loader(cfg.data, tokenizer=models.tokenizer, global_batch_size=global_batch, seed=cfg.train.seed,
                         rows=rows, ref_size=models.image_encoder.cfg.image_size)
    start = ckpts.latest_step() or 0
    params, opt_state = state.params, state.opt_state
    if start:
        params, opt_state, meta = ckpts.restore(start, params, opt_state)
        if meta.get("data_state") is not None:
            loader.set_state(meta["data_state"])
        if main_process:
            print(f"resumed from {ckpts.directory}/{start} (loss {meta.get('loss')})")
    elif cfg.init_from:
        params = init_from(cfg.init_from, state)
        if main_process:
            print(f"adapter initialized from {cfg.init_from}")
    step_fn = make_train_step(models, tx, state, aux, cfg.train, mesh)
    log = MetricLog(workdir, resume_step=start, enabled=main_process)
    if main_process:
        print(f"training {count(params):,} params of {'+'.join(trainable)} ({cfg.stage} stage) over {count(frozen):,} frozen; mesh "
              f"{dict(mesh.shape)}; global batch {global_batch} ({n_batch_shards} batch shards; this process loads "
              f"rows {rows[0]}:{rows[1]}); metrics fetched every {cfg.train.log_every} steps")
    bar = tqdm(total=cfg.train.steps, initial=start, desc=f"train {cfg.stage}", unit="step",
               disable=not (progress and main_process), dynamic_ncols=True)

    def last_good() -> str:
        ckpts.wait()
        last = ckpts.latest_step()
        return f"step {last} in {ckpts.directory}" if last else "none (no step finished)"

    window = MetricWindow(log, lr_fn, global_batch, last_good)

    def show(done, scalars):
        bar.update(1)
        bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}", step_s=f"{scalars['step_s']:.2f}",
                        sps=f"{scalars['samples_per_s']:.1f}", refresh=False)

    window.on_step = show
    prefetch = DevicePrefetch(loader, lambda b: put_batch(b, mesh, global_batch), depth=cfg.train.device_prefetch,
                              limit=max(cfg.train.steps - start, 0))
    compile_s, data_wait, timed_s, timed_steps = None, 0.0, 0.0, 0
    traced = profiling.StepWindow(profile, start + 1 if cfg.train.steps - start > 1 else start, cfg.train.profile_steps)
    try:
        with Preemption() as preemption:
            for step in range(start, cfg.train.steps):
                batch, data_state, data_s = prefetch.pop()
                with jax.set_mesh(mesh), traced.step(step):
                    params, opt_state, metrics = step_fn(params, opt_state, frozen, batch, step)
                traced.after(step, metrics)
                del batch
                prefetch.fill()  # the next batches load while this step runs
                done = step + 1
                window.add(done, metrics, data_s)
                if step > start:
                    data_wait += data_s
                final = done == cfg.train.steps
                save = ckpts.should_save(done, final)
                sample = cfg.sample.enabled and ((cfg.sample.every and done % cfg.sample.every == 0) or final)
                if step == start or save or sample or final or (done - start) % cfg.train.log_every == 0:
                    n = len(window.pending)
                    step_s = window.flush()  # before a checkpoint: its losses are checked finite first
                    if step == start:
                        compile_s = step_s
                    else:
                        timed_s, timed_steps = timed_s + step_s * n, timed_steps + n
                if save:
                    ckpts.save(done, params, opt_state, _meta(cfg, done, data_state, window.loss))
                if sample:
                    export(workdir, models, params, aux)
                    path = sample_video(cfg, workdir, done, models, params, aux)
                    if path and main_process:
                        bar.write(f"sample: {path}")
                if save or sample:
                    window.started = time.perf_counter()  # step times leave out checkpoint and sample time
                if not final and preemption.reached():  # every process stops after the same step
                    window.flush()
                    if not save:
                        ckpts.save(done, params, opt_state, _meta(cfg, done, data_state, window.loss))
                    ckpts.wait()
                    raise Preempted(done, ckpts.directory)
        window.flush()
        ckpts.wait()
        if cfg.train.steps > start:
            export(workdir, models, params, aux)
    finally:
        traced.close()
        bar.close()
        log.close()
        ckpts.close()
        loader.close()  # stops mp_prefetch workers and frees their shared memory
    summary = {"start_step": start, "steps": cfg.train.steps, "first_loss": window.first_loss,
               "last_loss": window.loss if window.loss is not None else float("nan"),
               "compile_s": compile_s, "mean_step_s": timed_s / timed_steps if timed_steps else None,
               "data_wait_fraction": data_wait / timed_s if timed_s else None, "workdir": str(workdir),
               "compile": compile_cache.STATS.as_dict()}
    if main_process:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return (summary, params, frozen) if return_state else summary
