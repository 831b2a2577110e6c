"""Run in a subprocess with 8 fake CPU devices (see test_parallel.py): T5 and the CLIP towers
restored onto a 2x2x2 (data, fsdp, tensor) mesh compute what they compute on one device; their
stacked parameters are split over fsdp x tensor and never over the layers axis.

The sizes avoid a jax 0.10.2 partitioner bug (``test_parallel.py::test_the_xla_resharding_bug_
that_the_encoder_sizes_avoid``): with 5 tokens of width 48 the CLIP vision tower here differed by 4e-2."""
import os
import sys

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mm_jax import checkpoint, parallel

t5_ckpt, vision_ckpt, clip_ckpt = sys.argv[1:4]
assert len(jax.devices()) == 8
rng = np.random.default_rng(0)
ids = rng.integers(0, 80, (4, 40)).astype(np.int32)
mask = np.ones((4, 40), np.int32)
mask[1, 25:] = 0
pixels = rng.standard_normal((4, 56, 56, 3)).astype(np.float32)
text = np.array([[512, 70, 80, 513, 0, 0]] * 4, np.int32)
one = parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")

RUNS = {  # component: (checkpoint, forward, its inputs, a stacked kernel (layers, embed, heads))
    "text_encoder": (t5_ckpt, lambda m, ids, mask: (m(ids), m(ids, mask)), (ids, mask),
                     lambda m: m.encoder.block.layer[0].SelfAttention.q.kernel),
    "image_encoder": (vision_ckpt, lambda m, px: (m(px),) + m(px, all_hidden=True), (pixels,),
                      lambda m: m.encoder.layers.self_attn.q_proj.kernel),
    "clip": (clip_ckpt, lambda m, ids, px: (m.text_embeds(ids), m.image_embeds(px)), (text, pixels),
             lambda m: m.text_model.encoder.layers.self_attn.q_proj.kernel),
}


def run(name, on):
    ckpt, fwd, inputs, _ = RUNS[name]
    m = checkpoint.load_component(ckpt, name, mesh=on)
    batch = lambda a: jax.device_put(a, NamedSharding(on, parallel.logical_to_spec(("batch",), a.shape,
                                                                                 dict(on.shape))))
    with jax.set_mesh(on):
        return m, [np.asarray(y) for y in nnx.jit(fwd)(m, *map(batch, inputs))]


for name, (*_, stacked) in RUNS.items():
    _, y1 = run(name, one)
    m8, y8 = run(name, mesh)
    for path, var in nnx.to_flat_state(nnx.state(m8, nnx.Param)):
        want = NamedSharding(mesh, parallel.variable_spec(var, mesh))
        assert var.get_value().sharding.is_equivalent_to(want, var.get_value().ndim), (name, path)
    q = stacked(m8).get_value()
    assert q.sharding.spec == P(None, "fsdp", "tensor"), (name, q.sharding.spec)
    assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1] // 2, q.shape[2] // 2)
    err = max(float(np.max(np.abs(a - b)) / np.max(np.abs(a))) for a, b in zip(y1, y8))
    print(f"{name} max_rel_err={err:.3e}")
    assert err <= 1e-5, (name, err)
