"""Adapter overhead per denoising step vs the plain DiT (same config, same run), and the one-time
face-embedding time (detection + ArcFace + CLIP tower).

CPU (default): the tiny DiT preset with the spec's adapter scaled to it, CFG batch of 2.
GPU (--gpu): 5B at 49x480x720 bf16 with the spec's 5B adapter (random weights).

    python benchmarks/adapter.py [--gpu] [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import time_it
from mm_jax.models.dit import CogVideoXTransformer3D
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter, count_params, identity_forward


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    if args.gpu:
        dcfg = DiTConfig(dtype="bfloat16", param_dtype="bfloat16")
        acfg = AdapterConfig.for_dit(dcfg, dtype="bfloat16", param_dtype="bfloat16")
        f, h, w = 13, 60, 90
    else:
        dcfg = DiTConfig(num_attention_heads=4, attention_head_dim=32, num_layers=4, text_embed_dim=64,
                         time_embed_dim=32, sample_width=24, sample_height=16)
        acfg = AdapterConfig.for_dit(dcfg, clip_width=64, width=64, depth=2, heads=2, head_dim=32, id_mlp_hidden=64)
        f, h, w = 5, 16, 24
    dt = jnp.dtype(dcfg.dtype)
    dit = nnx.jit(lambda: CogVideoXTransformer3D(dcfg, rngs=nnx.Rngs(0)))()
    ad = nnx.jit(lambda: MagicMirrorAdapter(acfg, rngs=nnx.Rngs(1)))()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, f, h, w, dcfg.in_channels)), dt)
    text = jnp.asarray(rng.standard_normal((2, 226, dcfg.text_embed_dim)), dt)
    t = jnp.array([500, 500])
    clip = jnp.asarray(rng.standard_normal((1, 257, acfg.clip_width)), dt)
    e_id = jnp.asarray(rng.standard_normal((1, acfg.id_dim)), dt)
    x_id, x_face = ad.encode(clip, e_id)
    x_id, x_face = jnp.concatenate([x_id, x_id]), jnp.concatenate([x_face, x_face])
    has_id = jnp.array([False, True])

    plain = nnx.jit(lambda m, x, c, t: m(x, c, t))
    with_id = nnx.jit(lambda m, a, x, c, t, xi, xf, hi: identity_forward(m, a, x, c, t, x_id=xi, x_face=xf, has_id=hi))
    sync = lambda y: y.block_until_ready()
    sync(plain(dit, x, text, t))
    sync(with_id(dit, ad, x, text, t, x_id, x_face, has_id))
    tp = time_it(lambda: plain(dit, x, text, t), args.repeat, sync)
    ti = time_it(lambda: with_id(dit, ad, x, text, t, x_id, x_face, has_id), args.repeat, sync)
    enc = nnx.jit(lambda a, c, e: a.encode(c, e))
    sync(enc(ad, clip, e_id)[0])
    te = time_it(lambda: enc(ad, clip, e_id)[0], args.repeat, sync)
    dit_n = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(dit, nnx.Param)))
    print(f"backend {jax.default_backend()}, DiT {dcfg.num_layers} blocks width {dcfg.inner_dim}, latent {f}x{h}x{w}, "
          f"CFG batch 2, {dcfg.dtype}")
    print(f"params: DiT {dit_n:,}, adapter {count_params(acfg):,} (+{100 * count_params(acfg) / dit_n:.1f}%)")
    print(f"plain DiT step:   {tp * 1e3:9.1f} ms")
    print(f"with identity:    {ti * 1e3:9.1f} ms   overhead ratio {ti / tp:.3f}")
    print(f"perceivers (once per reference): {te * 1e3:.1f} ms")
    if not args.gpu:
        from mm_jax.face import FaceAnalyzer
        from mm_jax.demo.standin_faces import face_image, make_pack

        fa = FaceAnalyzer(make_pack(Path(tempfile.mkdtemp())))
        img = face_image()
        fa.analyze(img)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            fa.analyze(img)
        print(f"face detection + alignment + ArcFace (stand-in models, once per reference): "
              f"{(time.perf_counter() - t0) / args.repeat * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
