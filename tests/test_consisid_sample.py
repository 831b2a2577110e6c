"""``python -m mm_jax.sample --model consisid`` end to end on a tiny random ``ConsisIDPipeline`` folder
converted by ``from_torch.py --components all`` and the tiny face folder (``tests.tiny_consisid_faces``):
the frames equal diffusers' pipeline given the same identity, initial noise and posterior draw;
``--save-id`` / ``--id``, several devices, ``--prompts`` batches and bad input.

One 1-device run from a photo (``single``: ``--ref``, ``--save-id``) is shared: the parity test gives
diffusers the identity it saved, the others compare with it. Its ``--latents`` / ``--image-noise``
are the draws the sampler makes from ``--seed 0`` when none is given (``jax.random.key(0)``,
``image_noise_key(0)``), so a ``--prompts`` line with seed 0 and no noise files gives the same video.
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from mm_jax import consisid_identity, sample
from mm_jax import image_conditioning as ic
from mm_jax import schedulers as sch
from tests.conftest import fake_devices_env
from tests.tiny_consisid_pipeline import make_consisid_pipeline, random_identity
from tools.convert_weights import from_torch

PROMPT = "a man is walking on the beach at sunset"
SIZE = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "3", "--guidance", "6", "--dynamic-cfg"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image

    from mm_jax.demo.standin_faces import face_image
    from tests.tiny_consisid_faces import make_face_folder

    root = tmp_path_factory.mktemp("consisid")
    pipe = make_consisid_pipeline(root / "src")
    assert from_torch.main(["--src", str(root / "src"), "--dst", str(root / "ckpt"), "--components", "all"]) == 0
    make_face_folder(root / "faces")
    for i, at in enumerate([(96, 160), (120, 200)]):  # the stand-in SCRFD's bright square; RetinaFace's central face
        Image.fromarray(face_image(at=at, size=6, seed=i)).save(root / f"ref{i}.png")
    np.savez(root / "a.npz", **random_identity(0))
    lat = np.asarray(sch.init_latents(jax.random.key(0), (1, 3, 8, 8, 4), jax.numpy.float32))
    np.save(root / "latents.npy", lat)  # ours: (1, F, h, w, C)
    np.save(root / "image_noise.npy", np.asarray(jax.random.normal(ic.image_noise_key(0), (1, 1, 8, 8, 4))))
    return pipe, root


def _args(root, out, *extra, ckpt=None):
    return ["--model", "consisid", "--checkpoint", str(ckpt or root / "ckpt"), "--prompt", PROMPT, *SIZE,
            "--out", str(out), "--quiet", *extra]


NOISE = ("--latents", "latents.npy", "--image-noise", "image_noise.npy")


def _noise(root):
    return [a if a.startswith("--") else str(root / a) for a in NOISE]


@pytest.fixture(scope="module")
def single(tiny):
    """The 1-device CLI run from photo ref0.png, with the given noise, ``--save-id`` and ``--save-latents``."""
    _, root = tiny
    out = root / "single.npy"
    assert sample.main(_args(root, out, "--ref", str(root / "ref0.png"), "--face-models", str(root / "faces"),
                             *_noise(root), "--save-id", str(root / "saved.npz"),
                             "--save-latents", str(root / "single_z.npy"))) == 0
    return np.load(out), np.load(root / "single_z.npy")


@pytest.mark.slow
def test_consisid_cli_frames_match_diffusers_consisid_pipeline(tiny, single, monkeypatch):
    """diffusers' ConsisIDPipeline given the identity the run computed from the photo and saved (the
    512 x 512 face crop, Lanczos-resized to 64 x 64 by both; id_cond, id_vit_hidden), the same
    initial noise and posterior draw (the VAE's mean + std * draw): frames within 1e-4 (the issue's
    bound); and id_cond changes the reference video (the face path is compared)."""
    from PIL import Image

    pipe, root = tiny
    ours, _ = single
    ident = dict(np.load(root / "saved.npz"))
    assert ident["image"].shape == (512, 512, 3)
    lat = torch.from_numpy(np.load(root / "latents.npy")).permute(0, 1, 4, 2, 3)  # (B, F, C, h, w)
    eps = torch.from_numpy(np.load(root / "image_noise.npy")).permute(0, 4, 1, 2, 3)  # (B, C, 1, h, w)

    from diffusers.pipelines.consisid import pipeline_consisid

    def posterior_sample(encoded, generator=None, sample_mode="sample"):  # DiagonalGaussian.sample, draw given
        return encoded.latent_dist.mean + encoded.latent_dist.std * eps

    monkeypatch.setattr(pipeline_consisid, "retrieve_latents", posterior_sample)

    def run(id_cond):
        with torch.no_grad():
            return pipe(image=Image.fromarray(ident["image"]), prompt=PROMPT, num_frames=9, height=64, width=64,
                        num_inference_steps=3, guidance_scale=6.0, use_dynamic_cfg=True, latents=lat.clone(),
                        id_cond=torch.from_numpy(id_cond), id_vit_hidden=list(torch.from_numpy(ident["id_vit_hidden"])),
                        output_type="np").frames[0]

    ref = run(ident["id_cond"])
    assert ours.shape == ref.shape == (9, 64, 64, 3)
    assert 0.2 < np.mean((ref > 0) & (ref < 1))  # not a saturated comparison
    err = float(np.max(np.abs(ours - ref)))
    print(f"max abs frame error vs diffusers ConsisIDPipeline: {err:.3g}")
    assert err <= 1e-4
    other = run(ident["id_cond"] + 1.0)
    assert np.max(np.abs(other - ref)) > 10 * 1e-4  # the face reaches the video, beyond the parity bound
    meta = json.loads((root / "single.npy.json").read_text())
    assert meta["model"] == "consisid" and meta["reference"] == str(root / "ref0.png") and meta["identity"] == "ref"


@pytest.mark.slow
def test_saved_identity_holds_the_pipeline_arrays_and_reproduces_the_video(tiny, single, tmp_path):
    """``--save-id`` writes exactly the three ConsisIDPipeline arrays at the tiny model's sizes;
    ``--id`` on that file gives the same video as the photo did, bit for bit."""
    _, root = tiny
    with np.load(root / "saved.npz") as f:
        assert sorted(f.files) == sorted(consisid_identity.KEYS)
        assert f["id_cond"].shape == (1, 536) and f["id_vit_hidden"].shape == (5, 1, 10, 32)
    out = tmp_path / "again.npy"
    assert sample.main(_args(root, out, "--id", str(root / "saved.npz"), *_noise(root))) == 0
    np.testing.assert_array_equal(np.load(out), single[0])
    assert json.loads((tmp_path / "again.npy.json").read_text())["reference"] == str(root / "saved.npz")


@pytest.mark.slow  # a subprocess on 8 fake devices: over 30 s on 2 CPU cores
def test_consisid_on_8_devices_with_data_context_tensor_mesh_equals_one_device(tiny, single, tmp_path):
    """data=2 (the CFG pair), context=2 (the joint sequence), tensor=2: final latents within 1e-5
    (relative), frames within 1e-4 of the 1-device run."""
    _, root = tiny
    args = _args(root, tmp_path / "eight.npy", "--id", str(root / "saved.npz"), *_noise(root),
                 "--save-latents", str(tmp_path / "eight_z.npy"), "--mesh", "data=2,context=2,tensor=2")
    proc = subprocess.run([sys.executable, "-m", "mm_jax.sample", *args], cwd=Path(__file__).resolve().parents[1],
                          env=fake_devices_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"mesh": {"data": 2, "fsdp": 1, "context": 2, "tensor": 2}' in proc.stderr
    one, eight = single[1], np.load(tmp_path / "eight_z.npy")
    err = float(np.max(np.abs(eight - one)) / np.max(np.abs(one)))
    print(f"8 devices (data=2,context=2,tensor=2) vs 1: final latents max rel err {err:.2e}")
    assert err <= 1e-5
    assert np.max(np.abs(np.load(tmp_path / "eight.npy") - single[0])) <= 1e-4


@pytest.mark.slow
def test_prompts_file_batches_two_identities_and_skips_the_bad_line(tiny, single, tmp_path, capsys):
    """A saved identity and another photo denoised in one batch (seed 0: the single run's noise,
    drawn here from the seed) and a line naming a missing .npz: the bad line is named and skipped,
    exit 1, the good videos written; line 1 equals the single run (1e-5), line 3's face changes its video."""
    _, root = tiny
    lines = [{"prompt": PROMPT, "out": str(tmp_path / "a.npy"), "id": str(root / "saved.npz"), "seed": 0},
             {"prompt": PROMPT, "out": str(tmp_path / "missing.npy"), "id": str(tmp_path / "nope.npz")},
             {"prompt": PROMPT, "out": str(tmp_path / "b.npy"), "ref": str(root / "ref1.png"), "seed": 0}]
    (tmp_path / "lines.jsonl").write_text("\n".join(json.dumps(d) for d in lines))
    args = ["--model", "consisid", "--checkpoint", str(root / "ckpt"), *SIZE, "--prompts",
            str(tmp_path / "lines.jsonl"), "--face-models", str(root / "faces"), "--videos-per-batch", "2", "--quiet"]
    assert sample.main(args) == 1
    err = capsys.readouterr().err
    assert f"lines.jsonl:2: --id {tmp_path / 'nope.npz'}: not a ConsisID identity file" in err
    assert "2 video(s), 1 line(s) skipped, 2 per batch" in err
    assert not (tmp_path / "missing.npy").exists()
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    err_a = float(np.max(np.abs(a - single[0])))
    print(f"--prompts line (batch of 2) vs the single run: max abs frame difference {err_a:.2e}")
    assert err_a <= 1e-5
    assert np.max(np.abs(a - b)) > 1e-3
    meta = json.loads((tmp_path / "b.npy.json").read_text())
    assert meta["line"] == 3 and meta["reference"] == str(root / "ref1.png") and meta["identity"] == "ref"


