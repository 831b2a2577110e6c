"""python -m mm_jax.plan: the JSON other scripts read, the README table written between its markers,
bad input refused by name with exit 2 before anything compiles, settings from a training config,
a phase that fails to compile reported with exit 1; on tiny checkpoint folders holding only the
models' configs. The module's runs share one planner compile cache (``mm_jax.plan.cache``): a phase
an earlier test compiled (the v5e-1 text encoder) is read back, with the same numbers
(tests/test_plan_cache.py), instead of compiled again. (The denoising step is compiled again: its
second lowering in a process carries 4 more loop arguments, so its key differs.)"""
from __future__ import annotations

import json

import pytest

from mm_jax import checkpoint
from mm_jax.demo.tiny_checkpoint import SCHEDULER
from mm_jax.plan import __main__ as cli
from mm_jax.plan import report, targets
from tests.tiny_plan import tiny_models

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")


# -- the CLI ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Checkpoint folders of the tiny models holding only what the planner reads (the configs), and
    the module's planner compile cache folder."""
    root = tmp_path_factory.mktemp("plan_ckpt")
    m = tiny_models()
    backbone, adapter = root / "backbone", root / "adapter"
    for folder, comps in ((backbone, {"transformer": m.transformer, "vae": m.vae, "text_encoder": m.text_encoder}),
                          (adapter, {"image_encoder": m.image_encoder, "adapter": m.adapter})):
        for name, cfg in comps.items():
            (folder / name).mkdir(parents=True)
            (folder / name / "config.json").write_text(json.dumps(cfg.to_dict()))
        checkpoint.write_index(folder, list(comps))
    (backbone / "scheduler").mkdir()
    (backbone / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return backbone, adapter, root / "plan_cache"


def _cli(tiny_ckpt, *args):
    backbone, adapter, cache = tiny_ckpt
    return cli.main(["--checkpoint", str(backbone), "--adapter", str(adapter), "--frames", "9", "--height", "64",
                     "--width", "64", "--steps", "4", "--compile-cache", str(cache), *args])


def test_cli_json_has_the_fields_other_scripts_read(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _cli(tiny_ckpt, "--target", "v5e-1", "--workload", "sample", "--phases", "text_encoder,denoise",
                "--json", str(out)) == 0
    data = json.loads(out.read_text())
    assert {"target", "workload", "mesh", "phases"} <= set(data) and data["target"] == "v5e-1"
    assert [p["name"] for p in data["phases"]] == ["text_encoder", "denoise"]
    for p in data["phases"]:
        assert {"name", "argument_bytes", "temp_bytes", "output_bytes", "peak_bytes", "hbm_bytes", "fits", "flops",
                "ideal_seconds", "compile_seconds", "collectives"} <= set(p)
        assert p["fits"] is True and p["peak_bytes"] > 0 and p["compile_seconds"] > 0
    assert data["phases"][1]["runs"] == 4
    text = capsys.readouterr().out
    assert "denoise" in text and "ideal time per video" in text


def test_cli_table_writes_the_readme_table_between_its_markers(tiny_ckpt, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.TABLE_START}\nold\n{report.TABLE_END}\n\nafter\n")
    assert _cli(tiny_ckpt, "--table", str(readme), "--target", "v5e-1", "--workload", "sample",
                "--phases", "denoise") == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("\n\nafter\n")
    assert "| target | workload | mesh | phase |" in text
    row = next(line for line in text.splitlines() if line.startswith("| v5e-1 | sample |"))
    assert "| data=1,fsdp=1,context=1,tensor=1 | denoise | " in row and " ✓ (15.20) | " in row
    assert row.count(" per video |") == 1 and "(4) |" in row  # 4 denoising steps in the tiny config


@pytest.mark.parametrize("args,message", [
    (["--target", "v9-1", "--workload", "sample"], "unknown target 'v9-1'; known targets: v5e-1, v5e-4"),
    (["--target", "v5e-4", "--workload", "sample", "--mesh", "fsdp=2,tensor=4"],
     "mesh 'fsdp=2,tensor=4' (data=1,fsdp=2,context=1,tensor=4) has 8 devices but target v5e-4 has 4"),
    (["--target", "v5e-1", "--workload", "sample", "--frames", "13"],
     "frames=13: not a frame count the VAE encodes and decodes exactly"),
    (["--target", "v5e-1", "--workload", "sample", "--batch", "2"], "the sampler makes one video at a time"),
    (["--target", "v5e-1", "--workload", "train", ], "unknown workload 'train'"),
    (["--target", "v5e-1", "--workload", "sample", "--dit", "nope=1"], "the DiT config has no field 'nope'; fields:"),
    (["--target", "v5e-1", "--workload", "train-video", "--config", "configs/image.py:tiny"],
     "--config is a image-stage config (data.stage='image') but the workload is train-video"),
])
def test_cli_refuses_bad_input_by_name_with_exit_2(tiny_ckpt, args, message, capsys):
    assert _cli(tiny_ckpt, *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--target", "v5e-4", "--mesh-dcn", "pipe=2"], "mesh spec 'pipe=2': unknown axis 'pipe'"),
    (["--target", "v5e-4", "--mesh", "fsdp=8", "--mesh-dcn", "data=2"],
     "mesh 'fsdp=8' (data=1,fsdp=8,context=1,tensor=1) has 8 devices but target v5e-4 has 4 per slice"),
    (["--target", "h100x8", "--mesh-dcn", "data=2"], "target h100x8: multi-slice (DCN) plans are for TPU targets"),
])
def test_cli_refuses_a_multi_slice_plan_it_cannot_make_with_exit_2(tiny_ckpt, args, message, capsys):
    assert _cli(tiny_ckpt, *args, "--workload", "sample") == 2
    assert message in capsys.readouterr().err


def test_cli_takes_the_train_step_settings_from_a_training_config(tiny_ckpt, tmp_path):
    out = tmp_path / "plan.json"
    assert _cli(tiny_ckpt, "--target", "v5e-1", "--workload", "train-video", "--config", "configs/video.py:tiny",
                "--config.train.global_batch_size=4", "--precomputed", "all", "--json", str(out)) == 0
    data = json.loads(out.read_text())
    s = data["settings"]  # the tiny preset's remat and dtype, the override's batch, the flags' sizes
    assert (s["batch"], s["remat"], s["dtype"], s["frames"], s["precomputed"]) == (4, "none", "float32", 9, "all")
    assert data["unit"] == "training step" and data["phases"][0]["name"] == "train_step"
    assert data["phases"][0]["alias_bytes"] > 0


def test_cli_names_the_extra_when_the_cuda_plugin_is_missing(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(targets, "cuda_plugin_installed", lambda: False)
    assert _cli(tiny_ckpt, "--target", "h100x8", "--workload", "sample") == 2
    assert 'needs the CUDA plugin: pip install -e ".[cuda12]"' in capsys.readouterr().err


def test_cli_help_shows_the_defaults():
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_a_phase_that_fails_to_compile_is_reported_and_the_cli_exits_1(tiny_ckpt, monkeypatch, capsys):
    from mm_jax import pipeline

    def broken(*a, **k):
        raise RuntimeError("Bias must have same seq length as QKV (stand-in)")

    monkeypatch.setattr(pipeline, "decode_fn", broken)
    assert _cli(tiny_ckpt, "--target", "v5e-1", "--workload", "sample", "--phases", "text_encoder,vae_decode") == 1
    out = capsys.readouterr().out
    assert "vae_decode    FAILED: RuntimeError: Bias must have same seq length" in out
    assert "text_encoder " in out and "FAILED" not in out.split("vae_decode")[0]
