"""``--profile DIR`` on the sample and train CLIs: one trace per process under DIR/process_K,
whose ops carry the DiT blocks' named scope (``mm_jax.profiling``)."""
from pathlib import Path

import pytest

from mm_jax import profiling

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--quiet"]


def _trace(folder: Path) -> bytes:
    """The one trace of process 0 under ``folder`` (jax.profiler's layout)."""
    [path] = sorted(Path(folder).glob("process_0/plugins/profile/*/*.xplane.pb"))
    return path.read_bytes()


@pytest.mark.slow  # one 2-step sample of the tiny checkpoint (over 30 s on a loaded 2-core machine)
def test_sample_profile_writes_a_trace_naming_the_blocks_and_stages_and_refuses_a_file(tiny_assets, tmp_path, capsys):
    from mm_jax import sample

    common = ["--checkpoint", tiny_assets["model.checkpoint"], "--prompt", "a man is walking", *SMALL]
    (tmp_path / "file").write_text("")
    assert sample.main([*common, "--out", str(tmp_path / "no.npy"), "--profile", str(tmp_path / "file")]) == 2
    assert "--profile" in capsys.readouterr().err and not (tmp_path / "no.npy").exists()
    assert sample.main([*common, "--out", str(tmp_path / "v.npy"), "--profile", str(tmp_path / "prof")]) == 0
    trace = _trace(tmp_path / "prof")
    for name in (profiling.BLOCK_SCOPE, "text_encoder", "denoise", "vae_decode"):  # ops and host spans
        assert name.encode() in trace, name
    assert (tmp_path / "v.npy").exists()


@pytest.mark.slow  # 3 steps on the tiny training assets
def test_train_profile_traces_the_steps_after_the_first(tiny_assets, tmp_path, capsys):
    from mm_jax import train

    over = [f"--config.{k}={tiny_assets[k]}" for k in ("model.checkpoint", "model.adapter", "data.face_models",
                                                      "data.path")]
    argv = ["--config", "configs/video.py:tiny", *over, "--config.train.steps=3", "--config.train.profile_steps=1",
            "--config.sample.enabled=False", "--no-progress", "--workdir", str(tmp_path / "run"),
            "--profile", str(tmp_path / "prof")]
    assert train.main(argv) == 0, capsys.readouterr().err
    trace = _trace(tmp_path / "prof")
    assert profiling.BLOCK_SCOPE.encode() in trace and b"step_num" in trace  # a StepTraceAnnotation
