"""The planner's compile cache (``mm_jax.plan.cache``): a second identical ``python -m mm_jax.plan``
run reads every phase from the cache, says so per phase, reports the same numbers and spends a small
part of the first run's XLA compile time; and why it is the planner's own cache, not JAX's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mm_jax import checkpoint
from mm_jax.demo.tiny_checkpoint import SCHEDULER
from mm_jax.models.clip_vision import CLIPVisionConfig
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.t5 import T5Config
from mm_jax.models.vae import VAEConfig
from mm_jax.plan import targets
from mm_jax.training.models import adapter_config

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

SAME = ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "peak_bytes", "flops", "xla_flops",
        "kernel_flops", "collectives", "kernels", "uncounted")


def _configs(root):
    """Folders holding only what the planner reads of a checkpoint: the tiny models' configs."""
    dit = DiTConfig(num_attention_heads=2, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=2,
                    patch_size=2, text_embed_dim=128, time_embed_dim=128, sample_width=8, sample_height=8,
                    sample_frames=9)
    comps = {"transformer": dit,
             "vae": VAEConfig(latent_channels=16, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                              norm_num_groups=4, sample_height=64, sample_width=64),
             "text_encoder": T5Config(vocab_size=256, d_model=128, d_kv=1, num_heads=128, d_ff=256, num_layers=2)}
    extra = {"image_encoder": CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4)}
    extra["adapter"] = adapter_config(dit, 32, dict(width=32, depth=1, heads=2, head_dim=16, num_face_tokens=4,
                                                    num_id_tokens=2, id_mlp_hidden=32), "float32")
    backbone, adapter = root / "backbone", root / "adapter"
    for folder, group in ((backbone, comps), (adapter, extra)):
        for name, cfg in group.items():
            (folder / name).mkdir(parents=True)
            (folder / name / "config.json").write_text(json.dumps(cfg.to_dict()))
        checkpoint.write_index(folder, list(group))
    (backbone / "scheduler").mkdir()
    (backbone / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return backbone, adapter


def _plan(tmp_path, backbone, adapter, i):
    out = tmp_path / f"plan{i}.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "mm_jax.plan", "--checkpoint", str(backbone), "--adapter", str(adapter),
                        "--target", "v5e-1", "--workload", "sample", "--phases", "denoise,vae_decode", "--frames", "9",
                        "--height", "128", "--width", "128", "--steps", "2", "--compile-cache", str(tmp_path / "cc"),
                        "--json", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


@pytest.mark.slow  # two planner processes for a TPU target: ~40 s on 2 cores
def test_a_second_identical_plan_reads_every_phase_from_the_compile_cache(tmp_path):
    backbone, adapter = _configs(tmp_path)
    (first, _), (second, text) = _plan(tmp_path, backbone, adapter, 0), _plan(tmp_path, backbone, adapter, 1)
    assert first["compile_cache"] == second["compile_cache"] == str(tmp_path / "cc")
    assert [p["cache_hit"] for p in first["phases"]] == [False, False]
    assert [p["cache_hit"] for p in second["phases"]] == [True, True]
    for a, b in zip(first["phases"], second["phases"]):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, a["name"]
        assert b["xla_compile_seconds"] < 0.1 * a["xla_compile_seconds"], (a["name"], a, b)
    assert sum(p["compile_seconds"] for p in second["phases"]) < sum(p["compile_seconds"] for p in first["phases"])
    assert " hit" in text and "cache: " + str(tmp_path / "cc") in text
