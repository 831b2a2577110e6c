"""Layers shared by the networks: Flax's layers with logical axes, stacks of layers, attention,
timestep embedding.

The networks are built from ``nnx.Linear``, ``nnx.LayerNorm``, ``nnx.Embed`` and ``nnx.Conv``
through the small factories below, which attach each parameter's *logical* axis names with
``nnx.with_partitioning`` (metadata ``out_sharding``, e.g. ``("embed", "mlp")``).
``mm_jax.parallel`` maps those names to mesh axes. Eager sharding is off for these variables
(``eager_sharding=False``): a model can be built with or without a mesh, and abstractly, and the
shardings are derived afterwards by ``parallel.state_shardings``, which also replicates a
dimension its mesh axes do not divide (something ``nnx.get_named_sharding`` cannot do; tiny test
models and 48 heads over 5 devices need it). Tried with flax 0.12.8 / jax 0.10.2: a (3072, 48)
parameter named ``(None, "tensor")`` on a 5-device ``tensor`` axis gets ``P(None, "tensor")``
from ``nnx.get_named_sharding``, and placing it fails with "ValueError: Sharding spec ('tensor',)
implies that array axis 1 is partitioned 5 times, but does not evenly divide the dimension size
48"; ``parallel.logical_to_spec`` keeps that dimension whole (``("embed", "heads")`` on
fsdp=1, tensor=5: ``P("fsdp", None)``; on tensor=4: ``P("fsdp", "tensor")``).

Parameter names follow the PyTorch checkpoints' meaning (``kernel`` for a linear/conv weight in
JAX layout, ``scale``/``bias`` for norms, ``embedding`` for tables) so the converter derives every
transform from the kind of parameter.

Stacks (``stack``): N identical layers are one module whose parameters carry a leading
``layers`` axis; ``scan`` runs them under ``jax.lax.scan`` with the remat policy on the body.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax import parallel
from mm_jax.models.platform import NO_PALLAS_TPUS, target_device_kind, target_platform  # noqa: F401  (also used as layers.target_platform)

DType = jnp.dtype


def canonical_dtype(name) -> DType:
    """``"bfloat16"`` / ``jnp.bfloat16`` / ``None`` -> a numpy dtype (None -> float32)."""
    return jnp.dtype(name or "float32")


def _normal(std: float):
    return lambda key, shape, dtype: std * jax.random.normal(key, shape, dtype)


def partitioned(init: Callable, *axes: str | None) -> Callable:
    """``init`` with logical axis names for its parameter (one name or None per dimension)."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def linear(in_features: int, out_features: int, *, axes: Sequence[str | None] = ("embed", "mlp"),
           use_bias: bool = True, dtype=jnp.float32, param_dtype=jnp.float32, kernel_init: Callable | None = None,
           rngs: nnx.Rngs) -> nnx.Linear:
    """``nnx.Linear`` (``kernel (in, out)``, ``bias (out,)``) with logical axes ``axes`` = (in, out);
    computes in ``dtype`` with the parameters cast to it. Kernels start N(0, 1/in)."""
    init = kernel_init or _normal(1.0 / math.sqrt(in_features))
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      kernel_init=partitioned(init, *axes), bias_init=partitioned(nnx.initializers.zeros, axes[-1]),
                      rngs=rngs)


