"""Run in a subprocess with 8 fake CPU devices (see test_train_step.py): one training step on a
2x2x2 (data, fsdp, tensor) mesh gives the params, optimizer moments and loss of the 1-device step."""
import os
import sys
from pathlib import Path

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from mm_jax import config, parallel
from mm_jax.demo import assets
from mm_jax.training.models import load_models
from mm_jax.training.optim import make_optimizer
from mm_jax.training.step import init_state, make_train_step, put_batch

assert len(jax.devices()) == 8
backbone, adapter = assets.tiny_models(Path(sys.argv[1]))
cfg = config.load("configs/video.py:tiny", [f"model.checkpoint={backbone}", f"model.adapter={adapter}"])
rng = np.random.default_rng(0)
B = 4
batch = dict(pixels=rng.uniform(-1, 1, (B, 9, 64, 64, 3)).astype(np.float32),
             face_mask=np.zeros((B, 9, 64, 64), np.float32),
             input_ids=rng.integers(3, 40, (B, 32)).astype(np.int32), class_index=np.array([1, 2, -1, 0], np.int32),
             e_id=rng.standard_normal((B, 512)).astype(np.float32),
             ref_pixels=rng.standard_normal((B, 224, 224, 3)).astype(np.float32),
             has_id=np.array([True, True, False, True]))
batch["face_mask"][:, :, 16:40, 24:48] = 1


def one_step(mesh):
    models = load_models(cfg.model, dict(cfg.adapter), mesh)
    tx = make_optimizer(cfg.optimizer)
    state, aux = init_state(models, tx, mesh)
    step = make_train_step(models, tx, state, aux, cfg.train, mesh)
    with jax.set_mesh(mesh):
        params, opt, metrics = step(state.params, state.opt_state, aux[-1], put_batch(batch, mesh), 3)
    return params, opt, metrics


p1, o1, m1 = one_step(parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1]))
mesh = parallel.make_mesh("data=2,fsdp=2,tensor=2")
p8, o8, m8 = one_step(mesh)
# the adapter's parameters are really split over the mesh (the stacked CAN linears over tensor)
can = p8["adapter"]["can"]["kernel"]  # (adapter blocks, time_embed_dim, 14 D)
assert can.sharding.spec == P(None, None, "tensor"), can.sharding.spec
assert len(can.sharding.device_set) == 8


def rel_err(x, y):
    """max|x - y| / max|x| over a whole tree (conftest's max_rel_err, tree-wide): leaves whose true
    gradient is zero (the key bias, which softmax ignores) hold only rounding noise in their moments."""
    xs, ys = [np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(x)], [np.asarray(v, np.float64).ravel()
                                                                             for v in jax.tree.leaves(y)]
    return float(max(np.abs(a - b).max() for a, b in zip(xs, ys)) / max(np.abs(a).max() for a in xs))


adam1, adam8 = o1[1][0], o8[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
errs = {"params": rel_err(p1, p8), "mu": rel_err(adam1.mu, adam8.mu), "nu": rel_err(adam1.nu, adam8.nu),
        "loss": abs(float(m1["loss"]) - float(m8["loss"])) / abs(float(m1["loss"]))}
print(" ".join(f"{k}_rel_err {v:.3e}" for k, v in errs.items()), f"loss {float(m1['loss']):.6f}")
assert all(v <= 1e-5 for v in errs.values()), errs
