"""``python -m mm_jax.sample`` on 2 JAX processes x 4 CPU devices (``mm_jax.launch``) equals 1 process
on 8 devices, on the same mesh (data=2 for the CFG pair, context=4 with the ring: the tiny DiT's 2
heads do not divide over 4): identity with --ref/--save-id, and --prompts with a plain (text-to-video),
a --ref and an --id line. Every process runs the SPMD work; process 0 alone writes.

The four runs are made once for the module (assets built once) and shared by the assertions.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import fake_devices_env, max_rel_err

ROOT = Path(__file__).resolve().parents[1]
MESH = "data=2,context=4"
PROMPT = "a man is walking"


def _sample(workdir: Path, processes: int, *argv: str) -> subprocess.CompletedProcess:
    """The sample CLI in ``workdir``: on ``processes`` x 4 devices through the launcher, or one
    process on 8 devices."""
    cli = [sys.executable, "-m", "mm_jax.sample", *argv]
    if processes > 1:
        cli = [sys.executable, "-m", "mm_jax.launch", "--processes", str(processes), "--devices-per-process", "4",
               "--", *cli]
    env = dict(fake_devices_env(8), PYTHONPATH=str(ROOT))  # the launcher replaces the device count per child
    proc = subprocess.run(cli, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_assets):
    """{1: (folder, stderr per case), 2: ...}: each case run on 1 process (8 devices) and 2 (4 each)."""
    root = tmp_path_factory.mktemp("mp_sample")
    backbone, adapter = tiny_assets["model.checkpoint"], tiny_assets["model.adapter"]
    faces, ref = tiny_assets["data.face_models"], tiny_assets["sample.ref"]
    common = ["--checkpoint", str(backbone), "--frames", "9", "--height", "64", "--width", "64", "--steps", "2",
              "--mesh", MESH, "--quiet"]
    ident = ["--adapter", str(adapter), "--face-models", str(faces)]
    out = {}
    for n in (1, 2):
        d = root / f"p{n}"
        d.mkdir()
        err = {"ref": _sample(d, n, *common, *ident, "--prompt", PROMPT, "--ref", str(ref), "--seed", "7",
                              "--out", "ref.npy", "--save-latents", "ref_z.npy", "--save-id", "ref.npz").stderr}
        lines = [{"prompt": PROMPT, "out": "many/plain.npy", "seed": 3},
                 {"prompt": PROMPT, "out": "many/ref.npy", "ref": str(ref), "seed": 4},
                 {"prompt": "a man rides a bicycle", "out": "many/id.npy", "id": str(root / "p1" / "ref.npz")}]
        (d / "p.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        err["prompts"] = _sample(d, n, *common, *ident, "--prompts", "p.jsonl", "--videos-per-batch", "2").stderr
        out[n] = (d, err)
    return out


def _written_once_by_process_0(folder: Path, names: list[str], stderr: str) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".json")
                  and p.suffix != ".jsonl") == sorted(names)
    assert "[p0] wrote" in stderr and "[p1] wrote" not in stderr and "[p1] settings" not in stderr


@pytest.mark.slow  # four sample runs, two of them on 2 processes: about 2 minutes on 2 CPU cores
def test_identity_sample_and_its_saved_embeddings_on_2_processes_equal_1_process(runs):
    (d1, _), (d2, err2) = runs[1], runs[2]
    with np.load(d1 / "ref.npz") as a, np.load(d2 / "ref.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["clip_hidden", "e_id", "source"]
        for k in ("e_id", "clip_hidden"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    z_err = max_rel_err(np.load(d2 / "ref_z.npy"), np.load(d1 / "ref_z.npy"))
    f_err = float(np.max(np.abs(np.load(d2 / "ref.npy") - np.load(d1 / "ref.npy"))))
    print(f"identity, 2 processes vs 1: final latents max rel err {z_err:.2e}, frames max abs err {f_err:.2e}")
    assert z_err <= 1e-5 and f_err <= 1e-5
    assert "[p0] saved the identity embeddings to ref.npz" in err2["ref"]
    assert "[p1] saved" not in err2["ref"]
    _written_once_by_process_0(d2, ["ref.npy", "ref_z.npy", "ref.npz"], err2["ref"])


@pytest.mark.slow
def test_prompts_file_on_2_processes_writes_each_video_once_equal_to_1_process(runs):
    (d1, _), (d2, err2) = runs[1], runs[2]
    for name in ("plain", "ref", "id"):
        a, b = np.load(d1 / "many" / f"{name}.npy"), np.load(d2 / "many" / f"{name}.npy")
        err = float(np.max(np.abs(b - a)))
        print(f"--prompts {name}: 2 processes vs 1, frames max abs err {err:.2e}")
        assert a.shape == (9, 64, 64, 3) and err <= 1e-5, name
    _written_once_by_process_0(d2 / "many", ["plain.npy", "ref.npy", "id.npy"], err2["prompts"])
    assert [json.loads((d2 / "many" / f"{n}.npy.json").read_text())["line"] for n in ("plain", "ref", "id")] == [1, 2, 3]
