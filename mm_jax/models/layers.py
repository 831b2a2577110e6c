"""Layers shared by the networks: dense, norms, attention, timestep embedding.

Parameter names follow the PyTorch checkpoints' meaning (``kernel`` for a linear/conv weight in
JAX layout, ``scale``/``bias`` for norms) so the converter derives every transform from the kind
of parameter. Every parameter carries ``logical_axes`` metadata for ``mm_jax.parallel``.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DType = jnp.dtype


def canonical_dtype(name) -> DType:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``None`` -> a numpy dtype (None -> float32)."""
    return jnp.dtype(name or "float32")


def _normal(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


class Dense(nnx.Module):
    """y = x @ kernel + bias. ``kernel: (in, out)``; x ``(..., in) -> (..., out)``."""

    def __init__(self, in_features: int, out_features: int, *, axes: Sequence[str | None] = ("embed", "mlp"),
                 use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init: Callable | None = None, rngs: nnx.Rngs):
        init = kernel_init or _normal(1.0 / math.sqrt(in_features))
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype), logical_axes=tuple(axes))
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[-1],))
                     if use_bias else None)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis (statistics in float32), optional affine ``scale``/``bias``."""

    def __init__(self, dim: int, *, eps: float, affine: bool = True, use_bias: bool = True,
                 axes: Sequence[str | None] = ("norm",), dtype=jnp.float32, param_dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=tuple(axes)) if affine else None
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=tuple(axes)) if affine and use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        if self.scale is not None:
            y = y * self.scale[...].astype(jnp.float32)
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch ``approximate="tanh"``, T5's ``gelu_new``)."""
    return jax.nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------------------------
# Attention: every network calls this one function. The implementation is chosen by name;
# "xla" works everywhere, "chunked" is the fast exact path on CPU, "cudnn" is the fused flash
# kernel on NVIDIA GPUs, and further kernels (the TPU splash kernel) register themselves in
# ATTENTION_IMPLS.

def _dpa(q, k, v, key_mask, scale, implementation):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=implementation)


def chunked_attention(q, k, v, key_mask=None, scale=None, *, block_q: int = 512):
    """Exact attention computed one (head, query block) at a time under ``lax.map``.

    Each step's score matrix (block_q, T) stays small enough for the CPU caches, so the softmax
    runs fused instead of streaming a (N, S, T) tensor through memory: 8x faster than the XLA
    path of ``jax.nn.dot_product_attention`` on CPU for the DiT's 4.5k-token sequences. The
    softmax is over all keys at once (not an online softmax), so the numbers are the plain ones.
    """
    b, s, n, h = q.shape
    t = k.shape[1]
    scale = h ** -0.5 if scale is None else scale
    bq = min(block_q, s)
    pad = (-s) % bq
    nq = (s + pad) // bq
    qt = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))) * jnp.asarray(scale, q.dtype)
    qt = qt.reshape(b, nq, bq, n, h).transpose(3, 1, 0, 2, 4).reshape(n * nq, b, bq, h)
    kt, vt = k.transpose(2, 0, 1, 3), v.transpose(2, 0, 1, 3)  # (n, b, t, h)
    bias = None if key_mask is None else jnp.where(key_mask, 0.0, -1e30).astype(jnp.float32)[:, None, :]

    def one(args):
        idx, qc = args
        head = idx // nq
        kc = jax.lax.dynamic_index_in_dim(kt, head, 0, keepdims=False)
        vc = jax.lax.dynamic_index_in_dim(vt, head, 0, keepdims=False)
        sc = jnp.einsum("bqh,bkh->bqk", qc, kc, preferred_element_type=jnp.float32)
        if bias is not None:
            sc = sc + bias
        p = jnp.exp(sc - jnp.max(sc, axis=-1, keepdims=True))
        o = jnp.einsum("bqk,bkh->bqh", p.astype(vc.dtype), vc, preferred_element_type=jnp.float32)
        return (o / jnp.sum(p, axis=-1, keepdims=True)).astype(q.dtype)

    o = jax.lax.map(one, (jnp.arange(n * nq), qt))  # (n*nq, b, bq, h)
    o = o.reshape(n, nq, b, bq, h).transpose(2, 1, 3, 0, 4).reshape(b, nq * bq, n, h)
    return o[:, :s]


def _splash(q, k, v, key_mask, scale):
    from mm_jax.models.splash import splash_attention  # imported on use: the Pallas TPU module stays out of CPU imports

    return splash_attention(q, k, v, key_mask, scale)


ATTENTION_IMPLS: dict[str, Callable] = {
    "chunked": lambda q, k, v, key_mask, scale: chunked_attention(q, k, v, key_mask, scale),
    "xla": lambda q, k, v, key_mask, scale: _dpa(q, k, v, key_mask, scale, "xla"),
    "cudnn": lambda q, k, v, key_mask, scale: _dpa(q, k, v, key_mask, scale, "cudnn"),
    "splash": _splash,  # TPU Pallas kernel, mm_jax/models/splash.py
}


def default_attention_impl() -> str:
    """"cudnn" on NVIDIA GPUs, "splash" on TPU when registered, "chunked" on CPU, else "xla"."""
    backend = jax.default_backend()
    if backend == "gpu":
        return "cudnn"
    if backend == "tpu" and "splash" in ATTENTION_IMPLS:
        return "splash"
    if backend == "cpu":
        return "chunked"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              scale: float | None = None, bias: jax.Array | None = None,
              implementation: str | None = None) -> jax.Array:
    """softmax(q k^T * scale [+ bias] [+ key mask]) v.

    q: (B, S, N, Dh), k/v: (B, T, N, Dh), key_mask: (B, T) bool (True = attend) -> (B, S, N, Dh).
    ``scale`` defaults to 1/sqrt(Dh). ``bias``: an additive (B or 1, N, S, T) logit bias (T5's
    relative positions; short sequences, so it always takes the "xla" path). ``implementation``:
    a key of ``ATTENTION_IMPLS`` or None for the backend default. cuDNN needs bf16/fp16 inputs;
    fp32 falls back to "xla".
    """
    if bias is not None:
        mask = None if key_mask is None else key_mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=scale,
                                            implementation="xla")
    impl = implementation or default_attention_impl()
    if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        impl = "xla"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not available; choose from {sorted(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[impl](q, k, v, key_mask, scale)


# --------------------------------------------------------------------------------------------

def timestep_embedding(t: jax.Array, dim: int, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal table of width ``dim`` in float32 (diffusers ``get_timestep_embedding``).

    t: (B,) -> (B, dim); ``[sin | cos]``, or ``[cos | sin]`` with ``flip_sin_to_cos``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    arg = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """Linear -> SiLU -> Linear: (B, in) -> (B, out). Names as diffusers' ``linear_1``/``linear_2``."""

    def __init__(self, in_features: int, out_features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.linear_1 = Dense(in_features, out_features, axes=("embed", "cond"), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = Dense(out_features, out_features, axes=(None, "cond"), dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
