"""End to end: our sampler CLI on a converted tiny CogVideoXPipeline equals diffusers' pipeline."""
import json

import numpy as np
import pytest
import torch

from mm_jax import sample
from tests.tiny_pipeline import make_pipeline
from tools.convert_weights.from_torch import convert

PROMPT = "a man is walking on the beach at sunset"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    pipe = make_pipeline(root / "src")
    ckpt = convert(root / "src", root / "ckpt")  # every component of the pipeline folder
    lat = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, F, C, H, W)
    np.save(root / "latents.npy", lat.permute(0, 1, 3, 4, 2).numpy())  # ours: (1, F, H, W, C)
    return pipe, ckpt, lat, root


@pytest.mark.parametrize("dynamic", [False, True])
def test_cli_frames_match_diffusers_pipeline(tiny, dynamic):
    pipe, ckpt, lat, root = tiny
    out = root / f"video_{dynamic}.npy"
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
            "--steps", "4", "--guidance", "6", "--scheduler", "ddim", "--latents", str(root / "latents.npy"),
            "--out", str(out), "--quiet"] + (["--dynamic-cfg"] if dynamic else [])
    assert sample.main(args) == 0
    ours = np.load(out)
    with torch.no_grad():
        ref = pipe(prompt=PROMPT, num_frames=9, height=64, width=64, num_inference_steps=4, guidance_scale=6.0,
                   use_dynamic_cfg=dynamic, latents=lat.clone(), output_type="np").frames[0]
    assert ours.shape == ref.shape == (9, 64, 64, 3)
    assert 0.2 < np.mean((ref > 0) & (ref < 1))  # not a saturated comparison
    assert np.max(np.abs(ours - ref)) <= 1e-4
    meta = json.loads((root / f"video_{dynamic}.npy.json").read_text())
    assert meta["seed"] == 0 and meta["dynamic_cfg"] is dynamic and meta["steps"] == 4


def test_cli_dpm_frames_match_diffusers_pipeline_given_the_same_draws(tiny, monkeypatch):
    """The pipeline's DPM branch against diffusers' pipeline with CogVideoXDPMScheduler: diffusers'
    ``randn_tensor`` returns our own draws (``schedulers.dpm_noise(key(seed), step)``) in the order
    the reference asks for them (one on the first and last step, two on the others)."""
    import diffusers.schedulers.scheduling_dpm_cogvideox as dpm_mod
    import jax
    from diffusers import CogVideoXDPMScheduler

    from mm_jax import schedulers as sch

    pipe, ckpt, lat, root = tiny
    steps, seed = 4, 3
    key = jax.random.key(seed)
    shape = tuple(lat.permute(0, 1, 3, 4, 2).shape)
    draws = []
    for i in range(steps):
        n1, n2 = (torch.from_numpy(np.array(d)).permute(0, 1, 4, 2, 3) for d in sch.dpm_noise(key, i, shape))
        draws += [n1] if i in (0, steps - 1) else [n1, n2]
    monkeypatch.setattr(dpm_mod, "randn_tensor", lambda *a, **k: draws.pop(0))
    out = root / "dpm.npy"
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
            "--steps", str(steps), "--guidance", "6", "--scheduler", "dpm", "--seed", str(seed),
            "--latents", str(root / "latents.npy"), "--out", str(out), "--quiet"]
    assert sample.main(args) == 0
    ours = np.load(out)
    old = pipe.scheduler
    pipe.scheduler = CogVideoXDPMScheduler.from_config(old.config)
    try:
        with torch.no_grad():
            ref = pipe(prompt=PROMPT, num_frames=9, height=64, width=64, num_inference_steps=steps, guidance_scale=6.0,
                       latents=lat.clone(), output_type="np").frames[0]
    finally:
        pipe.scheduler = old
    assert not draws  # the reference used every draw: as many as our steps made
    assert 0.2 < np.mean((ref > 0) & (ref < 1))
    assert np.max(np.abs(ours - ref)) <= 1e-4


@pytest.mark.parametrize("change,message", [
    (["--frames", "10"], "frames=10: not a frame count the VAE encodes and decodes exactly"),
    (["--frames", "13"], "frames=13: not a frame count the VAE encodes and decodes exactly (its 4 latent frames "
                         "decode to 16 frames); valid: 1, 9, 17"),
    (["--height", "72"], "height=72: must be a positive multiple of 16"),
    (["--latents", "WRONG"], "initial latents have shape"),
    (["--latents", "MISSING"], "cannot read"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys, change, message):
    _, ckpt, _, root = tiny
    if "WRONG" in change:
        np.save(tmp_path / "wrong.npy", np.zeros((1, 3, 8, 8, 5), np.float32))
        change = ["--latents", str(tmp_path / "wrong.npy")]
    if "MISSING" in change:
        change = ["--latents", str(tmp_path / "nope.npy")]
    out = tmp_path / "v.mp4"
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
            "--steps", "2", "--out", str(out), "--quiet"] + change
    assert sample.main(args) == 2
    assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_cli_names_a_missing_component(tiny, tmp_path, capsys):
    import shutil

    _, ckpt, _, _ = tiny
    broken = tmp_path / "ckpt"
    shutil.copytree(ckpt, broken)
    shutil.rmtree(broken / "vae")
    assert sample.main(["--checkpoint", str(broken), "--prompt", PROMPT, "--out", str(tmp_path / "v.mp4")]) == 2
    assert "lacks component(s) ['vae']" in capsys.readouterr().err


def test_library_sampling_computes_in_bfloat16_on_accelerators_unless_told(monkeypatch):
    """generate, generate_batch, iter_videos and prompt_embeddings default to dtype None, which is
    default_dtype(): bfloat16 on a GPU or TPU (float32 would hold the 5B's 22 GB of weights and run
    attention without cuDNN), float32 on CPU."""
    import inspect

    import jax

    from mm_jax import pipeline

    for fn in (pipeline.generate, pipeline.generate_batch, pipeline.iter_videos, pipeline.prompt_embeddings,
               pipeline.sample_identity):
        assert inspect.signature(fn).parameters["dtype"].default is None, fn.__name__
    for backend, want in (("gpu", "bfloat16"), ("tpu", "bfloat16"), ("cpu", "float32")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert pipeline.default_dtype() == want
