"""Sharding: mesh construction, logical rules, and the DiT on a 2x2x2 mesh of fake CPU devices."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from jax.sharding import PartitionSpec as P

from mm_jax import parallel
from tests.conftest import fake_devices_env, randomize_torch_params
from tests.test_dit import TINY
from tools.convert_weights.from_torch import convert


def test_mesh_spec_parsing_and_errors():
    assert parallel.parse_mesh_spec("data=1,fsdp=2,tensor=4") == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(ValueError, match="unknown axis 'pipe'"):
        parallel.parse_mesh_spec("pipe=2")
    with pytest.raises(ValueError, match="needs 4 devices"):
        parallel.make_mesh("fsdp=4")


def test_logical_rules_replicate_dims_that_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.logical_to_spec(("embed", "mlp"), (8, 6), mesh_shape) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("embed", "mlp"), (7, 6), mesh_shape) == P(None, "tensor")
    assert parallel.logical_to_spec(("batch", "seq"), (4, 9), mesh_shape) == P(("data", "fsdp"), None)
    assert parallel.logical_to_spec(("batch",), (2,), mesh_shape) == P(None)


def test_dit_on_2x2x2_mesh_equals_one_device(tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(**TINY).eval()
    randomize_torch_params(m)
    m.save_pretrained(tmp_path / "src")
    ckpt = convert(tmp_path / "src", tmp_path / "ckpt")
    env = fake_devices_env()
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "sharded_forward_check.py"), str(ckpt)],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "max_rel_err" in r.stdout


def test_dit_with_adapter_on_context_parallel_meshes_equals_one_device():
    """contexts 8 / 4 / 2 (with data=2 and tensor=2), Ulysses and ring: the CFG batch forward
    equals the 1-device forward within 1e-5 (tests/context_parallel_check.py)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "context_parallel_check.py")], env=fake_devices_env(),
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("max_rel_err=") == 6
    print(r.stdout)


def test_sampling_mesh_puts_the_cfg_pair_on_data_then_the_sequence_on_context():
    assert parallel.sampling_mesh_shape(1) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    assert parallel.sampling_mesh_shape(8) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert parallel.sampling_mesh_shape(3) == {"data": 1, "fsdp": 1, "context": 3, "tensor": 1}
    # 8 GB cores (v2-8) cannot hold the replicated 5B DiT: its parameters are sharded instead
    assert parallel.sampling_mesh_shape(8, 8 * 1024 ** 3) == {"data": 1, "fsdp": 2, "context": 1, "tensor": 4}
    assert parallel.sampling_mesh_shape(8, 16 * 1024 ** 3) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
