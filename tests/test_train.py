"""Tiny end-to-end training on CPU: the loss falls, frozen params stay bit-identical, a stopped
run resumes to exactly the uninterrupted one, NaN stops with the last good checkpoint, stage 2
starts from stage 1, and one step on a 2x2x2 mesh equals the 1-device step."""
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mm_jax import checkpoint, config, train as train_cli
from mm_jax.training.loop import TrainingDiverged, train
from mm_jax.training.logs import read_history
from tests.conftest import fake_devices_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tiny_assets, module_compile_cache):
    """Tiny models, stand-in faces and a synthetic dataset (built once per session), and one compile
    cache folder: the module's in-process runs compile the tiny train step once, not once a run."""
    keys = ("model.checkpoint", "model.adapter", "data.face_models", "data.path")
    return {**{k: tiny_assets[k] for k in keys}, "compile_cache": module_compile_cache}


def _cfg(assets, spec="configs/video.py:tiny", *over):
    return config.load(spec, [f"{k}={v}" for k, v in assets.items()] + list(over))


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_training_lowers_the_loss_and_leaves_frozen_params_bit_identical(assets, tmp_path):
    from mm_jax import parallel
    from mm_jax.data.loader import make_loader
    from mm_jax.training.models import load_models
    from mm_jax.training.optim import make_optimizer
    from mm_jax.training.step import init_state, make_loss_fn, put_batch

    cfg = _cfg(assets)
    mesh = parallel.make_mesh()
    models = load_models(cfg.model, dict(cfg.adapter), mesh)
    state, aux = init_state(models, make_optimizer(cfg.optimizer), mesh)
    initial, frozen_before = _leaves(state.params), _leaves(aux[-1])
    loader = make_loader(cfg.data, tokenizer=models.tokenizer, global_batch_size=4, seed=123)
    probes = [put_batch(next(loader), mesh) for _ in range(3)]
    loss_fn = jax.jit(make_loss_fn(models, aux, cfg.train))
    probe = lambda p: float(np.mean([loss_fn(p, aux[-1], b, 10_000 + i)[0] for i, b in enumerate(probes)]))
    before = probe(state.params)

    summary, params, frozen = train(cfg, tmp_path / "run", progress=False, return_state=True)
    after = probe(params)
    assert summary["steps"] == 30 and np.isfinite(summary["last_loss"])
    assert after < 0.95 * before, (before, after)  # the same probe batches, noise and timesteps
    assert all(np.array_equal(a, b) for a, b in zip(frozen_before, _leaves(frozen)))
    assert not all(np.array_equal(a, b) for a, b in zip(initial, _leaves(params)))
    # the exported adapter folder holds exactly the trained params
    exported = checkpoint.load_component(tmp_path / "run" / "adapter", "adapter", param_dtype="float32")
    got = nnx.to_pure_dict(nnx.state(exported, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(got), _leaves(params["adapter"])))


