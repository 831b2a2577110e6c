"""Every CLI refuses a bad flag or value with a message that names it, exit code 2, and writes nothing;
every CLI's --help shows the defaults.

Each case runs the CLI's ``main`` in-process from an empty working directory with every output
path inside it, then checks the exit code, that stderr names the flag or field, and that the
directory is still empty.
"""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _main(cli: str):
    if cli == "from_torch":
        from tools.convert_weights import from_torch

        return from_torch.main
    if cli in ("mm_jax.demo", "mm_jax.plan"):  # packages: their CLI is __main__
        import importlib

        return importlib.import_module(cli + ".__main__").main
    import importlib

    return importlib.import_module(cli).main


def _run(cli: str, argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = _main(cli)(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    return code, err.getvalue()


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    from mm_jax.demo.standin_faces import make_pack

    return make_pack(tmp_path_factory.mktemp("pack"))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from mm_jax.demo.tiny_checkpoint import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    out = tmp_path / "cwd"
    out.mkdir()
    monkeypatch.chdir(out)
    return out


DEMO = str(ROOT / "configs" / "video.py") + ":demo"
TRAIN = [
    (["--config.train.steps=abc"], "--config.train.steps=abc"),
    (["--config.train.steps=1.5"], "--config.train.steps=1.5"),
    (["--config.train.nope=1"], "no field 'nope'"),
    (["--config.data.frames=13"], "data.frames=13: not a frame count the VAE encodes and decodes exactly"),
    (["--config.data.frames=8"], "data.frames=8"),
    (["--config.sample.frames=5"], "sample.frames=5"),
    (["--config.train.global_batch_size=0"], "train.global_batch_size=0"),
    (["--config.mesh=rows=2"], "unknown axis 'rows'"),
    (["--config.optimizer.lr=-1.0"], "optimizer.lr=-1.0"),
    (["--config.setup=mm_jax.nope:prepare"], "setup='mm_jax.nope:prepare'"),
    (["--steps", "10"], "unrecognized arguments: --steps"),
    (["--config.data.path=missing"], "data.path=missing: no such dataset folder"),  # before the demo builds its assets
]


@pytest.mark.parametrize("extra,message", TRAIN)
def test_train_refuses_bad_flags_and_values_by_name_and_writes_nothing(extra, message, empty_cwd):
    code, err = _run("mm_jax.train", ["--config", DEMO, "--workdir", "run", "--no-progress", *extra])
    assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


@pytest.mark.parametrize("target,extra,message", [
    ("v5e-1", ["--config.train.steps=abc"], "--config.train.steps=abc"),
    ("v5e-1", ["--config.train.nope=1"], "no field 'nope'"),
    ("v9-1", [], "v9-1"),
    ("v5e-1", ["--mesh", "rows=2"], "unknown axis 'rows'"),
])
def test_plan_refuses_bad_overrides_and_values_by_name_and_writes_nothing(target, extra, message, empty_cwd):
    code, err = _run("mm_jax.plan", ["--target", target, "--workload", "train-video", "--config",
                                     str(ROOT / "configs" / "video.py") + ":tiny", "--json", "plan.json", *extra])
    assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


def test_train_names_a_missing_config_file_and_preset(empty_cwd):
    for spec, message in (("nope.py", "'nope.py' is not a config file"),
                          (str(ROOT / "configs" / "video.py") + ":big", "unknown preset 'big'")):
        code, err = _run("mm_jax.train", ["--config", spec, "--workdir", "run"])
        assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


SAMPLE = [
    (["--frames", "5"], "frames=5: not a frame count the VAE encodes and decodes exactly (its 2 latent frames "
                        "decode to 8 frames); valid: 1, 9, 17, 25, 33, 41, 49"),
    (["--frames", "13"], "frames=13"),
    (["--frames", "abc"], "argument --frames: invalid int value: 'abc'"),
    (["--steps", "0"], "steps=0: must be >= 1"),
    (["--height", "100"], "height=100"),
    (["--fps", "0"], "--fps 0"),
    (["--out", "video.avi"], "--out video.avi: unsupported output type"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--mesh", "rows=2"], "unknown axis 'rows'"),
    (["--ref", "face.png"], "--ref / --id need --adapter"),
]


@pytest.mark.parametrize("extra,message", SAMPLE)
def test_sample_refuses_bad_flags_and_values_by_name_and_writes_nothing(extra, message, empty_cwd, ckpt):
    argv = ["--checkpoint", str(ckpt), "--prompt", "a man is walking", "--out", "v.mp4", "--frames", "9",
            "--height", "64", "--width", "64", "--quiet"]
    code, err = _run("mm_jax.sample", argv + extra)
    assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


def test_sample_names_a_folder_that_is_not_a_checkpoint(empty_cwd):
    code, err = _run("mm_jax.sample", ["--checkpoint", "nope", "--prompt", "a man", "--out", "v.mp4"])
    assert code == 2 and "nope is not an mm_jax checkpoint folder" in err
    assert not list(empty_cwd.iterdir())


# A sampler whose denoising fails at its ``fail_at``-th call (counted over the run), run as
# ``python -m mm_jax.sample`` would be: the exception's traceback and exit code are the interpreter's.
FLAKY_SAMPLE = """
import runpy, sys
from mm_jax import pipeline
real, calls = pipeline.denoise, []
def flaky(*a, **k):
    calls.append(1)
    if len(calls) >= {fail_at}:
        raise ValueError("injected failure in denoising call %d" % len(calls))
    return real(*a, **k)
pipeline.denoise = flaky
sys.argv = ["mm_jax.sample"] + {argv!r}
runpy.run_module("mm_jax.sample", run_name="__main__")
"""


def _flaky_sample(argv, fail_at, cwd):
    import subprocess

    from tests.conftest import fake_devices_env

    code = FLAKY_SAMPLE.format(fail_at=fail_at, argv=[str(a) for a in argv])
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=dict(fake_devices_env(1), PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=600)


SMALL = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--quiet"]


def test_sample_failure_during_generation_exits_1_with_its_traceback(ckpt, empty_cwd):
    """A ValueError raised once the work has started is a crash, not refused input: exit 1 and the
    traceback, no "error:" line of a refusal, and no video."""
    proc = _flaky_sample(["--checkpoint", ckpt, "--prompt", "a man is walking", "--out", "v.npy", *SMALL], 1, empty_cwd)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback (most recent call last)" in proc.stderr and "injected failure in denoising call 1" in proc.stderr
    assert "\nerror: " not in proc.stderr
    assert not (empty_cwd / "v.npy").exists()


def test_sample_prompts_keeps_the_videos_written_before_a_failure(ckpt, empty_cwd):
    """--prompts writes each video as soon as its batch is decoded: when the 2nd batch fails, the
    1st video and its sidecar are already on disk; the run exits 1 with the traceback."""
    import json

    (empty_cwd / "p.jsonl").write_text("\n".join(json.dumps({"prompt": f"a man number {i}", "out": f"v{i}.npy"})
                                                  for i in range(2)) + "\n")
    proc = _flaky_sample(["--checkpoint", ckpt, "--prompts", "p.jsonl", "--videos-per-batch", "1", *SMALL], 2,
                         empty_cwd)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "wrote v0.npy (line 1)" in proc.stderr and "injected failure in denoising call 2" in proc.stderr
    assert np.load(empty_cwd / "v0.npy").shape == (9, 64, 64, 3)
    assert json.loads((empty_cwd / "v0.npy.json").read_text())["line"] == 1
    assert not (empty_cwd / "v1.npy").exists()


DEMO_CLI = [
    (["--frames", "5"], "frames=5: not a frame count"),
    (["--steps", "0"], "steps=0"),
    (["--steps", "x"], "argument --steps: invalid int value: 'x'"),
    (["--out", "demo.avi"], "--out demo.avi"),
]


@pytest.mark.parametrize("extra,message", DEMO_CLI)
def test_demo_refuses_bad_values_before_building_its_checkpoint(extra, message, empty_cwd):
    code, err = _run("mm_jax.demo", ["--workdir", "runs/demo", *extra])
    assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


BUILD = [
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--shard-size", "0"], "--shard-size 0: must be >= 1"),
    (["--max-frames", "0"], "--max-frames 0: must be >= 1"),
    (["--min-similarity", "2"], "--min-similarity 2.0: must be in [-1, 1]"),
    (["--jpeg-quality", "0"], "--jpeg-quality 0: must be in [1, 100]"),
    (["--det-size", "100"], "--det-size 100: must be a positive multiple of 32"),
    (["--max-frames", "many"], "argument --max-frames: invalid int value: 'many'"),
    (["--precompute", "--checkpoint", "ckpt", "--frames", "13"], "--frames=13: not a frame count"),
    (["--precompute"], "--precompute needs --checkpoint"),
]


@pytest.mark.parametrize("extra,message", BUILD)
def test_dataset_build_refuses_bad_values_by_name_and_writes_nothing(extra, message, empty_cwd, pack, tmp_path):
    from mm_jax.demo.synthetic import make_demo_source

    src = make_demo_source(tmp_path / "src", num_clips=1, frames=9)
    code, err = _run("mm_jax.data.build", ["--src", str(src), "--out", "out", "--face-models", str(pack), *extra])
    assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


EVALUATE = [
    (["--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["--batch-size", "big"], "argument --batch-size: invalid int value: 'big'"),
    (["--det-thresh", "2"], "det_thresh=2.0"),
]


@pytest.mark.parametrize("extra,message", EVALUATE)
def test_evaluate_refuses_bad_values_by_name_and_writes_nothing(extra, message, empty_cwd, pack, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    from mm_jax.demo.standin_faces import face_image

    (tmp_path / "videos").mkdir()
    (tmp_path / "refs").mkdir()
    np.save(tmp_path / "videos" / "a.npy", np.stack([face_image()] * 2).astype(np.float32) / 255)
    iio.imwrite(tmp_path / "refs" / "a.png", face_image())
    code, err = _run("mm_jax.evaluate", ["--videos", str(tmp_path / "videos"), "--refs", str(tmp_path / "refs"),
                                         "--face-models", str(pack), "--out", "report.json", "--quiet", *extra])
    assert code == 2 and message in err, err
    assert not list(empty_cwd.iterdir())


def test_converter_refuses_bad_values_by_name_and_writes_nothing(empty_cwd, tmp_path):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    for extra, message in ((["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
                           (["--src", "missing"], "--src missing: not a folder"),
                           (["--src", str(tmp_path)], "neither a pipeline folder"),
                           (["--src", str(tmp_path / "pipe"), "--components", "nope"], "nope"),
                           ([], "--src and --dst are required")):
        argv = ["--dst", "ckpt"] + (extra if "--src" in extra or not extra else ["--src", str(tmp_path / "pipe"), *extra])
        code, err = _run("from_torch", argv)
        assert code == 2 and message in err, (extra, err)
    assert not list(empty_cwd.iterdir())


@pytest.mark.parametrize("cli", ["mm_jax.train", "mm_jax.sample", "mm_jax.evaluate", "mm_jax.data.build",
                                 "mm_jax.data.prepare", "mm_jax.plan", "mm_jax.demo", "from_torch"])
def test_every_cli_help_shows_the_defaults(cli):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        _main(cli)(["--help"])
    assert e.value.code == 0 and "(default:" in out.getvalue()