def layer_norm(dim: int, *, eps: float, affine: bool = True, use_bias: bool = True, axes=("norm",),
               dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """``nnx.LayerNorm`` over the last axis with statistics in float32 and the two-pass variance
    (``use_fast_variance=False``: E[(x - mean)^2], as torch computes it, not E[x^2] - mean^2)."""
    return nnx.LayerNorm(dim, epsilon=eps, use_bias=affine and use_bias, use_scale=affine, dtype=dtype,
                         param_dtype=param_dtype, use_fast_variance=False,
                         scale_init=partitioned(nnx.initializers.ones, *axes),
                         bias_init=partitioned(nnx.initializers.zeros, *axes), rngs=rngs)


def embed(num: int, dim: int, *, axes=("vocab", "embed"), dtype=jnp.float32, param_dtype=jnp.float32,
          rngs: nnx.Rngs) -> nnx.Embed:
    """``nnx.Embed``: a lookup table ``embedding (num, dim)``, N(0, 1) at init."""
    return nnx.Embed(num, dim, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=partitioned(nnx.initializers.normal(1.0), *axes), rngs=rngs)


def stack(n: int, make: Callable[[nnx.Rngs], nnx.Module], rngs: nnx.Rngs) -> nnx.Module:
    """``n`` layers built by ``make(rngs)`` as one module whose parameters have a leading
    ``layers`` axis of size ``n`` (logical name "layers"), each layer from its own key."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(r):
        return make(r)

    return build(rngs)


def stack_size(stacked: nnx.Module) -> int:
    """The length of a stack's leading ``layers`` axis."""
    return int(jax.tree.leaves(nnx.state(stacked, nnx.Param))[0].shape[0])


def layer(stacked: nnx.Module, i) -> nnx.Module:
    """Layer ``i`` of a stack (a module whose parameters are the i-th slices)."""
    return jax.tree.map(lambda a: a[i], stacked)


def layers_range(stacked: nnx.Module, start: int, stop: int) -> nnx.Module:
    """Layers [start, stop) of a stack, still a stack."""
    if (start, stop) == (0, stack_size(stacked)):
        return stacked
    return jax.tree.map(lambda a: a[start:stop], stacked)


def scan(body: Callable, carry, stacked: nnx.Module, xs=None, *, remat_policy=None, remat: bool = False):
    """``carry, ys = lax.scan`` of ``body(carry, layer, x) -> (carry, y)`` over a stack (and ``xs``,
    sliced alongside). With ``remat``, the body is ``jax.checkpoint``-ed with ``remat_policy``:
    what the policy does not save is recomputed per layer in the backward pass."""
    step = (lambda c, lx: body(c, lx[0], lx[1]))
    if remat:
        step = jax.checkpoint(step, policy=remat_policy, prevent_cse=False)
    return jax.lax.scan(step, carry, (stacked, xs))



# XLA:CPU has no bfloat16 dynamic-slice: float normalization slices an f32 copy of the whole
# stack, and while-loop invariant code motion then hoists that copy out of the scan, so a bf16
# stack compiled for CPU is held a second time in f32 (measured on T5 with 4 XXL layers: 3.62 GiB
# of temporaries for 1.68 GiB of weights, so the 5B T5 and DiT do not fit a 24 GB host). Without
# the motion the convert fuses into the slice and each step converts its own layer (0.74 GiB).
# The CPU programs of scanned networks are jitted with these options (``scan_compiler_options``).
# The second turns off jaxlib 0.10.2's default YNNPACK fusion of dots, so XLA:CPU runs them with
# its Eigen kernels: on this repo's 2-core AVX-512 Xeon a fp32 (4516 x 3072) @ (3072 x 12288)
# matmul does 145 instead of 110 GFLOP per CPU-second (MKL in torch: 157), and one 5B-width DiT
# block's forward (benchmarks/dit.py --layers 1) takes 14.4 instead of 17.3 CPU-seconds.
CPU_SCAN_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion",
                             "xla_cpu_experimental_ynn_fusion_type": ""}


def scan_compiler_options(platform: str | None = None) -> dict[str, str] | None:
    """``jax.jit``'s ``compiler_options`` for a program of scanned layers on ``platform`` (default:
    the one being compiled for): ``CPU_SCAN_COMPILER_OPTIONS`` on CPU, None elsewhere."""
    return dict(CPU_SCAN_COMPILER_OPTIONS) if (platform or target_platform()) == "cpu" else None

def gelu_tanh(x: jax.Array) -> jax.Array:
    """GELU with the tanh approximation (torch ``approximate="tanh"``, T5's ``gelu_new``)."""
    return jax.nn.gelu(x, approximate=True)


# --------------------------------------------------------------------------------------------
# Attention: every network calls this one function. The implementation is chosen by name;
# "xla" works everywhere, "chunked" is the fast exact path on CPU, "cudnn" is the fused flash
# kernel on NVIDIA GPUs, and further kernels (the TPU splash kernel) register themselves in
# ATTENTION_IMPLS. Masking comes in two forms: ``kv_lengths`` (B,) (key j of row b is seen iff
# j < kv_lengths[b]), which every kernel supports (cuDNN as its padding mask, splash as segment
# ids), and a general ``key_mask`` (B, T), which cuDNN does not take.

def lengths_mask(kv_lengths: jax.Array, t: int) -> jax.Array:
    """(B,) key lengths -> (B, T) bool: key j is seen iff j < length."""
    return jnp.arange(t)[None, :] < kv_lengths[:, None]


def _key_mask(key_mask, kv_lengths, t):
    if kv_lengths is None:
        return key_mask
    m = lengths_mask(kv_lengths, t)
    return m if key_mask is None else m & key_mask


