"""Run in a subprocess with 8 fake CPU devices (see test_parallel.py): the DiT restored onto a
2x2x2 mesh computes what it computes on one device, and its params carry the declared shardings."""
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from mm_jax import checkpoint, parallel

ckpt = sys.argv[1]
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
cfg = checkpoint.load_config(ckpt, "transformer")
x = rng.standard_normal((4, 2, 8, 12, cfg.in_channels), dtype=np.float32)
text = rng.standard_normal((4, 7, cfg.text_embed_dim), dtype=np.float32)
t = np.array([999, 500, 17, 0])

one = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
m1 = checkpoint.load_component(ckpt, "transformer", mesh=one)
with jax.set_mesh(one):
    y1 = np.asarray(nnx.jit(lambda m, *a: m(*a))(m1, x, text, t))

mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
m8 = checkpoint.load_component(ckpt, "transformer", mesh=mesh)
checked = 0
for path, var in nnx.to_flat_state(nnx.state(m8, nnx.Param)):
    want = NamedSharding(mesh, parallel.variable_spec(var, mesh))
    got = var.get_value().sharding
    assert got.is_equivalent_to(want, var.get_value().ndim), (path, got, want)
    checked += 1
q = m8.transformer_blocks.attn1.to_q.kernel.get_value()  # (layers, D, D): the stack is not split
assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor"), q.sharding.spec
assert len(q.addressable_shards) == 8
assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
with jax.set_mesh(mesh):
    xs = jax.device_put(x, NamedSharding(mesh, parallel.logical_to_spec(("batch",), x.shape, dict(mesh.shape))))
    y8 = np.asarray(nnx.jit(lambda m, *a: m(*a))(m8, xs, text, t))
err = float(np.max(np.abs(y8 - y1)) / np.max(np.abs(y1)))
print(f"params_checked={checked} max_rel_err={err:.3e}")
assert err <= 1e-5, err