def _history(workdir):
    return [(r["step"], r["loss"]) for r in read_history(workdir)]


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_a_stopped_run_resumes_to_exactly_the_uninterrupted_one(assets, tmp_path):
    over = ("train.steps=20",)
    _, straight, _ = train(_cfg(assets, "configs/video.py:tiny", *over), tmp_path / "a", progress=False,
                           return_state=True)
    # "killed" after step 15 with its last checkpoint at 10: steps 11..15 are redone on resume
    train(_cfg(assets, "configs/video.py:tiny", "train.steps=15"), tmp_path / "b", progress=False)
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "15")
    _, resumed, _ = train(_cfg(assets, "configs/video.py:tiny", *over), tmp_path / "b", progress=False,
                          return_state=True)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(straight), _leaves(resumed)))
    assert _history(tmp_path / "a") == _history(tmp_path / "b")
    assert [s for s, _ in _history(tmp_path / "b")] == list(range(1, 21))
    assert sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit()) == [10, 20]
    events = list((tmp_path / "b" / "tb").glob("events.out.tfevents.*"))
    assert events and sum(p.stat().st_size for p in events) > 0


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(assets, tmp_path):
    cfg = _cfg(assets, "configs/video.py:tiny", "optimizer.lr=1e30", "optimizer.warmup_steps=0",
               "optimizer.grad_clip=0.0", "train.checkpoint_every=1")
    with pytest.raises(TrainingDiverged, match="last good checkpoint is step") as e:
        train(cfg, tmp_path / "nan", progress=False)
    failed = int(str(e.value).split(" at step ")[1].split(":")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == failed - 1
    assert all(np.isfinite(r["loss"]) for r in read_history(tmp_path / "nan"))


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_stage_two_starts_from_the_stage_one_adapter(assets, tmp_path):
    _, stage1, _ = train(_cfg(assets, "configs/image.py:tiny", "train.steps=3"), tmp_path / "s1", progress=False,
                         return_state=True)
    _, start, _ = train(_cfg(assets, "configs/video.py:tiny", "train.steps=0", f"init_from={tmp_path / 's1'}"),
                        tmp_path / "s2", progress=False, return_state=True)
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(stage1), _leaves(start)))


def test_cli_rejects_bad_overrides_and_missing_data_clearly(assets, tmp_path, capsys):
    assert train_cli.main(["--config", "configs/video.py:tiny", "--workdir", str(tmp_path / "x"),
                           "--config.train.nope=1"]) == 2
    assert "no field 'nope'" in capsys.readouterr().err
    args = [f"--config.{k}={v}" for k, v in assets.items() if k != "data.path"]
    assert train_cli.main(["--config", "configs/video.py:tiny", "--workdir", str(tmp_path / "y"), *args,
                           f"--config.data.path={tmp_path / 'empty'}"]) == 2
    assert str(tmp_path / "empty") in capsys.readouterr().err
    assert train_cli.main(["--config", "configs/video.py:tiny", "--workdir", str(tmp_path / "z"),
                           "--config.data.frames=8"]) == 2
    assert "data.frames=8: not a frame count the VAE encodes and decodes exactly" in capsys.readouterr().err
    args = [f"--config.{k}={v}" for k, v in assets.items() if k != "model.checkpoint"]
    assert train_cli.main(["--config", "configs/video.py:tiny", "--workdir", str(tmp_path / "w"), *args,
                           f"--config.model.checkpoint={tmp_path / 'nomodel'}"]) == 2
    assert f"model.checkpoint={tmp_path / 'nomodel'}: not an mm_jax checkpoint folder" in capsys.readouterr().err
    assert not any((tmp_path / w).exists() for w in "xyzw")  # a rejected run writes nothing
    with pytest.raises(SystemExit) as e:
        train_cli.main(["--help"])
    assert e.value.code == 0


@pytest.mark.slow  # a Beam build of the synthetic set, then two tiny steps
def test_the_train_cli_trains_on_a_tfds_dataset(assets, tmp_path, capsys):
    """``--config.data.format=tfds`` (README): the demo hook builds the set with the TFDS builder on
    Beam, and the trainer reads it through tfds.data_source; it used to look for shard files and exit 2."""
    args = [f"--config.{k}={v}" for k, v in assets.items() if k != "data.path"]
    common = ["--config", "configs/video.py:tiny", *args, "--config.data.format=tfds", "--config.train.steps=2",
              "--config.sample.enabled=False", "--no-progress"]
    assert train_cli.main([*common, "--workdir", str(tmp_path / "a"), "--config.data.path=synthetic"]) == 0, \
        capsys.readouterr().err
    data = tmp_path / "a" / "synthetic_tfds"
    assert list(data.glob("*/*/dataset_info.json")) and not list(data.glob("*.array_record"))
    history = read_history(tmp_path / "a")
    assert [r["step"] for r in history][-1] == 2 and all(np.isfinite(r["loss"]) for r in history)
    # the same dataset named directly, as a user's prepared folder is
    assert train_cli.main([*common, "--workdir", str(tmp_path / "b"), f"--config.data.path={data}"]) == 0, \
        capsys.readouterr().err
    assert [r["step"] for r in read_history(tmp_path / "b")][-1] == 2


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_one_step_on_a_2x2x2_mesh_equals_the_one_device_step(tiny_assets):
    env = fake_devices_env()
    built = Path(tiny_assets["model.checkpoint"]).parents[1]  # the script's tiny_models(folder) finds them built
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "sharded_step_check.py"), str(built)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "params_rel_err" in r.stdout
    print(r.stdout.strip().splitlines()[-1])



