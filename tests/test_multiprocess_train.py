"""Training on several JAX processes: 2 local processes x 4 CPU devices started by
``python -m mm_jax.launch`` form one run of 8 devices, with the real configs' settings on tiny
widths (remat ``full``, bfloat16, 2 Grain workers, async Orbax checkpoints).

Claims: the loss history equals the 1-process run on 8 devices; periodic samples and the export
are written once; a SIGTERM saves the step all processes agree on and exits 75; a kill -9 of one
process fails the launch and a relaunch resumes from the last complete checkpoint; both end
bit-identical to the uninterrupted run; checkpoints move between 2 processes and 1 on another mesh.

Runs are shared (a run costs about a minute of compiling on 2 cores): the uninterrupted 2-process
run and the 1-process run are module fixtures, and one interrupted chain serves the SIGTERM and
the kill -9 tests. Every run's wall time is printed (``pytest -s``) and summed at the end: 8 runs,
939 s on 2 CPU cores shared with other work, 868 s at load ~13 (the module: 18 min there, 109 s of it
building the session's assets, conftest.tiny_assets, which a whole-suite run has already built).
Edits to mm_jax/ during a run break the bit-identical claims (the relaunches import the new code).
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import psutil
import pytest

from mm_jax import exit_codes
from mm_jax.training.logs import read_history
from tests.conftest import fake_devices_env

ROOT = Path(__file__).resolve().parents[1]
STEPS, EVERY = 8, 4
# the reference configs' settings (configs/common.py), which the tiny preset turns off for speed
REAL = ("model.remat_policy=full", "model.dtype=bfloat16", "data.num_workers=2", "train.async_checkpointing=True")
# compile_cache off: a second 2-process run reading the step from JAX's persistent cache failed here
# (gloo context initialization timed out after 30 s), and the tests must not depend on ~/.cache
SHORT = (f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=2",
         "train.global_batch_size=8", "compile_cache=off")
WALL: dict[str, float] = {}


@dataclass
class Run:
    name: str
    workdir: Path
    code: int
    output: str
    seconds: float

    def lines(self, prefix: str = "") -> list[str]:
        return [line for line in self.output.splitlines() if line.startswith(prefix)]


class Launch:
    """One training command in the background, its output in ``<workdir>.log``."""

    def __init__(self, name: str, workdir: Path, assets: dict, *over: str, processes: int = 2, devices: int = 4):
        train = [sys.executable, "-m", "mm_jax.train", "--config", "configs/video.py:tiny", "--workdir",
                 str(workdir), "--no-progress", *(f"--config.{k}={v}" for k, v in assets.items()),
                 *(f"--config.{o}" for o in REAL + SHORT + over)]
        if processes == 1:
            cmd, env = train, fake_devices_env(devices)
        else:  # the launcher sets each child's device count
            cmd = [sys.executable, "-m", "mm_jax.launch", "--processes", str(processes), "--devices-per-process",
                   str(devices), "--", *train]
            env = fake_devices_env(1)
        self.name, self.workdir, self.log = name, workdir, workdir.with_name(workdir.name + f".{name}.log")
        self.t0 = time.perf_counter()
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def child(self, index: int) -> psutil.Process:
        """Process ``index`` of the launch (the launcher's child with that JAX_PROCESS_ID)."""
        for c in psutil.Process(self.proc.pid).children():
            if c.environ().get("JAX_PROCESS_ID") == str(index):
                return c
        raise AssertionError(f"{self.name}: the launcher has no process {index}")

    def wait_for_step(self, step: int, *, checkpoint: int = 0, timeout: float = 600) -> int:
        """Poll metrics.jsonl (no sleep-based guess) until a step >= ``step`` is logged and a complete
        checkpoint >= ``checkpoint`` exists -> the last step logged."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            logged = [r["step"] for r in read_history(self.workdir)] if (self.workdir / "metrics.jsonl").exists() else []
            if logged and logged[-1] >= step and max(_steps(self.workdir) + [0]) >= checkpoint:
                return logged[-1]
            assert self.proc.poll() is None, f"{self.name} exited {self.proc.returncode} before step {step}:\n" \
                                             f"{self.log.read_text()[-3000:]}"
            time.sleep(0.1)
        raise AssertionError(f"{self.name}: step {step} not logged in {timeout} s")

    def finish(self, timeout: float = 900) -> Run:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        seconds = time.perf_counter() - self.t0
        WALL[self.name] = seconds
        print(f"\n{self.name}: exit {code} in {seconds:.1f} s (total so far {sum(WALL.values()):.1f} s)")
        return Run(self.name, self.workdir, code, self.log.read_text(), seconds)


def _run(name, workdir, assets, *over, processes=2, devices=4) -> Run:
    return Launch(name, workdir, assets, *over, processes=processes, devices=devices).finish()


def _losses(workdir) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_history(workdir)]


def _steps(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _flat(tree) -> dict[str, np.ndarray]:
    """{"a/b/0": array} with dict keys and list indices alike (Orbax stores list indices as strings)."""
    key = lambda k: str(getattr(k, "key", getattr(k, "idx", k)))
    return {"/".join(key(k) for k in path): np.asarray(v) for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _saved_params(workdir, step: int) -> dict[str, np.ndarray]:
    """The trainable params of checkpoint ``step``, restored on this test's one device."""
    import orbax.checkpoint as ocp

    path, checkpointer = Path(workdir) / "checkpoints" / str(step) / "params", ocp.StandardCheckpointer()
    here = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # not the devices that saved it
    saved = checkpointer.metadata(path).item_metadata
    return _flat(checkpointer.restore(path, jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here), saved)))


