"""The ConsisID transformer on context-parallel meshes (8 fake CPU devices, in a subprocess) computes
what it computes on one device: the face cross-attentions act on the video rows of a joint sequence
that is split (and padded) over the context axis.

Run as a script (``python tests/test_consisid_transformer_sharded.py CKPT``) it is that subprocess.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MESHES = ("data=2,context=2,tensor=2", "fsdp=2,context=4")


@pytest.mark.slow  # a subprocess on 8 fake devices: over 30 s on 2 busy CPU cores
def test_consisid_on_context_parallel_meshes_equals_one_device(tmp_path):
    from tests.conftest import fake_devices_env
    from tests.test_consisid_transformer import _torch_model
    from tools.convert_weights.from_torch import convert

    _torch_model(rope=True).save_pretrained(tmp_path / "transformer")
    ckpt = convert(tmp_path / "transformer", tmp_path / "ckpt")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, __file__, str(ckpt)], env=fake_devices_env(), cwd=root,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max_rel_err") == len(MESHES), r.stdout


def _check(ckpt: str) -> None:
    import jax
    import numpy as np
    from flax import nnx

    from mm_jax import checkpoint, parallel
    from tests.test_consisid_transformer import _face

    assert len(jax.devices()) == 8
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8, 12, 4), dtype=np.float32)  # 7 text + 72 video tokens: padded for context 2, 4
    text = rng.standard_normal((4, 7, 24), dtype=np.float32)
    t = np.array([999, 500, 17, 0])
    id_cond, vit = (a.numpy() for a in _face(1, 2))
    forward = nnx.jit(lambda m, *a: m(*a))
    one = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    with jax.set_mesh(one):
        y1 = np.asarray(forward(checkpoint.load_component(ckpt, "consisid_transformer", mesh=one),
                                x, text, t, id_cond, vit))
    for spec in MESHES:
        mesh = parallel.make_mesh(spec)
        with jax.set_mesh(mesh):
            y = np.asarray(forward(checkpoint.load_component(ckpt, "consisid_transformer", mesh=mesh),
                                   x, text, t, id_cond, vit))
        err = float(np.max(np.abs(y - y1)) / np.max(np.abs(y1)))
        print(f"{spec} max_rel_err={err:.3e}")
        assert err <= 1e-5, (spec, err)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _check(sys.argv[1])
