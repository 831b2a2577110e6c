"""Attention over a device mesh: batch and heads split as the logical rules say, and the sequence
split over the ``context`` mesh axis (context parallelism). Mesh axes are named only in ``mm_jax.parallel``.

Under a mesh, ``layers.attention`` calls ``sharded_attention``, which runs the backend's kernel
per shard inside ``shard_map`` (a Pallas kernel is not partitioned automatically; cuDNN and XLA
get the same explicit layout). q/k/v arrive ``(B, S, N, Dh)`` with B over the batch axes, S over
``context`` and N over ``tensor``. With ``context`` > 1 one of two schemes joins the sequence:

* **Ulysses** (DeepSpeed-Ulysses): an all-to-all turns sequence shards into head shards
  ``(B, S/c, N, Dh) -> (B, S, N/c, Dh)``, each device runs the kernel over the whole sequence for
  its heads, and a second all-to-all turns the output back. Needs the local heads N/tensor to be
  a multiple of c (48 heads: c = 2, 3, 4, 6, 8, 12, 16, 24). Two all-to-alls of q, k, v and o per
  call; the kernel sees the full sequence, so masks (key lengths) are the global ones.
* **Ring**: each device keeps its query block and passes the key/value blocks around the
  ``context`` ring (``ppermute``), combining the blocks with an online softmax in float32. Works
  for any c; c - 1 permutes of k and v per call. The per-block product is written out in XLA
  (einsum), not a fused kernel, one query chunk at a time (``ring_query_chunk``: at most
  ``RING_SCORE_BYTES`` of float32 scores per chunk).

``parallelism``: "ulysses", "ring" or None (Ulysses when the heads divide, else ring). Masks are
per-row key lengths (``kv_lengths``: row b sees keys [0, kv_lengths[b])), so a padded sequence
tail and masked identity tokens (a suffix) stay hidden under every scheme.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mm_jax import parallel

PARALLELISMS = ("ulysses", "ring")
_NEG = -1e30  # a finite "minus infinity": a fully masked block must not make exp(-inf - -inf) = NaN
RING_SCORE_BYTES = 256 * 2 ** 20  # float32 scores of one ring query chunk (``ring_query_chunk``)
RING_QUERY_CHUNK: int | None = None  # a fixed chunk instead (tests: chunks that do not divide the block)


def choose(local_heads: int, context: int, requested: str | None = None) -> str:
    """The scheme for ``context`` devices: ``requested``, or Ulysses when it divides the heads."""
    if requested is not None and requested not in PARALLELISMS:
        raise ValueError(f"attention_parallelism={requested!r}; choose from {PARALLELISMS} (or leave it unset)")
    if requested == "ulysses" and local_heads % context:
        raise ValueError(f"Ulysses attention needs the heads per tensor shard ({local_heads}) to be a multiple of the "
                         f"context axis ({context}); use attention_parallelism='ring' or another mesh")
    if requested:
        return requested
    return "ulysses" if local_heads % context == 0 else "ring"


def scheme(heads: int, mesh=None, requested: str | None = None) -> str | None:
    """The scheme self-attention of ``heads`` heads runs with on ``mesh`` (default: the current
    one): None without a context axis, else ``choose`` over the heads each tensor shard holds, as
    ``parallel.heads_shards`` splits them (all of them where the heads do not divide). What
    ``sharded_attention`` runs and ``pipeline.attention_scheme`` reports, from one function."""
    context = parallel.context_size(mesh)
    if context == 1:
        return None
    return choose(heads // parallel.heads_shards(heads, mesh), context, requested)


def ulysses(kernel: Callable, q, k, v, kv_lengths, *, axis: str | None = None):
    """Inside ``shard_map``: q/k/v (b, S/c, n, Dh) sequence shards -> (b, S/c, n, Dh), the kernel
    ``kernel(q, k, v, kv_lengths)`` run over the full sequence on n/c heads."""
    axis = axis or parallel.context_axis()
    # q, k and v travel as one array: one all-to-all per call instead of three independent ones
    # (fewer collective launches; XLA:CPU's in-process collectives could also deadlock when the
    # three ran concurrently on a busy 2-core host)
    qkv = jax.lax.all_to_all(jnp.stack([q, k, v]), axis_name=axis, split_axis=3, concat_axis=2, tiled=True)
    o = kernel(qkv[0], qkv[1], qkv[2], kv_lengths)
    return jax.lax.all_to_all(o, axis_name=axis, split_axis=1, concat_axis=2, tiled=True)


def ring_query_chunk(b: int, s: int, n: int, budget: int | None = None) -> int:
    """Query rows per block of a ring step so that one float32 score block (b, n, rows, s) stays
    within ``budget`` bytes (``RING_SCORE_BYTES``): the whole block when it fits. At real size
    (context=4: s ~ 4.4k, 48 heads) the unchunked block is ~3.8 GB, with its exponentials twice that."""
    budget = RING_SCORE_BYTES if budget is None else budget
    most = int(max(1, min(s, budget // max(1, b * n * s * 4))))
    chunks = -(-s // most)
    return -(-s // chunks)  # the same number of chunks, balanced: the last one pads the fewest rows


def ring(q, k, v, kv_lengths, scale: float, *, axis: str | None = None, size: int, q_chunk: int | None = None):
    """Inside ``shard_map``: exact attention of the local query block over every key/value block,
    which travel once around the ring. q/k/v (b, s, n, Dh) with s = S/c -> (b, s, n, Dh). The query
    block is processed ``q_chunk`` rows at a time within each step (``ring_query_chunk``), so the
    float32 scores never exceed one chunk's; the online softmax makes the result independent of it."""
    b, s, n, dh = q.shape
    axis = axis or parallel.context_axis()
    me = jax.lax.axis_index(axis)
    q_chunk = q_chunk or RING_QUERY_CHUNK
    qc = ring_query_chunk(b, s, n) if q_chunk is None else max(1, min(s, q_chunk))
    nq = -(-s // qc)
    qf = q.astype(jnp.float32) * scale
    if nq * qc != s:  # pad the queries to whole chunks; the padded rows are dropped at the end
        qf = jnp.pad(qf, ((0, 0), (0, nq * qc - s), (0, 0), (0, 0)))
    qf = qf.reshape(b, nq, qc, n, dh).transpose(1, 0, 2, 3, 4)  # (nq, b, qc, n, dh)
    perm = [(i, (i + 1) % size) for i in range(size)]
    lengths = jnp.full((b,), size * s, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)

    def step(i, carry):
        o, m, l, kc, vc = carry
        src = (me - i) % size  # whose key/value block this device holds at step i
        pos = src * s + jnp.arange(s)
        valid = (pos[None, :] < lengths[:, None])[:, None, None, :]  # (b, 1, 1, s_k)
        kf, vf = kc.astype(jnp.float32), vc.astype(jnp.float32)

        def block(args):  # one query chunk against this step's key/value block
            qb, ob, mb, lb = args
            sc = jnp.where(valid, jnp.einsum("bqnh,bknh->bnqk", qb, kf), _NEG)
            m_new = jnp.maximum(mb, sc.max(-1))
            p = jnp.exp(sc - m_new[..., None])
            corr = jnp.exp(mb - m_new)
            return (ob * corr[..., None] + jnp.einsum("bnqk,bknh->bnqh", p, vf), m_new,
                    lb * corr + p.sum(-1))

        o, m, l = jax.lax.map(block, (qf, o, m, l))
        kvc = jax.lax.ppermute(jnp.stack([kc, vc]), axis, perm)  # one transfer for both
        return o, m, l, kvc[0], kvc[1]

    init = (jnp.zeros((nq, b, n, qc, dh), jnp.float32), jnp.full((nq, b, n, qc), _NEG, jnp.float32),
            jnp.zeros((nq, b, n, qc), jnp.float32), k, v)
    o, _, l, _, _ = jax.lax.fori_loop(0, size, step, init)
    o = (o / l[..., None]).transpose(1, 0, 3, 2, 4).reshape(b, nq * qc, n, dh)[:, :s]  # (b, s, n, dh)
    return o.astype(q.dtype)


def specs(shape: tuple[int, ...]) -> tuple[P, P]:
    """(q/k/v spec, kv_lengths spec) on the current mesh for a (B, S, N, Dh) array, by the rules."""
    qs = parallel.logical_to_spec(("batch", "seq", "act_heads", None), shape, parallel.mesh_shape(),
                                  what=f"attention q/k/v {tuple(shape)}")
    return qs, P(qs[0])


def sharded_attention(kernel: Callable, q, k, v, kv_lengths, scale: float | None, *,
                      parallelism: str | None = None):
    """``kernel(q, k, v, kv_lengths)`` (one device's attention) over the current mesh: q (B, S, N,
    Dh), k/v (B, T, N, Dh) -> (B, S, N, Dh), with the sequence joined over the context axis when it
    is split (self-attention only; cross-attention keeps its sequence whole). A self-attention
    sequence that does not divide the context axis (CLIP's 257 tokens) runs whole on every device
    of it, with ``logical_to_spec``'s warning; the DiT pads its sequence so that it always splits."""
    qs, ls = specs(q.shape)
    if q.shape[1] != k.shape[1]:  # cross-attention (the perceivers): short, the sequence stays whole
        qs = P(qs[0], None, *qs[2:])
    c = parallel.spec_shards(qs[1])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    lengths = jnp.full(q.shape[:1], k.shape[1], jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
    how = scheme(q.shape[2], None, parallelism) if c > 1 else None

    def local(q, k, v, lengths):
        if how == "ulysses":
            return ulysses(kernel, q, k, v, lengths)
        if how == "ring":
            return ring(q, k, v, lengths, scale, size=c)
        return kernel(q, k, v, lengths)

    return jax.shard_map(local, in_specs=(qs, qs, qs, ls), out_specs=qs, check_vma=False)(q, k, v, lengths)
