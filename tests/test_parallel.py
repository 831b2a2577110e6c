"""Sharding: mesh construction, logical rules, and the DiT, T5 and CLIP on a 2x2x2 mesh of fake CPU devices."""
import os
import subprocess
import sys
import warnings
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


CPU_MESH = """
import sys, warnings
import jax
from mm_jax import parallel
from jax.experimental import mesh_utils
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    mesh = parallel.make_mesh("data=2,fsdp=4")
    one_slice = parallel.make_mesh("data=2,fsdp=4", dcn="data=1")
print("mesh", [d.id for d in mesh.devices.flat], "one_slice", [d.id for d in one_slice.devices.flat])
print("create_device_mesh", [d.id for d in mesh_utils.create_device_mesh((2, 4, 1, 1)).flat])
print("devices", [d.id for d in jax.devices()], "warnings", [str(w.message) for w in caught])
"""


def test_cpu_meshes_take_create_device_mesh_order_without_a_fallback_or_warning():
    """8 fake CPU devices, only mm_jax.parallel imported (the run's path): create_device_mesh gives
    the plain device order on CPU, make_mesh gives the same (with dcn=data=1 too) and warns nothing."""
    r = subprocess.run([sys.executable, "-c", CPU_MESH], env=fake_devices_env(8), cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    order = str(list(range(8)))
    assert f"mesh {order} one_slice {order}" in r.stdout, r.stdout
    assert f"create_device_mesh {order}" in r.stdout and f"devices {order} warnings []" in r.stdout, r.stdout


# 2 processes x 4 CPU devices (which name no slices): dcn data=2 takes each process as a slice.
DCN_PROCESSES = """
import numpy as np
from mm_jax import distributed
distributed.initialize()
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
from mm_jax import parallel
mesh = parallel.make_mesh("fsdp=4", dcn="data=2")
x = jax.make_array_from_callback((8, 4), NamedSharding(mesh, P(("data", "fsdp"))),
                                 lambda idx: np.arange(32.0).reshape(8, 4)[idx])
rows = [sorted({d.process_index for d in row.flat}) for row in mesh.devices]
print(f"shape {dict(mesh.shape)} processes by data index {rows} sum {float(jax.jit(lambda a: a.sum())(x))}")
"""


def test_dcn_data_2_over_two_processes_gives_each_process_one_data_index():
    """The hybrid mesh on the multi-process path the pod tests use (mm_jax.launch, 2 x 4 CPU
    devices): data=2 across the processes, fsdp=4 within each, and a sum over it is right (0..31)."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    r = subprocess.run([sys.executable, "-m", "mm_jax.launch", "--processes", "2", "--devices-per-process", "4", "--",
                        sys.executable, "-c", DCN_PROCESSES], env=env, cwd=Path(__file__).parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    want = "shape {'data': 2, 'fsdp': 4, 'context': 1, 'tensor': 1} processes by data index [[0], [1]] sum 496.0"
    assert sorted(line for line in r.stdout.splitlines() if "shape" in line) == [f"[p0] {want}", f"[p1] {want}"]


def test_a_dcn_mesh_the_devices_cannot_form_is_refused_by_name():
    import jax

    n = len(jax.devices())
    with pytest.raises(ValueError, match=r"spans 2 slices but the .* devices are in 1 process\(es\) \(cpu devices "
                                         r"name no separate slices: each process counts as one\)"):
        parallel.make_mesh(dcn="data=2")
    with pytest.raises(ValueError, match=r"DCN mesh \(mesh_dcn\) \{'pipe': 2\}: unknown axes \['pipe'\]"):
        parallel.make_mesh(dcn={"pipe": 2})
    with pytest.raises(ValueError, match=rf"the axes within one slice when mesh_dcn is given\) needs {2 * n} devices "
                                         rf"per slice but each of the 1 slices has {n}"):
        parallel.make_mesh({"fsdp": 2 * n}, dcn="data=1")


def test_logical_rules_replicate_dims_that_do_not_divide():
    mesh_shape = {"data": 2, "fsdp": 2, "tensor": 2}
    assert parallel.logical_to_spec(("embed", "mlp"), (8, 6), mesh_shape) == P("fsdp", "tensor")
    assert parallel.logical_to_spec(("embed", "mlp"), (7, 6), mesh_shape) == P(None, "tensor")
    assert parallel.logical_to_spec(("batch", "seq"), (4, 9), mesh_shape) == P(("data", "fsdp"), None)
    assert parallel.logical_to_spec(("batch",), (2,), mesh_shape) == P(None)


@pytest.mark.slow  # a subprocess on 8 fake devices: over 30 s on 2 CPU cores
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


@pytest.mark.slow  # a subprocess on 8 fake devices: over 30 s on 2 CPU cores
def test_dit_with_adapter_on_context_parallel_meshes_equals_one_device():
    """context=8, data=2,context=4 and data=2,context=2,tensor=2, Ulysses and ring (and ring in query
    chunks of 3): the CFG batch forward equals the 1-device forward within 1e-5
    (tests/context_parallel_check.py)."""
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "context_parallel_check.py")], env=fake_devices_env(),
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("max_rel_err=") == 8 and r.stdout.count("q_chunk=3") == 2
    print(r.stdout)


def test_attention_scheme_is_ulysses_when_the_heads_divide_else_ring_and_a_forced_ulysses_names_why():
    from mm_jax.models.attention_parallel import choose

    assert choose(48, 4) == "ulysses" and choose(48, 8) == "ulysses"
    assert choose(48, 5) == "ring" and choose(2, 4) == "ring"  # the context size does not divide the heads
    assert choose(48, 4, "ring") == "ring"
    with pytest.raises(ValueError, match=r"heads per tensor shard \(2\) to be a multiple of the context axis \(4\)"):
        choose(2, 4, "ulysses")
    with pytest.raises(ValueError, match="attention_parallelism='tree'"):
        choose(48, 4, "tree")


def test_sampling_mesh_without_cfg_puts_every_device_on_context():
    assert parallel.sampling_mesh_shape(8, rows=1) == {"data": 1, "fsdp": 1, "context": 8, "tensor": 1}
    assert parallel.sampling_mesh_shape(8, rows=2) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}


def test_sampling_mesh_puts_the_cfg_pair_on_data_then_the_sequence_on_context():
    assert parallel.sampling_mesh_shape(1) == {"data": 1, "fsdp": 1, "context": 1, "tensor": 1}
    assert parallel.sampling_mesh_shape(8) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert parallel.sampling_mesh_shape(3) == {"data": 1, "fsdp": 1, "context": 3, "tensor": 1}
    # 8 GB cores (v2-8) cannot hold the replicated 5B DiT: its parameters are sharded instead
    assert parallel.sampling_mesh_shape(8, 8 * 1024 ** 3) == {"data": 1, "fsdp": 2, "context": 1, "tensor": 4}
    assert parallel.sampling_mesh_shape(8, 16 * 1024 ** 3) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}


@pytest.mark.slow  # a subprocess on 8 fake devices: over 30 s on 2 CPU cores
def test_t5_and_clip_on_2x2x2_mesh_equal_one_device(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, T5Config, T5EncoderModel

    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=80, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                 dropout_rate=0.0)).eval()
    vision = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, image_size=56, patch_size=14)).eval()
    clip = CLIPModel(CLIPConfig(text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                                 eos_token_id=513),
                                # 17 tokens of width 32: at 5 tokens or width 48 the partitioner bug below hits
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, image_size=56, patch_size=14),
                                projection_dim=24)).eval()
    ckpts = []
    for name, m in (("t5", t5), ("vision", vision), ("clip", clip)):
        randomize_torch_params(m, 0, scale=0.1)
        m.save_pretrained(tmp_path / name)
        if name == "clip":  # the clip component wants its tokenizer beside it; any vocab.json + merges.txt do
            (tmp_path / name / "vocab.json").write_text("{}")
            (tmp_path / name / "merges.txt").write_text("")
        ckpts.append(str(convert(tmp_path / name, tmp_path / f"{name}_ckpt", ["clip"] if name == "clip" else None)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "sharded_encoders_check.py"), *ckpts],
                       env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("max_rel_err") == 3


REPRO = """
import jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from mm_jax import parallel
mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
rng = np.random.default_rng(0)
x, w = rng.standard_normal((4, 5, 48)).astype(np.float32), rng.standard_normal((48, 48)).astype(np.float32)
f = jax.jit(lambda x, w: jax.lax.with_sharding_constraint((2 * x) @ w, P(("data", "fsdp"), None, "tensor")))
with jax.set_mesh(mesh):
    y = f(jax.device_put(x, NamedSharding(mesh, P())), jax.device_put(w, NamedSharding(mesh, P("tensor", "fsdp"))))
print("rel_err", float(np.abs(np.asarray(y) - 2 * x @ w).max() / np.abs(2 * x @ w).max()))
"""


@pytest.mark.xfail(strict=True, reason="jax 0.10.2 / XLA CPU: a contraction over a tensor-sharded dim resharded onto "
                                       "(batch over data x fsdp, features over tensor) gives wrong values; when this "
                                       "passes, drop the size workaround in test_t5_and_clip_on_2x2x2_mesh_equal_one_device")
def test_the_xla_resharding_bug_that_the_encoder_sizes_avoid():
    # pure JAX, no mm_jax layers: (4, 5, 48) and (4, 257, 1024) (CLIP-L's tokens and width) are wrong
    # by O(1) on 8 fake CPU devices, (4, 17, 32) is right; likely openxla/xla#40034 (a reshard from
    # partial sums that misses its all-reduce). Both partitioners (Shardy, GSPMD) do it.
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    r = subprocess.run([sys.executable, "-c", REPRO], env=env, cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert float(r.stdout.split("rel_err")[1]) <= 1e-5, r.stdout


def test_a_batch_the_batch_axes_cannot_split_is_named_with_a_mesh_that_can():
    assert parallel.unsplit_batch_note(8, {"data": 1, "fsdp": 8, "context": 1, "tensor": 1}) is None
    assert parallel.unsplit_batch_note(3, {"data": 1, "fsdp": 1, "context": 2, "tensor": 4}) is None
    note = parallel.unsplit_batch_note(8, {"data": 1, "fsdp": 16, "context": 1, "tensor": 1})
    assert note.startswith("global batch 8 does not split over the 16 batch shards (data x fsdp)")
    assert note.endswith("(e.g. fsdp=8,tensor=2)")
    assert "(e.g. fsdp=2,tensor=4)" in parallel.unsplit_batch_note(2, {"data": 2, "fsdp": 4})


def test_a_dimension_that_does_not_divide_is_replicated_with_one_warning_naming_it(monkeypatch):
    """48 heads over tensor=5: the dimension is replicated and the warning names the array, the
    logical axis, its size and the mesh axis, once per case (a second array of that case is silent)."""
    monkeypatch.setattr(parallel, "_REPLICATED_WARNED", set())
    mesh_shape = {"data": 1, "fsdp": 1, "context": 1, "tensor": 5}
    with pytest.warns(UserWarning, match=r"parameter attn/to_q \(3072, 48\): logical axis 'heads' of size 48 does not "
                                         r"divide over mesh axes tensor=5 \(5 shards\): replicated"):
        assert parallel.logical_to_spec(("embed", "heads"), (3072, 48), mesh_shape,
                                        what="parameter attn/to_q (3072, 48)") == P("fsdp", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert parallel.logical_to_spec(("embed", "heads"), (64, 48), mesh_shape) == P("fsdp", None)
        assert parallel.logical_to_spec(("embed", "heads"), (64, 40), mesh_shape) == P("fsdp", "tensor")


def test_the_attention_scheme_counts_the_heads_the_rules_actually_split():
    """attention_parallel.scheme (what runs, and what pipeline.attention_scheme reports): 5 heads do
    not split over tensor=2, so each device holds all 5 and Ulysses (5 % 2) cannot run: ring; the
    old count (5 // 2 = 2 heads per shard) named Ulysses."""
    from mm_jax.models import attention_parallel as ap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ap.scheme(5, {"data": 2, "context": 2, "tensor": 2}) == "ring"
    assert ap.scheme(48, {"context": 2, "tensor": 2}) == "ulysses"
    assert ap.scheme(6, {"context": 4, "tensor": 2}) == "ring"
    assert ap.scheme(48, {"fsdp": 8}) is None
    assert (parallel.batch_shards({"data": 2, "fsdp": 4}), parallel.context_size({"context": 4}),
            parallel.heads_shards(48, {"tensor": 4}), parallel.data_replicas({"data": 2, "fsdp": 4})) == (8, 4, 4, 2)