def _assert_bit_identical(run: Run, reference: Run) -> None:
    assert run.code == exit_codes.OK, run.output[-3000:]
    assert _losses(run.workdir) == _losses(reference.workdir)
    assert [s for s, _ in _losses(run.workdir)] == list(range(1, STEPS + 1))
    ours, ref = _saved_params(run.workdir, STEPS), _saved_params(reference.workdir, STEPS)
    assert ours.keys() == ref.keys() and all(np.array_equal(ours[k], ref[k]) for k in ref)


def _max_rel_loss_err(ours: dict, ref: dict, steps) -> float:
    """max over ``steps`` of |loss - reference loss| / |reference loss| ({step: loss} dicts)."""
    assert set(steps) <= ours.keys() and set(steps) <= ref.keys(), (sorted(ours), sorted(ref))
    return max(abs(ours[s] - ref[s]) / abs(ref[s]) for s in steps)


def _resumed_from(run: Run) -> list[int]:
    return [int(line.split("/checkpoints/")[1].split(" ")[0]) for line in run.lines() if "resumed from " in line]


@pytest.fixture(scope="module")
def assets(tiny_assets):
    """Tiny models, stand-in faces, the synthetic set and the reference face, built once per session
    (conftest.tiny_assets, which the other training and sampling modules read too): the runs get
    their paths (the setup hook would otherwise build them in every process of every run)."""
    return dict(tiny_assets)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp_runs")
    yield root
    print(f"\nmulti-process training runs: {', '.join(f'{k} {v:.0f} s' for k, v in WALL.items())}; "
          f"total {sum(WALL.values()):.0f} s")


@pytest.fixture(scope="module")
def straight(assets, runs) -> Run:
    """The uninterrupted 2-process run, sampling every 4 steps (samples take no part in training)."""
    return _run("straight_2x4", runs / "straight", assets, "sample.enabled=True", f"sample.every={EVERY}")


@pytest.fixture(scope="module")
def single(assets, runs) -> Run:
    """The same run on 1 process with 8 devices."""
    return _run("single_1x8", runs / "single", assets, processes=1, devices=8)


@pytest.mark.slow  # two training runs: 245 s + 94 s on 2 busy CPU cores (the 2-process one samples twice)
def test_two_processes_train_the_bf16_loss_history_of_one_process_within_1e5(straight, single):
    assert straight.code == exit_codes.OK, straight.output[-3000:]
    assert single.code == exit_codes.OK, single.output[-3000:]
    assert [s for s, _ in _losses(straight.workdir)] == [s for s, _ in _losses(single.workdir)] == \
        list(range(1, STEPS + 1))
    err = _max_rel_loss_err(dict(_losses(straight.workdir)), dict(_losses(single.workdir)), range(1, STEPS + 1))
    print(f"\nbf16 losses, 2x4 vs 1x8 devices: max relative difference per step {err:.2e}")
    assert err <= 1e-5