@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_precomputed_latents_and_text_give_the_loss_of_encoding_at_step_time(assets, tmp_path):
    from mm_jax import parallel
    from mm_jax.data.loader import make_loader
    from mm_jax.data.precompute import precompute
    from mm_jax.training.models import load_models
    from mm_jax.training.optim import make_optimizer
    from mm_jax.training.step import init_state, make_loss_fn, put_batch

    data = tmp_path / "data"
    shutil.copytree(assets["data.path"], data)
    precompute(data, assets["model.checkpoint"], height=64, width=64, frames=9, max_text_length=32, progress=False)
    over = ("data.drop_text=0.0", "data.drop_id=0.0", "data.drop_both=0.0")
    cfg = _cfg(assets, "configs/video.py:tiny", *over)
    pre = _cfg(assets, "configs/video.py:tiny", *over, f"data.path={data}", "data.precomputed=True")
    mesh = parallel.make_mesh()
    models = load_models(cfg.model, dict(cfg.adapter), mesh)
    state, aux = init_state(models, make_optimizer(cfg.optimizer), mesh)
    loss_fn = jax.jit(make_loss_fn(models, aux, cfg.train))
    a = next(make_loader(cfg.data, tokenizer=models.tokenizer, global_batch_size=2, seed=1))  # 9-frame clips: start 0
    b = next(make_loader(pre.data, tokenizer=models.tokenizer, global_batch_size=2, seed=1))
    assert "pixels" not in b and b["latents"].shape == (2, 3, 8, 8, 4) and b["text_embeddings"].shape == (2, 32, 32)
    la = float(loss_fn(state.params, aux[-1], put_batch(a, mesh), 7)[0])
    lb = float(loss_fn(state.params, aux[-1], put_batch(b, mesh), 7)[0])
    assert abs(la - lb) <= 1e-5 * abs(la), (la, lb)


@pytest.mark.slow  # two compiles of the tiny train step
def test_the_real_configs_remat_trains_with_the_loss_and_gradients_of_no_remat(assets):
    """The real configs train with remat ("full" in configs/common.py); it used to crash on the
    first step (nnx.remat inside the train step). The jitted train step runs, and the loss and
    gradients equal those of "none" (1e-6). Gradients are compared on the scale of the whole
    gradient: some are zero in exact arithmetic (a key bias under softmax) and hold only rounding
    noise. Every other policy: tests/test_id_adapter.py (DiT + adapter) and tests/test_dit.py."""
    from mm_jax import config, parallel
    from mm_jax.data.loader import make_loader
    from mm_jax.training.models import load_models
    from mm_jax.training.optim import make_optimizer
    from mm_jax.training.step import init_state, make_loss_fn, make_train_step, put_batch

    real = config.load("configs/video.py").model.remat_policy
    assert real != "none"
    mesh = parallel.make_mesh()
    batch = None
    got = {}
    for policy in ("none", real):
        cfg = _cfg(assets, "configs/video.py:tiny", f"model.remat_policy={policy}")
        models = load_models(cfg.model, dict(cfg.adapter), mesh)
        tx = make_optimizer(cfg.optimizer)
        state, aux = init_state(models, tx, mesh)
        if batch is None:
            batch = next(make_loader(cfg.data, tokenizer=models.tokenizer, global_batch_size=2, seed=5))
        b = put_batch(batch, mesh)
        grad_fn = jax.jit(jax.value_and_grad(make_loss_fn(models, aux, cfg.train), has_aux=True))
        (loss, _), grads = grad_fn(state.params, aux[-1], b, 3)
        step = make_train_step(models, tx, state, aux, cfg.train, mesh)
        _, _, metrics = step(state.params, state.opt_state, aux[-1], b, 3)
        got[policy] = (float(loss), _leaves(grads), float(metrics["loss"]), float(metrics["grad_norm"]))
    loss0, grads0, step_loss0, norm0 = got["none"]
    loss, grads, step_loss, norm = got[real]
    scale = max(float(np.max(np.abs(g))) for g in grads0)
    assert step_loss0 == pytest.approx(loss0, rel=1e-6)
    assert abs(loss - loss0) <= 1e-6 * abs(loss0), (loss, loss0)
    assert max(float(np.max(np.abs(g - g0))) for g, g0 in zip(grads, grads0)) <= 1e-6 * scale
    assert abs(step_loss - step_loss0) <= 1e-6 * abs(step_loss0) and abs(norm - norm0) <= 1e-6 * norm0


