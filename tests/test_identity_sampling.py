"""Sampling with an identity end to end: tiny random backbone + adapter + stand-in face models."""
import json

import imageio.v3 as iio
import jax
import numpy as np
import pytest
import torch
from flax import nnx

from mm_jax import checkpoint, sample
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter
from tests.conftest import fake_devices_env, randomize_torch_params
from mm_jax.demo.standin_faces import face_image, make_pack
from tests.tiny_pipeline import make_pipeline
from tools.convert_weights.from_torch import convert

PROMPT = "a man is walking on the beach"


def _adapter(dit_cfg, seed=0, **over):
    cfg = AdapterConfig.for_dit(dit_cfg, clip_width=32, width=32, depth=1, heads=2, head_dim=16, num_face_tokens=4,
                                num_id_tokens=2, id_mlp_hidden=32, **over)
    ad = MagicMirrorAdapter(cfg, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed)
    for i, (path, var) in enumerate(nnx.to_flat_state(nnx.state(ad, nnx.Param))):  # trained-like: nothing at zero
        v = var.get_value()
        var.set_value(v + 0.1 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype))
    return ad


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    root = tmp_path_factory.mktemp("idpipe")
    make_pipeline(root / "src", heads=4)  # 4 heads: Ulysses divides them over context=4 (and 2)
    ckpt = convert(root / "src", root / "ckpt")
    torch.manual_seed(0)
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=224, patch_size=14)).eval()
    randomize_torch_params(clip, 0)
    clip.save_pretrained(root / "clip")
    adapter_dir = convert(root / "clip", root / "adapter")  # holds image_encoder ...
    dit_cfg = checkpoint.load_config(ckpt, "transformer")
    checkpoint.save_module(adapter_dir, "adapter", _adapter(dit_cfg))  # ... and the adapter
    checkpoint.write_index(adapter_dir, ["image_encoder", "adapter"])
    pack = make_pack(root / "faces")
    refs = []
    for i, at in enumerate([(96, 160), (120, 200)]):
        refs.append(root / f"ref{i}.png")
        iio.imwrite(refs[-1], face_image(at=at, seed=i))
    lat = np.random.default_rng(0).standard_normal((1, 3, 8, 8, 4)).astype(np.float32)
    np.save(root / "latents.npy", lat)
    return root, ckpt, adapter_dir, pack, refs


def _run(setup, out, *extra):
    root, ckpt, adapter_dir, pack, _ = setup
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
            "--steps", "3", "--latents", str(root / "latents.npy"), "--out", str(out), "--quiet", *extra]
    return sample.main(args)


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_identity_reaches_the_video_and_saved_ids_reproduce_it(setup, tmp_path):
    root, ckpt, adapter_dir, pack, refs = setup
    ident = ["--adapter", str(adapter_dir), "--face-models", str(pack)]
    assert _run(setup, tmp_path / "a.npy", *ident, "--ref", str(refs[0]), "--save-id", str(tmp_path / "a.npz")) == 0
    assert _run(setup, tmp_path / "b.npy", *ident, "--ref", str(refs[1])) == 0
    assert _run(setup, tmp_path / "plain.npy") == 0
    assert _run(setup, tmp_path / "a2.npy", "--adapter", str(adapter_dir), "--id", str(tmp_path / "a.npz")) == 0
    a, b, plain, a2 = (np.load(tmp_path / f"{n}.npy") for n in ("a", "b", "plain", "a2"))
    assert a.shape == (9, 64, 64, 3)
    assert np.max(np.abs(a - b)) > 1e-3 and np.max(np.abs(a - plain)) > 1e-3  # the identity changes the video
    np.testing.assert_array_equal(a, a2)  # embeddings computed once and reused give the same video
    assert json.loads((tmp_path / "a.npy.json").read_text())["reference"].endswith("ref0.png")


def test_plain_sampling_with_an_adapter_but_no_face_is_plain_cogvideox(setup, tmp_path):
    _, _, adapter_dir, _, _ = setup
    assert _run(setup, tmp_path / "p1.npy") == 0
    assert _run(setup, tmp_path / "p2.npy", "--adapter", str(adapter_dir)) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "p1.npy"), np.load(tmp_path / "p2.npy"))