def _xla(q, k, v, key_mask, kv_lengths, scale):
    mask = None if key_mask is None else key_mask[:, None, None, :]
    lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, key_value_seq_lengths=lengths,
                                        implementation="xla")


def _cudnn(q, k, v, key_mask, kv_lengths, scale):
    if key_mask is not None:
        raise ValueError("the cuDNN kernel takes masks as per-row key lengths (kv_lengths), not a (B, T) key mask: "
                         "order the keys so that the masked ones are a suffix")
    s = q.shape[1]
    q, k, v, lengths = even_lengths(q, k, v, kv_lengths)
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths, implementation="cudnn")
    return out[:, :s]


def even_lengths(q, k, v, kv_lengths):
    """Pad odd query / key lengths by one: jax 0.10.2's cuDNN check refuses odd lengths in training
    ("Unsupported sequence length Q 2, KV 259": it takes its own no-bias placeholder for a bias),
    which the perceivers' [face features, queries] keys always are (257 + N). The padded key is
    hidden by the key lengths and the padded query row is dropped by the caller: exact."""
    b, s, t = q.shape[0], q.shape[1], k.shape[1]
    lengths = None if kv_lengths is None else kv_lengths.astype(jnp.int32)
    if t % 2:
        pad = ((0, 0), (0, 1), (0, 0), (0, 0))
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths
    if s % 2:
        q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
    return q, k, v, lengths


def chunked_attention(q, k, v, key_mask=None, scale=None, *, block_q: int = 512):
    """Exact attention computed one (head, query block) at a time under ``lax.map``.

    Each step's score matrix (block_q, T) stays small enough for the CPU caches, so the softmax
    runs fused instead of streaming a (N, S, T) tensor through memory: 8x faster than the XLA
    path of ``jax.nn.dot_product_attention`` on CPU for the DiT's 4.5k-token sequences. The
    softmax is over all keys at once (not an online softmax), so the numbers are the plain ones.
    """
    b, s, n, h = q.shape
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


def _chunked(q, k, v, key_mask, kv_lengths, scale):
    return chunked_attention(q, k, v, _key_mask(key_mask, kv_lengths, k.shape[1]), scale)


def _splash(q, k, v, key_mask, kv_lengths, scale):
    from mm_jax.models.splash import splash_attention  # imported on use: the Pallas TPU module stays out of CPU imports

    return splash_attention(q, k, v, _key_mask(key_mask, kv_lengths, k.shape[1]), scale)


def _fp8(name):  # masks as the keys they hide (fp8_attention.with_hidden_keys)
    def run(q, k, v, key_mask, kv_lengths, scale):
        from mm_jax.models import fp8_attention as f

        m = _key_mask(key_mask, kv_lengths, k.shape[1])
        fn = f.cudnn_fp8_attention if name == "cudnn-fp8" else f.reference_fp8_attention
        return fn(q, k, v, scale, None if m is None else ~m)
    return run


ATTENTION_IMPLS: dict[str, Callable] = {  # (q, k, v, key_mask, kv_lengths, scale) -> out
    "chunked": _chunked,
    "xla": _xla,
    "cudnn": _cudnn,
    "splash": _splash,  # TPU Pallas kernel, mm_jax/models/splash.py
    "cudnn-fp8": _fp8("cudnn-fp8"),  # cuDNN's fp8 flash attention (H100), mm_jax/models/fp8_attention.py
    "fp8-reference": _fp8("fp8-reference"),  # its numerics in XLA ops, any backend (a test reference)
}


# An observer of the kernel calls (the planner's ``aot.counting_kernels``): while set, ``attention``
# runs ``wrap(name, kernel)`` in place of ``ATTENTION_IMPLS[name]``. Context-local: set only through
# ``wrapping_attention_kernels``, so the registry itself is never changed.
_KERNEL_WRAPPER: contextvars.ContextVar[Callable[[str, Callable], Callable] | None] = contextvars.ContextVar(
    "mm_jax_attention_kernel_wrapper", default=None)


@contextlib.contextmanager
def wrapping_attention_kernels(wrap: Callable[[str, Callable], Callable]):
    """While active (in this thread or task), ``attention`` calls ``wrap(name, kernel)(q, k, v,
    key_mask, kv_lengths, scale)`` instead of the kernel ``ATTENTION_IMPLS[name]``."""
    token = _KERNEL_WRAPPER.set(wrap)
    try:
        yield
    finally:
        _KERNEL_WRAPPER.reset(token)


