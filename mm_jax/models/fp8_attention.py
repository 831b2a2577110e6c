"""fp8 attention: cuDNN's fp8 flash attention on NVIDIA GPUs (H100), and an emulation of its numerics.

    out = cudnn_fp8_attention(q, k, v, scale)      # GPU: the __cudnn$fmhaSoftmaxF8 custom call
    out = reference_fp8_attention(q, k, v, scale)  # anywhere (XLA ops): the same roundings, for tests

Registered in ``layers.ATTENTION_IMPLS`` as "cudnn-fp8" and "fp8-reference"; ``quantize.quantize_model``
in mode "fp8" switches the DiT's self-attention to "cudnn-fp8" (mode "fp8-linears" keeps it bf16).

What is quantized (current scaling: every call measures its own scales, nothing is carried between
calls). q, k and v are cast to float8_e4m3fn with one scale per tensor from its absolute maximum
(``x8 = x * 448 / amax(x)``; ``descale = amax / 448``; per shard under ``shard_map``, where each
device's call measures its own shard). cuDNN's fp8 SDPA graph (cudnn-frontend ``SDPAFP8Node``) then
computes S = q8 k8^T * scale * descale_q * descale_k in float32, the softmax, P * scale_s cast to
e4m3 (``S_SCALE`` = 448: the probabilities are <= 1, so the whole e4m3 range is used), O = P8 v8 *
descale_s * descale_v, and writes O * scale_o in e4m3 too (jax 0.10.2's lowering gives the output the
inputs' type). |O| <= amax(v) (a convex combination of v's rows), so ``scale_o`` = 224 / amax(v):
half of e4m3's range, headroom for the rounded probabilities summing above 1 (at most by 2^-4). The
output is dequantized (x descale_o) into the compute dtype here.

The emulation rounds where the kernel rounds, as a flash kernel must: it cannot normalize the
probabilities before it has seen every key, so the e4m3 values are the exponentials relative to the
row maximum, exp(S - max) in (0, 1], and the row sum divides the float32 accumulator at the end
(FlashAttention-3's fp8 path). The emulation takes the exact row maximum where the kernel takes
a running one per key block (the same values up to one rescale in float32), so it agrees with the
kernel in distribution, not bit for bit (tensor-core fp8 accumulation is not emulated either).

What the planner's ideal time leaves out: it counts matmul FLOPs only, at the fp8 peak (1979 TOPS
on an H100 SXM). A flash kernel also takes one exponential per (query, key) pair, and an H100 does
those at 3.9 TFLOP/s (FlashAttention-3, Shah et al. 2024): at head dim 64 (4 x 64 = 256 matmul
FLOPs per exponential) that caps attention at ~1000 TFLOP/s, the bf16 matmul peak, so the fp8
kernel's real gain over bf16 is bounded by how well the bf16 kernel overlaps its exponentials.

Masks: jax's fp8 path takes neither a mask nor key lengths ("Expected 'None' for bias, mask,
q_seqlen, and kv_seqlen"), and the Magic Mirror DiT's CFG batch hides its identity tokens from the
negative row by key lengths. ``with_hidden_keys`` masks exactly through one more value channel
(the head dim padded 64 -> 80): see there.

Where fp8 attention cannot run, ``fallback_reason`` says why and ``layers.attention`` runs the
backend's bf16 kernel with a warning (once per reason): not a GPU (CPU, TPU: splash stays bf16),
a head dim (padded, for a masked call) that is not a multiple of 16 or above 256 (jax's inference
check), or ring attention over a context axis (its blocks are XLA einsums, no kernel).
"""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
S_SCALE = E4M3_MAX          # scale_s: softmax probabilities (<= 1) onto e4m3's range
O_HEADROOM = 2.0            # scale_o = E4M3_MAX / O_HEADROOM / amax(v)
IMPLS = ("cudnn-fp8", "fp8-reference")
_WARNED: set[str] = set()