def test_identity_errors_exit_2_with_a_clear_message(setup, tmp_path, capsys):
    root, ckpt, adapter_dir, pack, refs = setup
    ident = ["--adapter", str(adapter_dir), "--face-models", str(pack)]
    empty = tmp_path / "empty.png"
    iio.imwrite(empty, np.zeros((64, 64, 3), np.uint8))
    assert _run(setup, tmp_path / "x.mp4", *ident, "--ref", str(empty)) == 2
    assert "no face found in" in capsys.readouterr().err
    args = ["--checkpoint", str(ckpt), "--prompt", "a dog runs on the beach", "--frames", "9", "--height", "64",
            "--width", "64", "--steps", "2", "--out", str(tmp_path / "y.mp4"), "--quiet", *ident, "--ref", str(refs[0])]
    assert sample.main(args) == 2
    assert "class word" in capsys.readouterr().err
    bad = tmp_path / "bad_adapter"
    dit_cfg = checkpoint.load_config(ckpt, "transformer")
    checkpoint.save_module(bad, "adapter", _adapter(dit_cfg, time_embed_dim=8))
    import shutil

    shutil.copytree(adapter_dir / "image_encoder", bad / "image_encoder")
    checkpoint.write_index(bad, ["image_encoder", "adapter"])
    assert _run(setup, tmp_path / "z.mp4", "--adapter", str(bad), "--face-models", str(pack), "--ref", str(refs[0])) == 2
    err = capsys.readouterr().err
    assert "adapter does not fit the backbone: adapter time_embed_dim=8" in err
    assert not any(tmp_path.glob("*.mp4"))


def test_info_prints_the_added_parameter_count(setup, capsys):
    _, ckpt, adapter_dir, _, _ = setup
    assert sample.main(["--checkpoint", str(ckpt), "--info", "--adapter", str(adapter_dir)]) == 0
    assert "adapter (from" in capsys.readouterr().out


@pytest.mark.slow  # a subprocess on 8 fake devices: over 30 s on 2 CPU cores
def test_identity_sampling_with_progress_bar_on_8_devices_equals_one_device(setup, tmp_path):
    """8 devices, default mesh (the CFG pair on data=2, the sequence over context=4 with Ulysses:
    4 heads), dynamic CFG, progress bar on (it used to be an ordered callback inside the compiled
    loop, which XLA refuses on more than one device; now the host drives the steps). The final
    latents equal the 1-device run within 1e-5 (relative to their largest value)."""
    import subprocess
    import sys
    from pathlib import Path

    root, ckpt, adapter_dir, pack, refs = setup
    ident = ["--adapter", str(adapter_dir), "--face-models", str(pack), "--ref", str(refs[0]), "--dynamic-cfg"]
    assert _run(setup, tmp_path / "one.npy", *ident, "--save-latents", str(tmp_path / "one_z.npy")) == 0
    args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
            "--steps", "3", "--latents", str(root / "latents.npy"), "--out", str(tmp_path / "eight.npy"),
            "--save-latents", str(tmp_path / "eight_z.npy"), *ident]
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "mm_jax.sample", *args], cwd=repo, env=fake_devices_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "denoising" in proc.stderr and "3/3" in proc.stderr
    assert '"mesh": {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}, "attention": "ulysses"' in proc.stderr
    one, eight = np.load(tmp_path / "one_z.npy"), np.load(tmp_path / "eight_z.npy")
    assert one.shape == eight.shape == (1, 3, 8, 8, 4)
    err = float(np.max(np.abs(eight - one)) / np.max(np.abs(one)))
    print(f"8 devices (data=2,context=4, Ulysses) vs 1: final latents max rel err {err:.2e}")
    assert err <= 1e-5, err
    # frames: the pipeline's bound against diffusers (the decode adds fp32 rounding)
    assert np.max(np.abs(np.load(tmp_path / "eight.npy") - np.load(tmp_path / "one.npy"))) <= 1e-4


