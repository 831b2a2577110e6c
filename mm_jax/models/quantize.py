"""Quantized linear layers for sampling (``--quantize``): the one place that knows qwix.

    dit = quantize.quantize_model(dit, "int8")          # in place; returns the module
    quantize.weight_bytes(dit)                           # parameter bytes, quantized ones included

Modes (``MODES``):

* ``int8``: int8 weights (per output channel) and int8 activations (per token, dynamic absmax),
  int8 x int8 -> int32 matmuls: TPU v5e/v6e/v5p and A100/A800 run these at twice the bf16 rate.
* ``fp8``: the same with float8_e4m3fn weights and activations, fp32 accumulation: H100's fp8
  tensor cores (twice the bf16 rate). The DiT's self-attention also runs cuDNN's fp8 flash
  attention (``ATTENTION``, ``mm_jax.models.fp8_attention``) where it would run the bf16 cuDNN
  kernel; on CPU and TPU there is none, and it stays in the compute dtype with a warning.
* ``fp8-linears``: ``fp8``'s linear layers with the attention kept in the compute dtype (bf16 cuDNN).
* ``int8-weights``: int8 weights only; activations stay in the compute dtype and the weight is
  dequantized into the matmul. A memory mode (the weights at about half their bf16 bytes) for
  where activations cannot be quantized; the matmuls run at the bf16 rate.

Every ``nnx.Linear`` whose path (``"/"``-joined, e.g. ``transformer_blocks/attn1/to_q``) matches
``include`` becomes a ``QuantizedLinear``: the DiT's attention projections, feed-forward, AdaLN
modulations, text projection and output projection; T5's attention and gated feed-forward. The
attention itself (QK^T, softmax, PV in the attention kernel; but for ``fp8``'s, above), LayerNorms,
the patch convolution and embeddings keep the compute dtype. Stacked layers (``layers.stack``: a
leading ``layers`` axis run under ``lax.scan``) are quantized per layer and per output channel
(scale ``(layers, out, 1)``), so the scan slices the int8 kernel and its scale together. The quantized kernel is stored transposed,
``(..., out, in)``: cuBLAS's int8 and fp8 GEMMs take both operands with the contraction in the
minor dimension ("TN"), and with the ``(in, out)`` layout XLA:GPU transposes every layer's weights
outside the layer loop (the h100x1 fp8 step's temporaries went from 1.84 to 8.54 GiB).

Why qwix's core ops and not ``qwix.quantize_model``: with qwix 0.1.8 its NNX path
(``quantize_model(model, qwix.PtqProvider([qwix.QtRule(weight_qtype=int8, act_qtype=int8)]), ...)``)
replaces each weight while tracing the model's first call, by ``setattr`` on the module the op
runs in. Inside the DiT's ``lax.scan`` that module is the per-layer slice, and it fails:
``AssertionError: shape=(16, 192) spec=('layers', 'cond', 'mlp')`` (``flax_util.update_sharding``:
the sliced kernel keeps the stack's logical axes); a replacement made there would also be a traced
copy that never reaches the stacked module. So the weights are quantized here, outside any trace,
with ``qwix.quantize`` (absmax, channelwise over every axis but the contraction), and the layer
computes with ``qwix.dot_general`` on ``qwix.QArray``s: qwix chooses the integer (or fp8) matmul
with the scales applied to its output when both sides are quantized, and the dequantize-then-
matmul path (which XLA fuses) for weights-only.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import qwix


@dataclasses.dataclass(frozen=True)
class Scheme:
    """What one mode quantizes: the weights' type and the activations' (None: not quantized), and
    whether the DiT's self-attention runs the fp8 kernel (``ATTENTION``)."""
    weight: Any
    activation: Any | None
    fp8_attention: bool = False

    @property
    def name(self) -> str:
        return next(k for k, v in MODES.items() if v == self)


MODES: dict[str, Scheme] = {
    "int8": Scheme(jnp.int8, jnp.int8),
    "fp8": Scheme(jnp.float8_e4m3fn, jnp.float8_e4m3fn, fp8_attention=True),
    "int8-weights": Scheme(jnp.int8, None),
    "fp8-linears": Scheme(jnp.float8_e4m3fn, jnp.float8_e4m3fn),
}
DEFAULT_INCLUDE = ".*"   # every nnx.Linear of the model
ATTENTION = "cudnn-fp8"  # the attention kernel of mode fp8 (``layers.ATTENTION_IMPLS``)
ATTENTION_MODULES = r"(.*/)?attn1"  # the DiT's self-attention modules (their ``impl`` is the kernel's name)


