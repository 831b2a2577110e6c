"""End to end: ``from_torch.py --components all`` on a tiny ``CogVideoXImageToVideoPipeline`` folder,
then ``mm_jax.sample --image``, equals diffusers' pipeline given the same initial noise and the same
posterior draw for the image latents; and the I2V sampler's bad input exits 2 with nothing written."""
import json
import shutil

import numpy as np
import pytest
import torch

from mm_jax import sample
from tests.tiny_i2v_pipeline import make_i2v_pipeline
from tools.convert_weights import from_torch

PROMPT = "a man is walking on the beach at sunset"
SIZE = ["--frames", "9", "--height", "64", "--width", "64"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("i2v")
    pipe = make_i2v_pipeline(root / "src")
    assert from_torch.main(["--src", str(root / "src"), "--dst", str(root / "ckpt"), "--components", "all"]) == 0
    rng = np.random.default_rng(0)  # a smooth image at the output size, so no resize happens on either side
    img = np.clip(128 + np.cumsum(rng.normal(0, 12, (64, 64, 3)), axis=1), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(root / "first.png")
    lat = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # (B, F, C, H, W)
    np.save(root / "latents.npy", lat.permute(0, 1, 3, 4, 2).numpy())  # ours: (1, F, H, W, C)
    # the posterior draw diffusers makes first from its generator: (B, C, 1, h, w) from seed 7
    eps = torch.randn(1, 4, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    np.save(root / "image_noise.npy", eps.permute(0, 2, 3, 4, 1).numpy())  # ours: (1, 1, h, w, C)
    return pipe, root, lat


@pytest.mark.slow
def test_image_to_video_cli_frames_match_diffusers_pipeline(tiny):
    from PIL import Image

    pipe, root, lat = tiny
    out = root / "video.npy"
    args = ["--checkpoint", str(root / "ckpt"), "--image", str(root / "first.png"), "--prompt", PROMPT, *SIZE,
            "--steps", "4", "--guidance", "6", "--latents", str(root / "latents.npy"),
            "--image-noise", str(root / "image_noise.npy"), "--save-latents", str(root / "final.npy"),
            "--out", str(out), "--quiet"]
    assert sample.main(args) == 0
    ours = np.load(out)
    with torch.no_grad():
        res = pipe(image=Image.open(root / "first.png"), prompt=PROMPT, num_frames=9, height=64, width=64,
                   num_inference_steps=4, guidance_scale=6.0, latents=lat.clone(),
                   generator=torch.Generator().manual_seed(7), output_type="np")
        ref = res.frames[0]
    assert ours.shape == ref.shape == (9, 64, 64, 3)
    assert 0.2 < np.mean((ref > 0) & (ref < 1))  # not a saturated comparison
    err = np.max(np.abs(ours - ref))
    print(f"max abs frame error vs diffusers: {err:.3g}")
    assert err <= 1e-4
    meta = json.loads((root / "video.npy.json").read_text())
    assert meta["image"] == str(root / "first.png") and meta["image_noise"] == str(root / "image_noise.npy")


def _t2v_copy(root, tmp_path):
    """The converted checkpoint with a text-to-video transformer config (in_channels = latent channels)."""
    ckpt = tmp_path / "t2v"
    shutil.copytree(root / "ckpt", ckpt)
    cfg_path = ckpt / "transformer" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(in_channels=4, use_learned_positional_embeddings=False)
    cfg_path.write_text(json.dumps(cfg))
    return ckpt


@pytest.mark.parametrize("change,message", [
    (["--image", "MISSING"], "image MISSING not found"),
    (["--image", "NOT_AN_IMAGE"], "cannot read"),
    ([], "is image-to-video (transformer in_channels 8 = 2 x the VAE's latent channels): give the first frame"),
    (["--image", "FIRST", "T2V"], "is text-to-video (transformer in_channels 4"),
    (["--image", "FIRST", "--height", "48"], "latent height x width 6 x 8: this transformer's learned positional table"),
    (["--image", "FIRST", "--image-noise", "WRONG"], "image noise has shape (1, 1, 8, 8, 3); these settings need (1, 1, 8, 8, 4)"),
    (["--image", "FIRST", "--latents", "WRONG"], "initial latents have shape (1, 1, 8, 8, 3); these settings need (1, 3, 8, 8, 4)"),
    (["--image-noise", "WRONG"], "--image-noise needs --image"),
    (["--image", "FIRST", "--adapter", "x"], "does not combine with --prompts/--adapter/--ref/--id"),
])
def test_image_to_video_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys, change, message):
    _, root, _ = tiny
    ckpt = _t2v_copy(root, tmp_path) if "T2V" in change else root / "ckpt"
    (tmp_path / "bad.png").write_text("not an image")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 1, 8, 8, 3), np.float32))
    subst = {"MISSING": str(tmp_path / "nope.png"), "NOT_AN_IMAGE": str(tmp_path / "bad.png"),
             "FIRST": str(root / "first.png"), "WRONG": str(tmp_path / "wrong.npy")}
    change = [subst.get(c, c) for c in change if c != "T2V"]
    message = message.replace("MISSING", subst["MISSING"])
    out = tmp_path / "v.mp4"
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, *SIZE, "--steps", "2", "--out", str(out), "--quiet",
            *change]  # a later --height wins
    assert sample.main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.json"))