def test_prompts_file_writes_every_good_line_and_names_the_bad_ones(setup, tmp_path, capsys):
    """Models load once; two identity videos denoised in one batch and a plain one equal their single
    runs; a missing reference, a prompt without a class word, a broken line and a reference without
    a face are reported by number and skipped; the exit code says some failed."""
    root, ckpt, adapter_dir, pack, refs = setup
    lines = [
        {"prompt": PROMPT, "out": str(tmp_path / "a.npy"), "ref": str(refs[0]), "seed": 3},
        {"prompt": PROMPT, "out": str(tmp_path / "missing.npy"), "ref": str(tmp_path / "nope.png")},
        {"prompt": "a man rides a bicycle", "out": str(tmp_path / "b.npy"), "ref": str(refs[1]), "seed": 4},
        {"prompt": "a dog on the beach", "out": str(tmp_path / "dog.npy"), "ref": str(refs[0])},
        {"prompt": PROMPT, "out": str(tmp_path / "plain.npy"), "seed": 5},
        {"prompt": PROMPT, "out": str(tmp_path / "noface.npy"), "ref": str(tmp_path / "wall.png")},
    ]
    iio.imwrite(tmp_path / "wall.png", np.full((128, 128, 3), 128, np.uint8))  # a photo without a face
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(d) for d in lines[:3]) + "\n{not json\n"
                     + "\n".join(json.dumps(d) for d in lines[3:]) + "\n")
    args = ["--checkpoint", str(ckpt), "--frames", "9", "--height", "64", "--width", "64", "--steps", "3", "--quiet",
            "--adapter", str(adapter_dir), "--face-models", str(pack), "--prompts", str(jsonl),
            "--videos-per-batch", "2"]
    assert sample.main(args) == 1
    err = capsys.readouterr().err
    assert "prompts.jsonl:2: reference" in err and "prompts.jsonl:4: not JSON" in err
    assert "prompts.jsonl:5: the prompt names no subject class word" in err
    assert f"prompts.jsonl:7: no face found in {tmp_path / 'wall.png'}" in err
    assert "4 line(s) failed: [2, 4, 5, 7]" in err
    assert not any((tmp_path / f).exists() for f in ("missing.npy", "dog.npy", "noface.npy"))
    assert json.loads((tmp_path / "b.npy.json").read_text())["line"] == 3
    single = ["--adapter", str(adapter_dir), "--face-models", str(pack)]
    for name, extra in (("a", ["--ref", str(refs[0]), "--seed", "3"]),
                        ("b", ["--ref", str(refs[1]), "--seed", "4", "--prompt", "a man rides a bicycle"]),
                        ("plain", ["--seed", "5"])):
        base = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
                "--steps", "3", "--out", str(tmp_path / f"{name}_1.npy"), "--quiet"]
        assert sample.main(base + single + extra) == 0
        # the frames bound of the pipeline tests (batching two videos changes the matmul shapes: 1.1e-5 seen)
        assert np.max(np.abs(np.load(tmp_path / f"{name}.npy") - np.load(tmp_path / f"{name}_1.npy"))) <= 1e-4, name


def test_eval_prompts_benchmark_plans_one_prompts_file_for_the_missing_videos(setup, tmp_path):
    from benchmarks import eval_prompts

    root, ckpt, adapter_dir, pack, refs = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"a man number {i}", "class_word": "man"}) + "\n"
                               for i in range(3)))
    args = ["--checkpoint", str(ckpt), "--adapter", str(adapter_dir), "--face-models", str(pack), "--refs",
            str(refs[0]), "--out-dir", str(tmp_path / "out"), "--prompts", str(prompts), "--dry-run"]
    assert eval_prompts.main(args) == 0
    todo = [json.loads(x) for x in (tmp_path / "out" / "todo.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in todo] == ["a man number 0", "a man number 1", "a man number 2"]
    (tmp_path / "out" / "videos" / "p1_ref0.mp4").write_bytes(b"done")  # a video from an earlier run is kept
    assert eval_prompts.main(args) == 0
    todo = [json.loads(x) for x in (tmp_path / "out" / "todo.jsonl").read_text().splitlines()]
    assert [t["prompt"] for t in todo] == ["a man number 0", "a man number 2"]


def test_eval_prompts_scores_the_sampled_videos_when_one_line_failed(setup, tmp_path, monkeypatch):
    from benchmarks import eval_prompts
    from mm_jax import evaluate

    root, ckpt, adapter_dir, pack, refs = setup
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"a man number {i}", "class_word": "man"}) + "\n"
                               for i in range(3)))
    evaluated = []

    def fake_sample(cmd):  # line 2 fails (as a reference without a face would), the others are written
        todo = [json.loads(x) for x in open(cmd[cmd.index("--prompts") + 1])]
        for t in todo[:1] + todo[2:]:
            open(t["out"], "wb").write(b"video")
        return 1

    def fake_evaluate(argv):
        evaluated.extend(json.loads(x)["video"] for x in open(argv[argv.index("--manifest") + 1]))
        return 0

    monkeypatch.setattr(sample, "main", fake_sample)
    monkeypatch.setattr(evaluate, "main", fake_evaluate)
    args = ["--checkpoint", str(ckpt), "--adapter", str(adapter_dir), "--face-models", str(pack), "--refs",
            str(refs[0]), "--out-dir", str(tmp_path / "out"), "--prompts", str(prompts)]
    assert eval_prompts.main(args) == 1
    assert evaluated == ["videos/p0_ref0.mp4", "videos/p2_ref0.mp4"]