def check(mode: str | None, field: str = "quantize") -> None:
    """Refuse an unknown mode (``None`` is no quantization) with a ValueError naming ``field``."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"{field}={mode!r}: choose from {', '.join(MODES)} (or none)")


def attention_impl(mode: str | None, impl: str | None) -> str | None:
    """The kernel the DiT's self-attention gets under ``mode`` when its config says ``impl``: ``ATTENTION``
    in place of the bf16 cuDNN kernel (``impl`` "cudnn", or None: the backend's default, which is
    cuDNN on NVIDIA GPUs) for a mode with fp8 attention; ``impl`` otherwise (an explicit other kernel
    is kept)."""
    check(mode)
    return ATTENTION if mode is not None and MODES[mode].fp8_attention and impl in (None, "cudnn") else impl


def matmul_type(mode: str | None) -> str | None:
    """The type the matmuls run in for a mode: "int8", "fp8", or None (the compute dtype)."""
    check(mode)
    if mode is None or MODES[mode].activation is None:
        return None
    return "fp8" if MODES[mode].activation == jnp.float8_e4m3fn else "int8"


class QuantizedLinear(nnx.Module):
    """``nnx.Linear`` with a quantized kernel: ``kernel`` (..., out, in) (the original transposed) in
    the weight type and ``kernel_scale`` (..., out, 1) float32 (original^T ~= kernel * kernel_scale),
    ``bias`` as it was.
    Computes ``x @ W + b`` with ``qwix.dot_general``; with an activation type, ``x`` is quantized
    per token (one absmax scale per row) first. Output in ``dtype``."""

    def __init__(self, kernel: nnx.Param, kernel_scale: nnx.Param, bias: nnx.Param | None, *, scheme: Scheme,
                 dtype):
        self.kernel, self.kernel_scale, self.bias = kernel, kernel_scale, bias
        self.weight_type, self.activation_type, self.dtype = scheme.weight, scheme.activation, dtype
        self.mode = scheme.name

    def __call__(self, x: jax.Array) -> jax.Array:
        w = qwix.QArray(self.kernel[...], self.kernel_scale[...], qtype=self.weight_type)
        x = x.astype(self.dtype)
        if self.activation_type is not None:
            x = qwix.quantize(x, self.activation_type, channelwise_axes=tuple(range(x.ndim - 1)))
        y = qwix.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y.astype(self.dtype)


def _transposed(axes):
    """Per-dimension names/specs of (..., in, out) -> those of (..., out, in), and of the scale (..., out, 1)."""
    axes = tuple(axes)
    return axes[:-2] + (axes[-1], axes[-2]), axes[:-2] + (axes[-1], None)


def _shardings(kernel_value):
    """The transposed kernel's and the scale's shardings from the kernel's."""
    sharding = getattr(kernel_value, "sharding", None)
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return sharding, sharding
    spec = tuple(sharding.spec) + (None,) * (kernel_value.ndim - len(sharding.spec))
    return tuple(jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*s)) for s in _transposed(spec))


def _quantize_kernel(value, qtype):
    """kernel (..., in, out) -> (qvalue (..., out, in), scale (..., out, 1) float32); abstract in,
    abstract out."""
    shape = value.shape[:-2] + (value.shape[-1], value.shape[-2])
    if isinstance(value, jax.ShapeDtypeStruct):  # the planner's abstract models: shapes, dtypes, shardings
        ks, ss = _shardings(value)
        return (jax.ShapeDtypeStruct(shape, jnp.dtype(qtype), sharding=ks),
                jax.ShapeDtypeStruct(shape[:-1] + (1,), jnp.float32, sharding=ss))
    axes = tuple(range(value.ndim - 1))  # one scale per (layer,) output channel; the contraction is last
    q = jax.jit(lambda v: qwix.quantize(jnp.swapaxes(v, -1, -2).astype(jnp.float32), qtype,
                                        channelwise_axes=axes))(value)
    return q.qvalue, q.scale


def _quantized(lin: nnx.Linear, scheme: Scheme) -> QuantizedLinear:
    qvalue, scale = _quantize_kernel(lin.kernel.get_value(), scheme.weight)
    meta = dict(lin.kernel.get_metadata())
    axes = meta.get("out_sharding")
    scale_meta = dict(meta)
    if axes is not None:
        meta["out_sharding"], scale_meta["out_sharding"] = _transposed(axes)
    return QuantizedLinear(nnx.Param(qvalue, **meta), nnx.Param(scale, **scale_meta), lin.bias, scheme=scheme,
                           dtype=lin.dtype or jnp.float32)


def quantize_model(model: nnx.Module, mode: str | None, *, include: str = DEFAULT_INCLUDE) -> nnx.Module:
    """Replace every ``nnx.Linear`` of ``model`` whose path matches ``include`` (``re.fullmatch``)
    by a ``QuantizedLinear`` of ``mode``, in place, and return ``model`` (a ``model`` that is itself
    an ``nnx.Linear`` is returned quantized). ``mode`` None: unchanged. A mode with fp8 attention
    also sets the kernel of every module at ``ATTENTION_MODULES`` with an ``impl`` attribute (the
    DiT's self-attention) to ``attention_impl(mode, impl)``.
    Works on restored modules (the weights are quantized on their devices, keeping their
    sharding) and on abstract ones (``jax.ShapeDtypeStruct`` leaves, as the planner builds them).
    The original kernels are dropped (freed once nothing else holds them)."""
    check(mode)
    if mode is None:
        return model
    scheme = MODES[mode]
    targets = [(path, m) for path, m in nnx.iter_modules(model)
               if isinstance(m, nnx.Linear) and re.fullmatch(include, "/".join(map(str, path)))]
    if not targets and not any(isinstance(m, QuantizedLinear) for _, m in nnx.iter_modules(model)):
        raise ValueError(f"quantize={mode!r}: no nnx.Linear of {type(model).__name__} matches {include!r}")
    for path, lin in targets:
        if not path:  # the model is itself a Linear (or a stack of them): its quantized twin
            return _quantized(lin, scheme)
        parent = model
        for p in path[:-1]:
            parent = parent[p] if isinstance(p, int) else getattr(parent, p)
        setattr(parent, path[-1], _quantized(lin, scheme))
    for path, m in nnx.iter_modules(model):
        if scheme.fp8_attention and hasattr(m, "impl") and re.fullmatch(ATTENTION_MODULES, "/".join(map(str, path))):
            m.impl = attention_impl(mode, m.impl)
    return model


def quantized_mode(model: nnx.Module) -> str | None:
    """The mode a model was quantized with (None: none of its layers is quantized)."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, QuantizedLinear):
            return m.mode
    return None


def weight_bytes(model: nnx.Module) -> int:
    """Bytes of every parameter of a (possibly abstract) model, quantized kernels and scales included."""
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
               for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
