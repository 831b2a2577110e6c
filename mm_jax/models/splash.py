"""The TPU splash-attention kernel behind the ``attention()`` registry (``ATTENTION_IMPLS["splash"]``).

``jax.experimental.pallas.ops.tpu.splash_attention`` wants (N, S, Dh) per example with Dh a
multiple of the 128-lane width and S a multiple of its block sizes, applies no scale, and knows
masks only as static block masks plus *segment ids*. This module adapts the DiT's call:

* q/k/v (B, S, N, Dh) -> (B, N, S', Dh'), ``vmap`` over the batch;
* Dh = 64 is zero-padded to 128: the extra lanes add 0 to q.k and give 0 output columns that are
  sliced off; the softmax scale (1/sqrt(64), not 1/sqrt(128)) is applied to q explicitly;
* S is padded to a multiple of the block; key_mask and padding become segment ids: every query
  has id 0, valid keys id 0, masked and padded keys id 1, which no query has, so they get zero
  weight (padded queries see the real keys and are sliced off);
* one device's call: under a multi-device mesh ``layers.attention`` runs it per shard in
  ``shard_map`` (``attention_parallel``), since a Pallas call is not auto-partitioned.

Memory: the kernel keeps one (block_q, block_kv) fp32 tile of scores per head in VMEM plus the
running max/sum; nothing of size S x S is ever in HBM. The HBM working set is q, k, v and the
output (padded), 4 * B * N * S' * Dh' elements.

The Pallas TPU module is imported lazily, so importing this file (and mm_jax) never fails on CPU.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

LANES = 128          # TPU lane width: the head dim is padded to a multiple of this
MAX_BLOCK = 512      # block_q = block_kv for long sequences (maxtext's choice for v5e)
QUERY_ID, HIDDEN_ID = 0, 1


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def block_size(seq_len: int, max_block: int = MAX_BLOCK) -> int:
    """The kernel block for a sequence: ``max_block``, or less for short sequences (a multiple of 128)."""
    return min(max_block, _round_up(seq_len, LANES))


def padded_sizes(s: int, t: int, dh: int, max_block: int = MAX_BLOCK) -> tuple[int, int, int, int, int]:
    """(block_q, block_kv, S', T', Dh') that the kernel runs at for q length ``s``, kv length ``t``."""
    bq, bkv = block_size(s, max_block), block_size(t, max_block)
    return bq, bkv, _round_up(s, bq), _round_up(t, bkv), _round_up(dh, LANES)


def segment_ids(b: int, s: int, t: int, sp: int, tp: int, key_mask: jax.Array | None):
    """Segment ids (q: (B, S'), kv: (B, T')) that hide padded and masked keys from every query."""
    q_ids = jnp.full((b, sp), QUERY_ID, jnp.int32)
    valid = jnp.arange(tp)[None, :] < t
    if key_mask is not None:
        valid = valid & jnp.pad(key_mask.astype(bool), ((0, 0), (0, tp - t)))
    kv_ids = jnp.where(valid, QUERY_ID, HIDDEN_ID).astype(jnp.int32)
    return q_ids, jnp.broadcast_to(kv_ids, (b, tp))


def pad_inputs(q, k, v, key_mask, scale, max_block: int = MAX_BLOCK):
    """(B, S, N, Dh) inputs -> head-major padded (B, N, S', Dh') q*scale, k, v and segment ids."""
    b, s, n, dh = q.shape
    t = k.shape[1]
    scale = dh ** -0.5 if scale is None else scale
    bq, bkv, sp, tp, dhp = padded_sizes(s, t, dh, max_block)
    pad = lambda x, length: jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, dhp - dh))).transpose(0, 2, 1, 3)
    qp = pad(q * jnp.asarray(scale, q.dtype), sp)
    kp, vp = pad(k, tp), pad(v, tp)
    return (qp, kp, vp, *segment_ids(b, s, t, sp, tp, key_mask)), (bq, bkv)


def reference_kernel(q, k, v, q_ids, kv_ids):
    """What the kernel computes for one example, written out (used by the CPU test): q/k/v
    (N, S', Dh') with q already scaled -> (N, S', Dh'). Logits of keys whose segment id differs
    from the query's are replaced by a large negative number, as in the kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    logits = jnp.einsum("nsd,ntd->nst", q.astype(jnp.float32), k.astype(jnp.float32))
    same = q_ids[:, None] == kv_ids[None, :]
    logits = jnp.where(same[None], logits, sk.DEFAULT_MASK_VALUE)
    p = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("nst,ntd->nsd", p, v.astype(jnp.float32)).astype(q.dtype)


def make_kernel(heads: int, sp: int, tp: int, bq: int, bkv: int, interpret: bool = False):
    """A single-device splash MHA kernel over a full (unmasked) block pattern; masking comes from
    the segment ids. Backward block sizes are set so the kernel is differentiable (training).
    Built anew in each trace (0.29 s for the 5B's 48 heads x 17920 tokens): its mask-info arrays are
    made while tracing, so a kernel cached across traces held one trace's tracers, which the next
    trace took as arguments (the same step lowered twice in one process differed and the
    planner's compile cache missed)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    mask = sm.MultiHeadMask([sm.FullMask((sp, tp)) for _ in range(heads)])
    sizes = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    return sk.make_splash_mha_single_device(mask, block_sizes=sizes, interpret=interpret)


def _local(q, k, v, key_mask, scale, *, interpret: bool, kernel_fn=None, max_block: int = MAX_BLOCK):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    s, dh = q.shape[1], q.shape[3]
    (qp, kp, vp, q_ids, kv_ids), (bq, bkv) = pad_inputs(q, k, v, key_mask, scale, max_block)
    if kernel_fn is None:
        kernel = make_kernel(q.shape[2], qp.shape[2], kp.shape[2], bq, bkv, interpret)
        out = jax.vmap(lambda a, b_, c, qi, ki: kernel(a, b_, c, SegmentIds(qi, ki)))(qp, kp, vp, q_ids, kv_ids)
    else:
        out = jax.vmap(kernel_fn)(qp, kp, vp, q_ids, kv_ids)
    return out.transpose(0, 2, 1, 3)[:, :s, :, :dh]


def splash_attention(q, k, v, key_mask=None, scale=None, *, interpret: bool = False, kernel_fn=None,
                     max_block: int = MAX_BLOCK):
    """softmax(q k^T * scale + mask) v through the splash kernel.

    q: (B, S, N, Dh), k/v: (B, T, N, Dh), key_mask: (B, T) bool (True = attend) -> (B, S, N, Dh).
    ``interpret``: run the Pallas kernel in interpret mode (CPU). ``kernel_fn``: replace the kernel
    by ``fn(q, k, v, q_ids, kv_ids)`` on one example (e.g. ``reference_kernel``), keeping all the
    padding and segment-id plumbing. ``max_block``: the largest block_q/block_kv.
    """
    from mm_jax.models.platform import target_platform

    platform = target_platform()
    if kernel_fn is None and not interpret and platform != "tpu":
        raise ValueError(f"attention implementation 'splash' needs a TPU (compiling for {platform!r}); "
                         "choose 'chunked' or 'xla', or leave attention_impl unset for the backend default")
    return _local(q, k, v, key_mask, scale, interpret=interpret, kernel_fn=kernel_fn, max_block=max_block)