@pytest.mark.slow  # shares the 2-process run
def test_two_processes_sample_and_export_once_from_process_zero(straight):
    assert straight.code == exit_codes.OK, straight.output[-3000:]
    samples = straight.workdir / "samples"
    videos = sorted(p.name for p in samples.glob("*.mp4"))
    assert videos == [f"step_{s:06d}.mp4" for s in range(EVERY, STEPS + 1, EVERY)]
    assert all((samples / v).stat().st_size > 0 for v in videos)
    assert len(straight.lines("[p0] sample: ")) == len(videos) and not straight.lines("[p1] sample: ")
    assert not list(straight.workdir.glob("*.tmp")), "an export was left half-written"
    # the export holds every shard of the final params, gathered by Orbax from both processes
    from flax import nnx

    from mm_jax import checkpoint

    exported = checkpoint.load_component(straight.workdir / "adapter", "adapter", param_dtype="float32")
    ours = _flat(nnx.to_pure_dict(nnx.state(exported, nnx.Param)))
    final = {k.removeprefix("adapter/"): v for k, v in _saved_params(straight.workdir, STEPS).items()}
    assert ours.keys() == final.keys() and all(np.array_equal(ours[k], final[k]) for k in final)


@pytest.fixture(scope="module")
def interrupted(assets, runs) -> dict:
    """One 2-process run interrupted twice: a SIGTERM to the launcher once step 1 is logged (it must
    save the step the processes agree on and exit 75), a relaunch killed with kill -9 of process 1
    after its next checkpoint (the launch must fail), and a relaunch to the end."""
    workdir = runs / "interrupted"
    first = Launch("sigterm_2x4", workdir, assets)
    logged = first.wait_for_step(1)
    first.proc.send_signal(signal.SIGTERM)
    preempted = first.finish()
    saved_after_sigterm = _steps(workdir)
    losses_after_sigterm = _losses(workdir)

    second = Launch("kill9_2x4", workdir, assets)
    own = (max(saved_after_sigterm + [0]) // EVERY + 1) * EVERY  # its first periodic checkpoint
    second.wait_for_step(own + 1, checkpoint=own)  # past a complete checkpoint of its own
    second.child(1).kill()  # SIGKILL: no handler, no checkpoint
    killed = second.finish()
    complete_before_relaunch = _steps(workdir)
    resumed = _run("resume_2x4", workdir, assets)
    return dict(logged_before_sigterm=logged, preempted=preempted, saved_after_sigterm=saved_after_sigterm,
                losses_after_sigterm=losses_after_sigterm, killed=killed,
                complete_before_relaunch=complete_before_relaunch, resumed=resumed)


@pytest.mark.slow  # three partial 2-process runs: 97 s + 121 s + 116 s on 2 busy CPU cores
def test_sigterm_saves_the_agreed_step_exits_75_and_the_relaunch_ends_bit_identical(interrupted, straight):
    run = interrupted["preempted"]
    assert run.code == exit_codes.PREEMPTED, run.output[-3000:]
    stops = {line.split(" ")[0]: int(line.split("preempted at step ")[1].split(":")[0])
             for line in run.lines() if "preempted at step " in line}
    assert set(stops) == {"[p0]", "[p1]"} and len(set(stops.values())) == 1, stops  # both processes, one step
    step = stops["[p0]"]
    assert interrupted["saved_after_sigterm"][-1] == step >= interrupted["logged_before_sigterm"]  # 0 steps lost
    assert step < STEPS
    assert [s for s, _ in interrupted["losses_after_sigterm"]] == list(range(1, step + 1))  # logged up to it
    assert _resumed_from(interrupted["killed"]) == [step]
    _assert_bit_identical(interrupted["resumed"], straight)


@pytest.mark.slow  # shares the interrupted runs
def test_kill_9_of_one_process_fails_the_launch_and_a_relaunch_resumes_bit_identical(interrupted, straight):
    killed = interrupted["killed"]
    assert killed.code not in (exit_codes.OK, exit_codes.PREEMPTED), killed.output[-3000:]
    assert "[launch] process 1 exited 137" in killed.output  # 128 + SIGKILL, and the launcher stopped process 0
    latest = interrupted["complete_before_relaunch"][-1]
    assert latest > interrupted["saved_after_sigterm"][-1]  # the killed launch had written a checkpoint of its own
    assert _resumed_from(interrupted["resumed"]) == [latest]
    _assert_bit_identical(interrupted["resumed"], straight)


@pytest.mark.slow  # three runs: 42 s + 93 s + 131 s on 2 busy CPU cores
def test_checkpoints_move_between_one_and_two_processes_on_other_meshes_float32_within_1e5(assets, runs):
    """1 process x 8 devices (fsdp=8) writes step 4; 2 processes x 4 devices (data=2, fsdp=4) restore it
    and train to 8; 1 process x 4 devices (fsdp=4) restores that step 8 and trains to 12. Each
    continuation's losses equal the uninterrupted 1-process run's within 1e-5. Float32: another mesh
    sums in another order, which bfloat16 activations amplify (measured on 1x8 -> 1x4 in bf16: 1.4e-4)."""
    f32 = ("model.dtype=float32",)
    ref = _run("f32_1x8", runs / "f32", assets, *f32, "train.steps=12", processes=1, devices=8)
    assert ref.code == exit_codes.OK, ref.output[-3000:]
    workdir = runs / "f32_moved"
    shutil.copytree(ref.workdir, workdir, ignore=shutil.ignore_patterns("adapter", "tb"))
    for step in _steps(workdir):
        if step > EVERY:
            shutil.rmtree(workdir / "checkpoints" / str(step))
    up = _run("f32_restore_1x8_on_2x4", workdir, assets, *f32, "mesh=data=2,fsdp=4")
    up_history = _losses(workdir)  # steps 5-8 are up's (down keeps them: it resumes from 8)
    down = _run("f32_restore_2x4_on_1x4", workdir, assets, *f32, "train.steps=12", processes=1, devices=4)
    errs = {}
    for run, resumed, last, history in ((up, EVERY, STEPS, up_history), (down, STEPS, 12, _losses(workdir))):
        assert run.code == exit_codes.OK, run.output[-3000:]
        assert _resumed_from(run) == [resumed]
        assert [s for s, _ in history] == list(range(1, last + 1))
        errs[run.name] = _max_rel_loss_err(dict(history), dict(_losses(ref.workdir)), range(resumed + 1, last + 1))
    print(f"\nfloat32 losses after a restore on another mesh and process count, max relative difference: {errs}")
    assert all(e <= 1e-5 for e in errs.values()), errs


@pytest.mark.slow  # a 2-process run that builds the tiny assets: ~2 min on 2 cores
def test_a_preset_with_a_setup_hook_builds_its_assets_once_and_trains_on_two_processes(tmp_path):
    """The tiny/demo presets build their models and data in the workdir with the setup hook. On
    several processes the hook's Orbax writes of host-local arrays were refused (exit 2, "Cannot
    serialize host local jax.Array"); process 0 now builds them in a child process of its own and
    the others wait for it."""
    cmd = [sys.executable, "-m", "mm_jax.launch", "--processes", "2", "--devices-per-process", "2", "--",
           sys.executable, "-m", "mm_jax.train", "--config", "configs/video.py:tiny", "--workdir", str(tmp_path / "w"),
           "--no-progress", "--config.train.steps=2", "--config.compile_cache=off"]
    r = subprocess.run(cmd, cwd=ROOT, env=fake_devices_env(1), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [row["step"] for row in read_history(tmp_path / "w")] == [1, 2]
    assert (tmp_path / "w" / "tiny_models" / "backbone").is_dir() and (tmp_path / "w" / "adapter").is_dir()