def _bad_npz(path):
    ident = random_identity(0)
    ident["id_vit_hidden"] = ident["id_vit_hidden"][:4]  # 4 scales; the transformer takes 5
    np.savez(path, **ident)


@pytest.mark.parametrize("change,message", [
    (["--checkpoint", "MISSING", "--id", "A"], "is not an mm_jax checkpoint folder"),
    (["--checkpoint", "T2V", "--id", "A"], "is not ConsisID: it has"),
    (["--model", "cogvideox", "--id", "A"], "is ConsisID (consisid_transformer): sample it with --model consisid"),
    ([], "--model consisid needs an identity: --ref PHOTO"),
    (["--ref", "A"], "--ref needs --face-models DIR"),
    (["--ref", "A", "--id", "A", "--face-models", "x"], "give either --ref or --id, not both"),
    (["--id", "BAD"], "id_vit_hidden scales is 4; the ConsisID transformer's LFE_num_scale is 5"),
    (["--id", "NOT_NPZ"], "not a ConsisID identity file"),
    (["--id", "A", "--height", "48"], "latent height x width 6 x 8: this transformer's learned positional table"),
    (["--id", "A", "--latents", "WRONG"], "initial latents have shape (1, 1, 8, 8, 3); these settings need (1, 3, 8, 8, 4)"),
    (["--id", "A", "--image-noise", "WRONG"], "image noise has shape (1, 1, 8, 8, 3)"),
    (["--id", "A", "--adapter", "x"], "--adapter (Magic Mirror) and --image (image to video) do not combine"),
    (["--ref", "REF", "--face-models", "EMPTY"], "missing detection_Resnet50_Final.pth"),
    (["--ref", "MISSING", "--face-models", "FACES"], "not found"),
    pytest.param(["--ref", "REF", "--face-models", "BLIND"], "ref0.png: RetinaFace found no face with score > 0.97",
                 marks=pytest.mark.slow),  # RetinaFace-R50 compiled at its real size: ~30 s on CPU
])
def test_consisid_bad_input_exits_2_and_writes_nothing(tiny, tmp_path, capsys, change, message):
    _, root = tiny
    if "T2V" in change:  # a CogVideoX checkpoint: the ConsisID one with its transformer renamed
        t2v = tmp_path / "t2v"
        shutil.copytree(root / "ckpt", t2v)
        index = json.loads((t2v / "mm_jax_checkpoint.json").read_text())
        index["components"] = [c if c != "consisid_transformer" else "transformer" for c in index["components"]]
        (t2v / "mm_jax_checkpoint.json").write_text(json.dumps(index))
    if "BLIND" in change:  # a face folder whose RetinaFace finds no face
        from tests.tiny_consisid_faces import retinaface_state_dict

        shutil.copytree(root / "faces", tmp_path / "blind")
        torch.save(retinaface_state_dict(detects=False), tmp_path / "blind" / "detection_Resnet50_Final.pth")
    (tmp_path / "empty").mkdir()
    _bad_npz(tmp_path / "bad.npz")
    (tmp_path / "not.npz").write_text("not an npz")
    np.save(tmp_path / "wrong.npy", np.zeros((1, 1, 8, 8, 3), np.float32))
    subst = {"MISSING": str(tmp_path / "nope"), "T2V": str(tmp_path / "t2v"), "A": str(root / "a.npz"),
             "BAD": str(tmp_path / "bad.npz"), "NOT_NPZ": str(tmp_path / "not.npz"), "WRONG": str(tmp_path / "wrong.npy"),
             "REF": str(root / "ref0.png"), "FACES": str(root / "faces"), "BLIND": str(tmp_path / "blind"),
             "EMPTY": str(tmp_path / "empty")}
    out = tmp_path / "v.mp4"
    args = _args(root, out, *[subst.get(c, c) for c in change])  # a later --checkpoint / --model / --height wins
    assert sample.main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("*.json"))
