"""How the DiT's stacked blocks run: the remat policies, and the blocks covered by scans.

The blocks are one stack (``layers.stack``); ``segments`` covers them with the fewest scans (runs of
plain blocks, and groups of p blocks that start with an adapter block, the paper's every 2nd), and
``run_blocks`` runs them, scanned or unrolled, with the remat policy on the scanned body.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mm_jax.models import layers as L

_cp = jax.checkpoint_policies
REMAT_POLICIES = {
    "none": None,                                              # no remat: everything is saved
    "full": _cp.nothing_saveable,                              # recompute the whole scan body
    "dots": _cp.dots_with_no_batch_dims_saveable,              # save the weight matmuls' outputs
    "dots_all": _cp.checkpoint_dots,                           # save every matmul output
    "save_attention": _cp.save_only_these_names("attention"),  # save the attention output only
    # the same, moved to host memory between the passes (TPU / GPU; pinned host memory)
    "offload_dots": _cp.offload_dot_with_no_batch_dims("device", "pinned_host"),
    "offload_attention": _cp.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=["attention"], offload_src="device",
        offload_dst="pinned_host"),
}


@dataclasses.dataclass(frozen=True)
class Segment:
    """Blocks [start, stop) in groups of ``period``; with ``adapter`` set, the first block of group
    g is adapter block ``adapter + g`` (its index into the stacked conditioning)."""
    start: int
    stop: int
    period: int = 1
    adapter: int | None = None


def segments(num_layers: int, adapter_layers=()) -> list[Segment]:
    """Cover blocks 0..num_layers-1 with the fewest scans: runs of plain blocks, and arithmetic runs
    of adapter blocks with step p as groups of p blocks. The paper's pattern (every 2nd block from
    0, 42 blocks) is one segment of 21 groups of 2; any other set of adapter blocks still works."""
    a = sorted(adapter_layers)
    out, pos, k = [], 0, 0
    while k < len(a):
        if a[k] > pos:
            out.append(Segment(pos, a[k]))
        p = a[k + 1] - a[k] if k + 1 < len(a) else 1
        m = 1
        while k + m < len(a) and a[k + m] - a[k + m - 1] == p:
            m += 1
        # the last group must end before the next adapter block and before the end
        while m > 1 and (a[k + m - 1] + p > num_layers or (k + m < len(a) and a[k + m] < a[k + m - 1] + p)):
            m -= 1
        if a[k + m - 1] + p > num_layers:
            p = 1
        out.append(Segment(a[k], a[k] + m * p, p, k))
        pos, k = a[k] + m * p, k + m
    if pos < num_layers:
        out.append(Segment(pos, num_layers))
    return out


def run_blocks(blocks, h, temb, tokens, *, kv_lengths=None, cond=None, adapter_layers=(), after=None,
               after_params=None, remat_policy: str = "none", scan_layers: bool = True):
    """The stacked blocks over the joint sequence h (B, S, D) -> (B, S, D). ``cond`` holds one
    entry per block of ``adapter_layers``; ``kv_lengths`` (B,) are the adapter blocks' key lengths
    (the plain blocks see [text, video] only). Without ``cond`` every block is plain.
    ``after(h, tokens, params)`` runs after each block of ``adapter_layers`` with its entry of
    ``after_params`` (stacked like ``cond``); without ``cond`` and ``after`` no block is special.

    The types live in ``dit.py`` and ``dit_embeddings.py`` (which this module must not import):
    ``blocks`` is the stacked ``CogVideoXBlock``, ``tokens`` a ``Tokens``, ``cond`` a ``BlockConditioning``."""
    n = L.stack_size(blocks)
    b = h.shape[0]
    if cond is None and after is None:
        adapter_layers = ()
    plain_lengths = None
    if tokens.extra or tokens.pad:
        plain_lengths = jnp.full((b,), tokens.text + tokens.video, jnp.int32)
    if kv_lengths is None and tokens.pad:
        kv_lengths = jnp.full((b,), tokens.text + tokens.video + tokens.extra, jnp.int32)
    remat = remat_policy != "none"
    policy = REMAT_POLICIES[remat_policy]
    pick = lambda tree, i: jax.tree.map(lambda t: t[i], tree)

    def plain(h, blk, _):
        return blk(h, temb, tokens, plain_lengths), None

    def group(h, grp, g_x):
        g_cond, g_after = g_x
        for j in range(L.stack_size(grp)):
            blk = L.layer(grp, j)
            h = blk(h, temb, tokens, kv_lengths, g_cond) if j == 0 else blk(h, temb, tokens, plain_lengths)
            if j == 0 and after is not None:
                h = after(h, tokens, g_after)
        return h, None

    for seg in segments(n, adapter_layers):
        sub = L.layers_range(blocks, seg.start, seg.stop)
        if seg.adapter is None:
            if scan_layers:
                h, _ = L.scan(plain, h, sub, remat=remat, remat_policy=policy)
            else:
                run = jax.checkpoint(plain, policy=policy) if remat else plain
                for i in range(seg.stop - seg.start):
                    h, _ = run(h, L.layer(sub, i), None)
            continue
        groups = (seg.stop - seg.start) // seg.period
        grouped = jax.tree.map(lambda t: t.reshape(groups, seg.period, *t.shape[1:]), sub)
        g_x = jax.tree.map(lambda t: t[seg.adapter:seg.adapter + groups], (cond, after_params))
        if scan_layers:
            h, _ = L.scan(group, h, grouped, g_x, remat=remat, remat_policy=policy)
        else:
            run = jax.checkpoint(group, policy=policy) if remat else group
            for g in range(groups):
                h, _ = run(h, L.layer(grouped, g), pick(g_x, g))
    return h
