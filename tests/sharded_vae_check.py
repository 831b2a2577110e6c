"""Run in a subprocess with 8 fake CPU devices (see test_vae.py): the tiled VAE decode spread over
the devices of a mesh equals the one-device tiled decode, on a mesh with more devices than any
decode has tiles (8 devices, 5 tiles) and on one with fewer (3 devices: padded to 6). Every tile has one
shape (the edge tile zero-padded), so the decode is one shard_map."""
import os
import sys
from pathlib import Path

assert "xla_force_host_platform_device_count=8" in os.environ.get("XLA_FLAGS", "")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mm_jax, not an installed one
import jax
import numpy as np

from mm_jax import checkpoint, parallel, pipeline

ckpt = sys.argv[1]
assert len(jax.devices()) == 8
# pixel tiles 48x40 (latent 6x5, stride 5x4, blend 8x8 pixels): a geometry whose tiles align
tiling = dict(use_tiling=True, tile_sample_min_height=48, tile_sample_min_width=40)
# one row of 3 x columns 5|5|5|5|2: 5 tiles, the last padded to 3x5
z = np.random.default_rng(0).standard_normal((1, 2, 3, 18, 4)).astype(np.float32)


def decode(mesh):
    vae = checkpoint.load_component(ckpt, "vae", mesh=mesh, **tiling)
    with jax.set_mesh(mesh):
        traced = pipeline.decode_fn().trace(vae, z)
        return np.asarray(traced.lower().compile()(vae, z)), str(traced.jaxpr).count("shard_map[")


one, maps = decode(parallel.make_mesh({"fsdp": 1}, devices=jax.devices()[:1]))
assert maps == 0, maps
assert one.shape[2:4] == (24, 144), one.shape  # 8x the latents: the tiles land where they belong
for spec, devices in (("data=2,fsdp=2,tensor=2", jax.devices()), ("context=3", jax.devices()[:3])):
    got, maps = decode(parallel.make_mesh(spec, devices=devices))
    err = float(np.max(np.abs(got - one)) / np.max(np.abs(one)))
    print(f"mesh={spec} shard_maps={maps} max_rel_err={err:.3e}")
    assert maps == 1, maps  # one tile shape
    assert err <= 1e-4, err
