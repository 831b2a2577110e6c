"""Run on 8 (fake) devices: the DiT + adapter forward of a CFG batch [uncond without face | cond
with face] on context-parallel meshes, with Ulysses and ring attention, equals the 1-device
forward, and the compiled program holds the scheme's collective (all-to-all for Ulysses,
collective-permute for ring), so the sequence really was split; ring also with its query block in
chunks of 3 rows. Prints one line per case and fails on the first error above 1e-5.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/context_parallel_check.py
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from mm_jax import parallel  # noqa: E402
from mm_jax.models import attention_parallel  # noqa: E402
from mm_jax.models.dit import CogVideoXTransformer3D  # noqa: E402
from mm_jax.models.dit_config import DiTConfig  # noqa: E402
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter  # noqa: E402

# each scheme on the whole mesh as context, beside the CFG pair on data, and with heads on tensor
CASES = [("context=8", "ring"), ("context=8", "ulysses"), ("data=2,context=4", "ulysses"), ("data=2,context=4", "ring"),
         ("data=2,context=2,tensor=2", "ulysses"), ("data=2,context=2,tensor=2", "ring")]
# ring with its query block in chunks of 3 rows (the padded sequence is a multiple of 8, so a block of
# 8 or 16 rows ends in a padded chunk)
CHUNKED = [("context=8", "ring"), ("data=2,context=4", "ring")]


def models(parallelism=None):
    cfg = DiTConfig(num_attention_heads=8, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=3,
                    text_embed_dim=32, time_embed_dim=16, sample_width=12, sample_height=8, sample_frames=9,
                    max_text_seq_length=7, attention_impl="xla", attention_parallelism=parallelism)
    dit = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0))
    acfg = AdapterConfig.for_dit(cfg, clip_width=24, id_dim=16, width=32, depth=2, heads=2, head_dim=16,
                                 num_face_tokens=4, num_id_tokens=3, id_mlp_hidden=32, attention_impl="xla")
    ad = MagicMirrorAdapter(acfg, rngs=nnx.Rngs(1))
    key = jax.random.key(7)
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(ad, nnx.Param))):  # trained-like: nothing at zero
        v = var.get_value()
        var.set_value(v + 0.2 * jax.random.normal(jax.random.fold_in(key, i), v.shape, v.dtype))
    return dit, ad


@jax.jit
def forward(dit, ad, lat, text, t, clip, e_id, has_id):
    x_id, x_face = ad.encode(clip, e_id)
    fused = ad.fuse(text, x_id, jnp.full((text.shape[0],), 2))
    return ad.dit_forward(dit, lat, jnp.where(has_id[:, None, None], fused, text), t, x_face, x_id, has_id)


def main() -> int:
    rng = np.random.default_rng(0)
    args = (rng.standard_normal((2, 2, 8, 12, 4), dtype=np.float32), rng.standard_normal((2, 7, 32), dtype=np.float32),
            np.array([999, 999]), rng.standard_normal((2, 5, 24), dtype=np.float32),
            rng.standard_normal((2, 16), dtype=np.float32), np.array([False, True]))
    dit, ad = models()
    ref = np.asarray(forward(dit, ad, *args))
    worst = 0.0
    for spec, scheme, chunk in [(m, sc, None) for m, sc in CASES] + [(m, sc, 3) for m, sc in CHUNKED]:
        attention_parallel.RING_QUERY_CHUNK = chunk
        mesh = parallel.make_mesh(spec)
        d8, a8 = models(scheme)
        with jax.set_mesh(mesh):
            nnx.update(d8, nnx.state(dit))
            nnx.update(a8, nnx.state(ad))
            parallel.shard_module(d8, mesh)
            parallel.shard_module(a8, mesh)
            compiled = forward.lower(d8, a8, *args).compile()  # compiled once, run and read
            out = np.asarray(compiled(d8, a8, *args))
            hlo = compiled.as_text()
        op = {"ulysses": "all-to-all", "ring": "collective-permute"}[scheme]
        assert op in hlo, f"{spec} {scheme}: no {op} in the compiled program: the sequence was not split"
        err = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        worst = max(worst, err)
        print(f"mesh {spec:28s} {scheme:8s} q_chunk={chunk} max_rel_err={err:.2e}")
        assert err <= 1e-5, (spec, scheme, err)
    print(f"worst={worst:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