def quantize_per_tensor(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x -> (x8 float8_e4m3fn, descale float32 scalar) with x ~= x8 * descale; one scale from amax(|x|)."""
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf))
    scale = jnp.where(amax > 0, E4M3_MAX / amax, 1.0)
    return jnp.clip(xf * scale, -E4M3_MAX, E4M3_MAX).astype(E4M3), 1.0 / scale


def _round_e4m3(x: jax.Array) -> jax.Array:
    return jnp.clip(x, -E4M3_MAX, E4M3_MAX).astype(E4M3).astype(jnp.float32)


def _quantized_inputs(q, k, v):
    (q8, dq), (k8, dk), (v8, dv) = (quantize_per_tensor(t) for t in (q, k, v))
    scale_o = E4M3_MAX / O_HEADROOM / jnp.maximum(dv * E4M3_MAX, jnp.finfo(jnp.float32).tiny)
    return q8, k8, v8, dq, dk, dv, scale_o


def fp8_params(dq, dk, dv, scale_o) -> dict[str, jax.Array]:
    """jax's ``FP8Params`` for an inference call: every key ``check_fp8_params`` asks for, (1, 1, 1, 1)
    float32; the backward's (amax_d*, *_dO, *_dP, scale_d*) are ones and unused."""
    from jax._src.cudnn.fused_attention_stablehlo import fp8_params_keys

    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    p = {name: one for name in fp8_params_keys}
    p.update(descale_q=dq * one, descale_k=dk * one, descale_v=dv * one, descale_s=one / S_SCALE,
             scale_s=one * S_SCALE, scale_o=scale_o * one, descale_o=one / scale_o)
    return p


def padded_head_dim(h: int) -> int:
    """The head dim of a masked call (``with_hidden_keys``): one more channel, rounded up to 16."""
    return -(-(h + 1) // 16) * 16


def with_hidden_keys(fn, q, k, v, hidden, scale: float | None = None) -> jax.Array:
    """``fn(q, k, v, scale)`` (attention without masks) with the keys where ``hidden`` (B, T) is True
    left out, exactly up to the kernel's roundings: the hidden keys get k = 0 and v = 0, and one more
    value channel (q, k, v padded with zeros to ``padded_head_dim``) is a = max|v| on the hidden keys
    and 0 elsewhere. That channel's output is a * f, f the softmax mass on the hidden keys, so the
    first Dh output channels over (1 - f) are the attention over the seen keys. k = 0 puts the hidden
    keys' scores at 0, below the row maximum over the seen keys in practice, so f stays small (the
    5B's CFG batch hides 32 identity tokens of 17,808). Costs the padded head dim (64 -> 80)."""
    b, t, n, h = k.shape
    scale = h ** -0.5 if scale is None else scale
    hide = hidden[:, :, None, None]
    k, v = jnp.where(hide, 0, k), jnp.where(hide, 0, v)
    a = jnp.maximum(jnp.max(jnp.abs(v.astype(jnp.float32))), jnp.finfo(jnp.float32).tiny)
    hp = padded_head_dim(h)
    pad = ((0, 0), (0, 0), (0, 0), (0, hp - h))
    ind = jnp.broadcast_to(jnp.where(hide, a, 0.0), (b, t, n, 1)).astype(v.dtype)
    vp = jnp.concatenate([v, ind, jnp.zeros((b, t, n, hp - h - 1), v.dtype)], axis=-1)
    o = fn(jnp.pad(q, pad), jnp.pad(k, pad), vp, scale).astype(jnp.float32)
    seen = jnp.maximum(1.0 - o[..., h:h + 1] / a, 1e-6)  # 1 - f (a row that sees no key: garbage, finite)
    return (o[..., :h] / seen).astype(q.dtype)


def cudnn_fp8_attention(q, k, v, scale: float | None = None, hidden=None) -> jax.Array:
    """softmax(q k^T * scale) v on cuDNN's fp8 flash kernel: q (B, S, N, Dh), k/v (B, T, N, Dh) in any
    float dtype -> (B, S, N, Dh) in q's dtype; ``hidden`` (B, T) bool: keys left out
    (``with_hidden_keys``)."""
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention

    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if hidden is not None:
        return with_hidden_keys(cudnn_fp8_attention, q, k, v, hidden, scale)
    q8, k8, v8, dq, dk, dv, scale_o = _quantized_inputs(q, k, v)
    out, _amax_s, _amax_o = dot_product_attention(q8, k8, v8, fp8_params=fp8_params(dq, dk, dv, scale_o),
                                                  scale=float(scale), qkv_layout="BTNH", use_fp8=True)
    return (out.astype(jnp.float32) / scale_o).astype(q.dtype)


def reference_fp8_attention(q, k, v, scale: float | None = None, hidden=None, *, block_q: int = 512,
                            normalized: bool = False) -> jax.Array:
    """The same computation in XLA ops with cuDNN's fp8 roundings (the module docstring): q, k, v per
    tensor in e4m3, the probabilities x ``S_SCALE`` in e4m3, the output x scale_o in e4m3; one query
    block (``block_q`` rows, all heads) at a time under ``lax.map``, each against every key.
    ``normalized``: round the normalized probabilities instead of exp(S - row max) (the SDPA graph's
    literal reading; a flash kernel rounds the latter). ``hidden``: as ``cudnn_fp8_attention``."""
    b, s, n, h = q.shape
    scale = h ** -0.5 if scale is None else scale
    if hidden is not None:
        return with_hidden_keys(lambda *a: reference_fp8_attention(*a, block_q=block_q, normalized=normalized),
                                q, k, v, hidden, scale)
    q8, k8, v8, dq, dk, dv, scale_o = _quantized_inputs(q, k, v)
    bq = min(block_q, s)
    nq = -(-s // bq)
    qf = jnp.pad(q8.astype(jnp.float32), ((0, 0), (0, nq * bq - s), (0, 0), (0, 0)))
    qf = qf.reshape(b, nq, bq, n, h).transpose(1, 0, 2, 3, 4)  # (nq, b, bq, n, h)
    kf, vf = k8.astype(jnp.float32), v8.astype(jnp.float32)

    def one(qb):
        sc = jnp.einsum("bqnh,bknh->bnqk", qb, kf) * (scale * dq * dk)
        p = jnp.exp(sc - jnp.max(sc, axis=-1, keepdims=True))
        l = jnp.sum(p, axis=-1, keepdims=True)
        if normalized:
            p, l = p / l, jnp.ones_like(l)
        p8 = _round_e4m3(p * S_SCALE)
        o = jnp.einsum("bnqk,bknh->bqnh", p8, vf) * (dv / S_SCALE) / l.transpose(0, 2, 1, 3)
        return _round_e4m3(o * scale_o) / scale_o

    o = jax.lax.map(one, qf).transpose(1, 0, 2, 3, 4).reshape(b, nq * bq, n, h)[:, :s]
    return o.astype(q.dtype)


def fallback_reason(impl: str, q, masked: bool, platform: str, ring: bool) -> str | None:
    """Why ``impl`` ("cudnn-fp8" or "fp8-reference", which runs anywhere) cannot run this call (None:
    it can). ``masked``: the call hides keys (``with_hidden_keys`` pads the head dim); ``platform``:
    the one compiled for; ``ring``: the call runs ring attention over a context axis."""
    h = padded_head_dim(q.shape[-1]) if masked else q.shape[-1]
    if impl == "cudnn-fp8" and platform not in ("gpu", "cuda"):
        return f"cuDNN's fp8 attention runs on NVIDIA GPUs (H100) only, not {platform}"
    if impl == "cudnn-fp8" and (h % 16 or h > 256):
        return f"cuDNN's fp8 attention needs a head dim that is a multiple of 16 and <= 256, not {h}"
    if ring:
        return "ring attention over the context axis runs its own float32 blocks, not a kernel"
    return None


def choose(impl: str, q, key_mask, kv_lengths, parallelism: str | None, default: str) -> str:
    """``impl`` where fp8 attention can run this call (``layers.attention``), else ``default`` (the
    backend's kernel), with a warning once per reason."""
    from mm_jax import parallel
    from mm_jax.models import attention_parallel as ap
    from mm_jax.models.platform import target_platform

    ring = key_mask is None and parallel.device_count() > 1 and ap.scheme(q.shape[2], None, parallelism) == "ring"
    why = fallback_reason(impl, q, key_mask is not None or kv_lengths is not None, target_platform(), ring)
    if why is None:
        return impl
    if why not in _WARNED:
        _WARNED.add(why)
        warnings.warn(f"attention: {why}; these calls run the {default!r} kernel in the compute dtype instead",
                      stacklevel=3)
    return default
