"""The splash-attention adapter (mm_jax/models/splash.py) on CPU.

The Pallas TPU kernel itself runs in Pallas **interpret mode** (``interpret=True``), which works
on CPU at these tiny sizes, with all of our padding (odd sequence lengths, head dim 64 -> 128)
and segment-id masking around it. A second check swaps the kernel for a written-out
softmax over segment ids (``splash.reference_kernel``) with the same plumbing. Both are compared
with plain, unpadded float64 attention computed here in numpy.
"""
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax.models import layers, splash
from tests.conftest import fake_devices_env, ROOT, max_rel_err


def plain_attention(q, k, v, key_mask, scale):
    """softmax(q k^T * scale, masked keys at -inf) v in float64, q (B, S, N, Dh)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("bsnd,btnd->bnst", q, k) * scale
    logits = np.where(np.asarray(key_mask)[:, None, None, :], logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bnst,btnd->bsnd", p / p.sum(-1, keepdims=True), v)


def inputs(s, dh=64, b=2, n=2, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(kk, (b, s, n, dh), jnp.float32) for kk in ks)
    mask = np.ones((b, s), bool)
    mask[0, 3:s // 3] = False  # like the CFG batch's hidden face tokens: a span of keys masked in one example
    return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("s,max_block", [(201, 512), (301, 128)])  # one padded block; three blocks, last one padded
def test_interpreted_kernel_with_padding_and_key_mask_equals_plain_attention(s, max_block):
    q, k, v, mask = inputs(s)
    out = splash.splash_attention(q, k, v, mask, 0.125, interpret=True, max_block=max_block)
    err = max_rel_err(out, plain_attention(q, k, v, mask, 0.125))
    print(f"S={s} block<={max_block}: max rel err {err:.2e}")
    assert err < 1e-5


def test_segment_id_plumbing_with_the_written_out_kernel_equals_plain_attention():
    q, k, v, mask = inputs(77, seed=1)
    out = splash.splash_attention(q, k, v, mask, None, kernel_fn=splash.reference_kernel)
    assert max_rel_err(out, plain_attention(q, k, v, mask, 64 ** -0.5)) < 1e-5


def test_padded_sizes_are_lane_and_block_multiples():
    assert splash.padded_sizes(17808, 17808, 64) == (512, 512, 17920, 17920, 128)
    assert splash.padded_sizes(201, 201, 64) == (256, 256, 256, 256, 128)


def test_splash_is_registered_and_refuses_cpu_without_interpret_mode():
    assert "splash" in layers.ATTENTION_IMPLS
    q, k, v, mask = inputs(16)
    with pytest.raises(ValueError, match="needs a TPU"):
        layers.attention(q, k, v, key_mask=mask, implementation="splash")


def test_importing_mm_jax_does_not_import_the_pallas_tpu_module():
    code = "import sys, mm_jax.models.dit, mm_jax.pipeline; print(any('pallas.ops.tpu' in m for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("mesh", ["data=1,fsdp=2,tensor=2", "fsdp=2,context=2", "context=4"])
def test_sharded_call_runs_the_kernel_per_shard_under_a_mesh(mesh):
    """Under a mesh ``layers.attention`` runs the (interpreted) kernel per shard in shard_map:
    batch/heads split, and the sequence split over ``context`` joined by Ulysses; key lengths
    hide a suffix of each row (the DiT's padding and masked identity tokens)."""
    code = textwrap.dedent(f"""
        import functools
        import jax, jax.numpy as jnp, numpy as np
        from mm_jax import parallel
        from mm_jax.models import layers, splash
        from tests.test_splash import inputs, plain_attention
        from tests.conftest import max_rel_err
        layers.ATTENTION_IMPLS["splash_interpret"] = lambda q, k, v, m, n, s: splash.splash_attention(
            q, k, v, layers._key_mask(m, n, k.shape[1]), s, interpret=True)
        q, k, v, _ = inputs(40, n=4)
        lengths = jnp.array([40, 33], jnp.int32)
        with jax.set_mesh(parallel.make_mesh("{mesh}")):
            out = jax.jit(lambda q, k, v, n: layers.attention(q, k, v, kv_lengths=n, scale=0.125,
                                                              implementation="splash_interpret"))(q, k, v, lengths)
        mask = np.arange(40)[None, :] < np.asarray(lengths)[:, None]
        print(max_rel_err(out, plain_attention(q, k, v, mask, 0.125)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=fake_devices_env(4))
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_a_traced_call_leaves_no_tracer_behind():
    """The kernel is built in each trace: one kept from an earlier trace (an lru_cache) carried that
    trace's mask arrays as tracers, which the next lowering for a TPU took as extra arguments (the
    same step lowered to two programs, and the planner's compile cache missed)."""
    q, k, v, _ = inputs(64)
    f = lambda q, k, v: splash.splash_attention(q, k, v, interpret=True)
    with jax.checking_leaks():
        first, second = (jax.jit(f).lower(q, k, v).as_text() for _ in range(2))
    assert first == second