def _launch(n, m, *command, timeout=600):
    env = {k: v for k, v in fake_devices_env(1).items() if k != "XLA_FLAGS"}  # the launcher sets each child's
    return subprocess.run([sys.executable, "-m", "mm_jax.launch", "--processes", str(n), "--devices-per-process",
                           str(m), "--", *command], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_each_process_loads_the_rows_its_devices_hold_and_put_batch_assembles_the_global_batch():
    """2 processes x 4 devices: ``process_rows`` gives each process the rows its devices hold (half
    each when the batch is split 8 or 2 ways, all of them when it is replicated), and
    ``put_batch`` builds the global batch from them exactly (tests/process_rows_check.py)."""
    r = _launch(2, 4, sys.executable, str(ROOT / "tests" / "process_rows_check.py"), timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ok = [line for line in r.stdout.splitlines() if "ROWS" in line and line.endswith(" ok")]
    assert len(ok) == 8, r.stdout  # 4 meshes x 2 processes


def test_a_local_workdir_the_processes_do_not_share_is_refused_by_name(assets, tmp_path):
    """Each process given its own folder at "the same" path (as hosts with their own disks are):
    process 1 does not see process 0's marker, so the run exits 2 naming it, before writing."""
    args = " ".join(f"--config.{k}={v}" for k, v in assets.items() if k != "compile_cache")  # 2 CPU processes: off
    r = _launch(2, 1, "sh", "-c", f"{sys.executable} -m mm_jax.train --config configs/video.py:tiny {args} "
                                  f"--config.sample.enabled=False --no-progress --workdir {tmp_path}/$JAX_PROCESS_ID")
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"--workdir {tmp_path}/0 is not shared between processes: process(es) [1] do not see" in r.stderr
    assert "Traceback" not in r.stderr
    assert not any((tmp_path / p / "config.json").exists() for p in "01")


def test_a_crash_after_work_started_exits_1_with_its_traceback_and_bad_input_still_exits_2(assets, tmp_path):
    """A ValueError once training started (here from loading the models, after the config was
    written) is a crash: exit 1 with its traceback, no longer "bad input" (exit 2, one line)."""
    args = [f"--config.{k}={v}" for k, v in assets.items()]
    crash = ("import sys, mm_jax.training.models as m\n"
             "def load_models(*a, **k): raise ValueError('injected failure after start')\n"
             "m.load_models = load_models\n"
             "from mm_jax import train\n"
             "sys.exit(train.main(sys.argv[1:]))\n")
    env = fake_devices_env(1)
    common = ["--config", "configs/video.py:tiny", *args, "--config.sample.enabled=False", "--no-progress"]
    r = subprocess.run([sys.executable, "-c", crash, *common, "--workdir", str(tmp_path / "crash")], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback (most recent call last)" in r.stderr and "ValueError: injected failure after start" in r.stderr
    assert (tmp_path / "crash" / "config.json").exists()  # work had started
    r = subprocess.run([sys.executable, "-m", "mm_jax.train", *common, "--workdir", str(tmp_path / "bad"),
                        "--config.train.log_every=0"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "train.log_every=0: must be >= 1" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "bad").exists()


def test_metrics_and_tensorboard_reach_a_url_workdir(tmp_path, monkeypatch):
    """``--workdir gs://...``: metrics.jsonl (rewritten whole at each flush: object stores cannot
    append; truncated on resume) and the TensorBoard event file go through etils.epath, here to a
    local file system registered for gs:// (no bucket reachable from the tests)."""
    import os

    import fsspec  # noqa: F401  (loads fsspec.registry)
    from etils.epath import backend
    from fsspec.implementations.local import LocalFileSystem

    from mm_jax.training.logs import MetricLog

    root = str(tmp_path / "bucket_root")

    class LocalBucket(LocalFileSystem):
        """gs://bucket/x -> <root>/bucket/x, parents created (object stores need none)."""

        @classmethod
        def _strip_protocol(cls, path):
            path = os.fspath(path)
            return LocalFileSystem._strip_protocol(root + "/" + path[5:] if path.startswith("gs://") else path)

        def __init__(self, *args, finalize_on_close=None, **kwargs):
            super().__init__(*args, auto_mkdir=True, **kwargs)

    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", LocalBucket)  # epath asks for "gcs"
    backend.fsspec_backend._get_filesystem.cache_clear()
    try:
        log = MetricLog("gs://bucket/run", resume_step=0)
        for step in range(1, 6):
            log.write(step, {"loss": 1.0 / step})
            if step % 2 == 0:
                log.flush()
        log.close()
        assert [r["step"] for r in read_history("gs://bucket/run")] == [1, 2, 3, 4, 5]
        log = MetricLog("gs://bucket/run", resume_step=3)  # resumed from step 3: steps 4, 5 are redone
        log.write(4, {"loss": 9.0})
        log.close()
        assert [(r["step"], r["loss"]) for r in read_history("gs://bucket/run")] == [(1, 1.0), (2, 0.5), (3, 1 / 3),
                                                                                    (4, 9.0)]
        local = tmp_path / "bucket_root" / "bucket" / "run"
        events = list((local / "tb").glob("events.out.tfevents.*"))
        assert events and all(p.stat().st_size > 0 for p in events)
        assert not (ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()
    finally:
        backend.fsspec_backend._get_filesystem.cache_clear()


def test_losses_fetched_in_a_window_are_all_logged_and_checked_in_step_order():
    """``train.log_every``: the metrics of several steps are fetched at once; every step gets its
    line, and the first non-finite loss stops the run, after the finite steps before it were
    logged, naming the last good checkpoint (never a step after an unchecked loss)."""
    import jax.numpy as jnp

    from mm_jax.training.loop import MetricWindow

    class Log:
        def __init__(self):
            self.lines = []

        def write(self, step, scalars):
            self.lines.append((step, scalars["loss"]))

        def flush(self):
            pass

    log = Log()
    window = MetricWindow(log, lambda step: 1e-3, 4, lambda: "step 2 in ckpts")
    for done, loss in ((1, 1.0), (2, 0.5)):
        window.add(done, {"loss": jnp.float32(loss)}, 0.0)
    window.flush()
    for done, loss in ((3, 0.25), (4, float("nan")), (5, 0.1)):
        window.add(done, {"loss": jnp.float32(loss)}, 0.0)
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 4: .* last good checkpoint is step 2 in ckpts"):
        window.flush()
    assert log.lines == [(1, 1.0), (2, 0.5), (3, 0.25)] and window.loss == 0.25 and window.first_loss == 1.0