def default_attention_impl(platform: str | None = None, kind: str | None = None) -> str:
    """"cudnn" on NVIDIA GPUs, "splash" on TPU when registered (v4 and later: v2/v3's Mosaic refuses
    it), "chunked" on CPU and TPU v2/v3 (exact, one query block at a time: the full score matrix of
    the 5B's 17.8k tokens would not fit a v2 core's 8 GiB), else "xla". ``platform`` ("cpu", "gpu"
    or "cuda", "tpu") and ``kind`` (``device_kind``): the device compiled for; None: the current
    mesh's (``target_platform``, ``target_device_kind``). The models and the planner both ask here."""
    backend = platform or target_platform()
    if backend in ("gpu", "cuda"):
        return "cudnn"
    if backend == "tpu" and (kind or target_device_kind()) in NO_PALLAS_TPUS:
        return "chunked"
    if backend == "tpu" and "splash" in ATTENTION_IMPLS:
        return "splash"
    if backend == "cpu":
        return "chunked"
    return "xla"


_CUDNN_WARNED: set = set()  # q dtypes already warned about


def _warn_cudnn_fallback(dtype) -> None:
    """cuDNN's fused attention takes bf16/fp16 only: say once per dtype that another kernel runs."""
    if str(dtype) in _CUDNN_WARNED:
        return
    _CUDNN_WARNED.add(str(dtype))
    warnings.warn(f"attention: cuDNN takes bfloat16/float16 only, so {dtype} queries run XLA's dense attention "
                  f"instead (the full score matrix in memory; a bfloat16 model runs cuDNN)",
                  stacklevel=3)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, key_mask: jax.Array | None = None,
              kv_lengths: jax.Array | None = None, scale: float | None = None, bias: jax.Array | None = None,
              implementation: str | None = None, parallelism: str | None = None) -> jax.Array:
    """softmax(q k^T * scale [+ bias] [+ masks]) v.

    q: (B, S, N, Dh), k/v: (B, T, N, Dh) -> (B, S, N, Dh). ``kv_lengths`` (B,) int: row b sees
    keys [0, kv_lengths[b]) (every kernel supports it); ``key_mask`` (B, T) bool, True = attend
    (not on cuDNN). ``scale`` defaults to 1/sqrt(Dh). ``bias``: an additive (B or 1, N, S, T) logit
    bias (T5's relative positions; short sequences, so it always takes the "xla" path).
    ``implementation``: a key of ``ATTENTION_IMPLS`` or None for the backend default. cuDNN needs
    bf16/fp16 inputs; fp32 falls back to "xla" with a warning. "cudnn-fp8" (``fp8_attention``) runs
    on NVIDIA GPUs; elsewhere the default kernel runs, with a warning.

    Under a multi-device mesh (and without a general ``key_mask``) the kernel runs per shard in
    ``shard_map`` (``attention_parallel``): batch and heads split by the logical rules, and a
    sequence split over the ``context`` axis joined by Ulysses or ring attention
    (``parallelism``: "ulysses", "ring" or None for the default).
    """
    if bias is not None:
        mask = _key_mask(key_mask, kv_lengths, k.shape[1])
        mask = None if mask is None else mask[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype), mask=mask, scale=scale,
                                            implementation="xla")
    impl = implementation or default_attention_impl()
    fp8 = impl in ("cudnn-fp8", "fp8-reference")
    if fp8:
        from mm_jax.models import fp8_attention
        impl = fp8_attention.choose(impl, q, key_mask, kv_lengths, parallelism, default_attention_impl())
    if impl == "cudnn" and q.dtype not in (jnp.bfloat16, jnp.float16):
        _warn_cudnn_fallback(q.dtype)
        impl = "xla"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not available; choose from {sorted(ATTENTION_IMPLS)}")
    kernel = ATTENTION_IMPLS[impl]
    wrap = _KERNEL_WRAPPER.get()
    if wrap is not None:
        kernel = wrap(impl, kernel)
    from mm_jax.models import attention_parallel as ap

    if key_mask is None and parallel.device_count() > 1:
        full = fp8 and kv_lengths is None  # the fp8 kernels hide keys at a cost (a value channel): none here
        return ap.sharded_attention(lambda q, k, v, n: kernel(q, k, v, None, None if full else n, scale), q, k, v,
                                    kv_lengths, scale, parallelism=parallelism)
    return kernel(q, k, v, key_mask, kv_lengths, scale)


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
        self.linear_1 = linear(in_features, out_features, axes=("embed", "cond"), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.linear_2 = linear(out_features, out_features, axes=(None, "cond"), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
