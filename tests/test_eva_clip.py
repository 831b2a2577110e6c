"""EVA02-CLIP tower: config checks, the converter's strictness and ``.pt`` loading, bad inputs.
Parity with ``consisid_eva_clip`` and torchvision: tests/torch_refs/test_eva_clip.py (the consisid-ref extra)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from flax import nnx

from mm_jax.models.eva_clip import EVAVisionConfig, preprocess
from tools.convert_weights import eva_clip as ec

TINY = EVAVisionConfig(image_size=28, patch_size=14, width=16, layers=3, head_width=8, mlp_hidden=24, embed_dim=8,
                       hidden_state_blocks=(1, 2))


def _state_dict(cfg=TINY, seed=0) -> dict:
    """A whole EVA-CLIP checkpoint's layout for ``cfg``: random tower tensors under ``visual.`` (torch
    shapes from the mapping), its rope buffers, and text-tower keys the converter must ignore."""
    rng = np.random.default_rng(seed)
    sd = {f"visual.{k}": rng.standard_normal(m.torch_shape).astype(np.float32)
          for k, m in ec.build_mapping(cfg).items()}
    cos, sin = ec.rope_tables(cfg)
    for prefix in ["visual.rope."] + [f"visual.blocks.{i}.attn.rope." for i in range(cfg.layers)]:
        sd[prefix + "freqs_cos"], sd[prefix + "freqs_sin"] = cos, sin
    sd.update({"text.token_embedding.weight": np.zeros((4, 8), np.float32), "logit_scale": np.zeros((), np.float32)})
    return sd


def test_sizes_are_read_from_the_tensors_and_each_block_lands_in_its_layer():
    sd = _state_dict()
    cfg = ec.config_from_state_dict(sd, hidden_state_blocks=(1, 2))  # the release's 4..20 need >= 21 layers
    assert cfg == TINY
    cfg, params = ec.convert_state_dict(sd, cfg)  # a whole checkpoint: text tower and logit_scale ignored
    assert params.keys() == {m.ours for m in ec.build_mapping(cfg).values()}
    np.testing.assert_array_equal(params["blocks/attn/q_proj/kernel"][2], sd["visual.blocks.2.attn.q_proj.weight"].T)
    np.testing.assert_array_equal(params["blocks/attn/v_bias"][1], sd["visual.blocks.1.attn.v_bias"])
    np.testing.assert_array_equal(params["patch_embed/proj/kernel"],
                                  sd["visual.patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["cls_token"], sd["visual.cls_token"])


def test_missing_unexpected_and_misshapen_tensors_are_all_named():
    sd = _state_dict()
    del sd["visual.blocks.1.attn.k_proj.weight"]
    sd["visual.blocks.0.attn.k_bias"] = np.zeros(16, np.float32)
    sd["visual.head.bias"] = np.zeros(9, np.float32)
    with pytest.raises(ValueError, match="3 problem") as e:
        ec.convert_state_dict(sd, TINY)
    msg = str(e.value)
    assert "missing key blocks.1.attn.k_proj.weight" in msg
    assert "unexpected key blocks.0.attn.k_bias" in msg
    assert "shape mismatch for head.bias: expected [8], found [9]" in msg


def test_rope_buffers_of_another_pt_hw_seq_len_are_refused():
    with pytest.raises(ValueError, match="pt_hw_seq_len=8"):
        ec.convert_state_dict(_state_dict(), dataclasses.replace(TINY, pt_hw_seq_len=8))


def test_a_pt_file_loads_wrapped_and_with_the_ddp_prefix(tmp_path):
    import torch

    sd = _state_dict()
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(np.asarray(v)) for k, v in sd.items()}},
               tmp_path / "eva.pt")
    loaded = ec.load_pt(tmp_path / "eva.pt")
    assert loaded.keys() == sd.keys()
    _, params = ec.convert_state_dict(loaded, TINY)
    np.testing.assert_array_equal(params["head/kernel"], sd["visual.head.weight"].T)


def test_hidden_state_blocks_outside_the_tower_are_refused():
    # the reference's blocks 4..20 need >= 21 layers; a state "entering" block 3 of 3 does not exist
    with pytest.raises(ValueError, match=r"hidden_state_blocks \(1, 3\).*layers=3"):
        dataclasses.replace(TINY, hidden_state_blocks=(1, 3)).validate()
    with pytest.raises(ValueError, match="head_width 6 must be a multiple of 4"):
        EVAVisionConfig(width=12, head_width=6).validate()


def test_tower_returns_the_chosen_entering_states_and_refuses_other_sizes():
    model = ec.to_module(TINY, ec.convert_state_dict(_state_dict(), TINY)[1])
    feats, hidden = model(np.zeros((2, 28, 28, 3), np.float32))
    assert feats.shape == (2, 8) and hidden.shape == (2, 2, 5, 16)
    with pytest.raises(ValueError, match=r"takes \(B, 28, 28, 3\)"):
        model(np.zeros((1, 42, 42, 3), np.float32))


def test_preprocess_refuses_non_square_faces_and_uint8():
    with pytest.raises(ValueError, match="square 336x336"):
        preprocess(np.zeros((1, 512, 600, 3), np.float32))
    with pytest.raises(ValueError, match="float RGB"):
        preprocess(np.zeros((1, 512, 512, 3), np.uint8))


SHARDED = """
import jax, numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from mm_jax import parallel
from mm_jax.models.eva_clip import EVAVisionConfig, EVAVisionTower
# width 32: at 48 or 64 XLA:CPU's reshard bug (tests/test_parallel.py) gives O(1) errors in plain JAX too
cfg = EVAVisionConfig(image_size=56, patch_size=14, width=32, layers=3, head_width=16, mlp_hidden=64, embed_dim=16,
                      hidden_state_blocks=(1, 2))
m = EVAVisionTower(cfg, rngs=nnx.Rngs(0))
x = np.random.default_rng(0).standard_normal((4, 56, 56, 3)).astype(np.float32)
fwd = nnx.jit(lambda m, x: m(x))
want = [np.asarray(a) for a in fwd(m, x)]
mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
m = parallel.shard_module(m, mesh)
assert m.blocks.mlp.w1.kernel.get_value().sharding.spec == P(None, "fsdp", "tensor")
with jax.set_mesh(mesh):
    got = [np.asarray(a) for a in fwd(m, jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))))]
print("rel_err", max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(got, want)))
"""


@pytest.mark.slow  # a subprocess on 8 fake devices: ~40 s on 2 busy cores
def test_tower_on_a_2x2x2_mesh_equals_one_device():
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import fake_devices_env

    r = subprocess.run([sys.executable, "-c", SHARDED], env=fake_devices_env(8), cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.split("rel_err")[1]) <= 1e-5, r.stdout


def test_converted_tower_round_trips_through_a_checkpoint_folder(tmp_path):
    from mm_jax import checkpoint

    cfg, params = ec.convert_state_dict(_state_dict(), TINY)
    ec.save(tmp_path, cfg, params)
    checkpoint.write_index(tmp_path, ["eva_clip"])
    back = checkpoint.load_component(tmp_path, "eva_clip")
    assert back.cfg == cfg
    got = {checkpoint.flat_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(back, nnx.Param))}
    assert got.keys() == params.keys()
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)
