"""The T5 v1.1 encoder (transformers ``T5EncoderModel``) in Flax NNX.

Embedding (no sqrt(d) scaling) -> N blocks of [RMS norm -> self-attention with a relative
position bias, no 1/sqrt(d) logit scaling] + [RMS norm -> gated tanh-GELU feed-forward] ->
final RMS norm (``feed_forward_proj`` "relu" / "gated-silu" etc. swap the feed-forward for
original T5's variants). The blocks are one stack (``encoder/block``, a leading ``layers`` axis
on every parameter) run under ``lax.scan``. The position bias table, which the checkpoint keeps
in block 0 only and every block reuses, is its own parameter ``encoder/relative_attention_bias``
(the converter maps it to ``encoder.block.0.layer.0.SelfAttention.relative_attention_bias``).
Module names otherwise mirror the checkpoint (``encoder.block.3.layer.1.DenseReluDense.wi_0``).

    input_ids (B, S) int -> (B, S, d_model)

Precision: ``dtype`` float32 or bfloat16. Under bfloat16 everything, ``wo`` included, runs in
bfloat16, as transformers 5 does for ``T5EncoderModel.from_pretrained(..., dtype=torch.bfloat16)``
(what CogVideoXPipeline loads): its ``_keep_in_fp32_modules = ["wo"]`` upcasts only under float16.
Norm statistics are float32 in both. float16 is refused: the reference needs activation clamping
there (T5 overflows fp16), which this port does not reproduce.

Layers are Flax's (``nnx.Linear``, ``nnx.Embed`` through ``mm_jax.models.layers``) except the RMS
norm: T5's rounds the normalized activations to the weight's dtype *before* multiplying by a
bf16 weight, where ``nnx.RMSNorm`` multiplies in float32 and rounds once; under bf16 the two
differ by one ulp in about a quarter of the elements, so the reference's order is kept here.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models import layers as L
from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import attention, canonical_dtype, gelu_tanh
from mm_jax.parallel import constrain


@dataclasses.dataclass(frozen=True)
class T5Config(ConfigBase):
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    # runtime (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True       # blocks under lax.scan (one compiled body) or unrolled

    RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers")
    TAG = {"architectures": ["T5EncoderModel"]}

    @classmethod
    def source_fields(cls, d: dict) -> dict:
        # transformers 5 writes the stored precision ("dtype") into config.json; it is not our
        # runtime choice (that comes from overrides only)
        return {k: v for k, v in d.items() if k not in cls.RUNTIME_FIELDS}

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def act_name(self) -> str:
        """transformers' ``dense_act_fn``: "gated-gelu" means the tanh GELU (``gelu_new``)."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.split("-")[-1]

    def validate(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated") or parts[-1] not in ACTIVATIONS:
            raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}: supported are "
                             f"{sorted(ACTIVATIONS)} and their 'gated-' forms ('gated-gelu' = T5 v1.1, "
                             "'relu' = original T5)")
        if canonical_dtype(self.dtype) not in (jnp.float32, jnp.bfloat16):
            raise ValueError(f"dtype={self.dtype!r}: T5 runs in 'float32' or 'bfloat16' (float16 overflows "
                             "without the reference's clamping, which is not ported)")


# transformers' ACT2FN entries that T5 configs use ("gelu" is the exact erf GELU there)
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": gelu_tanh,
    "silu": jax.nn.silu,
}


def relative_position_buckets(q_len: int, k_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 buckets (q_len, k_len) of rel = key_pos - query_pos, computed as the
    reference does (float32 log, truncation toward zero)."""
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    n = np.abs(rel)
    max_exact = half // 2
    with np.errstate(divide="ignore"):
        large = (np.log(n.astype(np.float32) / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
                 * np.float32(half - max_exact)).astype(np.float32)
    large = max_exact + np.where(n < max_exact, 0, large).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(n < max_exact, n, large)


class RMSNorm(nnx.Module):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight (variance in float32, no mean, no bias).
    x: (..., dim) -> (..., dim). Hand-written: see the module docstring (rounding order)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.scale = nnx.Param(L.partitioned(nnx.initializers.ones, "norm")(rngs.params(), (dim,), param_dtype))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        y = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
        w = self.scale[...]
        if w.dtype in (jnp.bfloat16, jnp.float16):
            y = y.astype(w.dtype)  # the reference rounds to the half weight's dtype before the product
        return (w * y).astype(self.dtype)


def _dense(cfg: T5Config, din: int, dout: int, axes, rngs: nnx.Rngs) -> nnx.Linear:
    """T5 has no biases anywhere."""
    return L.linear(din, dout, axes=axes, use_bias=False, dtype=canonical_dtype(cfg.dtype),
                    param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)


def _norm(cfg: T5Config, rngs: nnx.Rngs) -> RMSNorm:
    return RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=canonical_dtype(cfg.dtype),
                   param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)


class SelfAttention(nnx.Module):
    """Multi-head attention with logits ``q k^T + bias`` (no 1/sqrt(d_kv) scaling, as T5 was trained).

    h: (B, S, d_model), bias: (1, heads, S, S), key_mask: (B, S) bool | None -> (B, S, d_model).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        self.q = _dense(cfg, cfg.d_model, inner, ("embed", "heads"), rngs)
        self.k = _dense(cfg, cfg.d_model, inner, ("embed", "heads"), rngs)
        self.v = _dense(cfg, cfg.d_model, inner, ("embed", "heads"), rngs)
        self.o = _dense(cfg, inner, cfg.d_model, ("heads", "embed"), rngs)
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def __call__(self, h, bias, key_mask=None):
        b, s, _ = h.shape
        split = lambda t: t.reshape(b, s, self.heads, self.d_kv)
        o = attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), scale=1.0, bias=bias, key_mask=key_mask)
        return self.o(o.reshape(b, s, -1))


class AttentionLayer(nnx.Module):
    """``h + SelfAttention(RMS(h))``: (B, S, d_model) -> (B, S, d_model)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.SelfAttention = SelfAttention(cfg, rngs=rngs)
        self.layer_norm = _norm(cfg, rngs)

    def __call__(self, h, bias, key_mask=None):
        return h + self.SelfAttention(self.layer_norm(h), bias, key_mask)


class DenseReluDense(nnx.Module):
    """Gated: ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1, act = tanh GELU); plain: ``wo(act(wi x))``.

    x: (B, S, d_model) -> (B, S, d_model).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        if cfg.is_gated:
            self.wi_0 = _dense(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
            self.wi_1 = _dense(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
        else:
            self.wi = _dense(cfg, cfg.d_model, cfg.d_ff, ("embed", "mlp"), rngs)
        self.wo = _dense(cfg, cfg.d_ff, cfg.d_model, ("mlp", "embed"), rngs)
        self.act, self.gated = ACTIVATIONS[cfg.act_name], cfg.is_gated

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(constrain(h, ("batch", "seq", "act_mlp")))


class FFLayer(nnx.Module):
    """``h + DenseReluDense(RMS(h))``: (B, S, d_model) -> (B, S, d_model)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.DenseReluDense = DenseReluDense(cfg, rngs=rngs)
        self.layer_norm = _norm(cfg, rngs)

    def __call__(self, h):
        return h + self.DenseReluDense(self.layer_norm(h))


class T5Block(nnx.Module):
    """``layer[0]`` attention then ``layer[1]`` feed-forward: (B, S, d_model) -> (B, S, d_model)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.layer = nnx.List([AttentionLayer(cfg, rngs=rngs), FFLayer(cfg, rngs=rngs)])

    def __call__(self, h, bias, key_mask=None):
        h = self.layer[0](h, bias, key_mask)
        return constrain(self.layer[1](h), ("batch", "seq", "act_embed"))


class T5Stack(nnx.Module):
    """The shared position-bias table, the stacked blocks and the final norm (``encoder.*``)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.relative_attention_bias = L.embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                               axes=("rel_buckets", "heads"), dtype=canonical_dtype(cfg.param_dtype),
                                               param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.block = L.stack(cfg.num_layers, lambda r: T5Block(cfg, rngs=r), rngs)
        self.final_layer_norm = _norm(cfg, rngs)
        self.cfg = cfg

    def position_bias(self, s: int) -> jax.Array:
        """The (1, heads, S, S) logit bias every block adds: the table at the relative-position buckets."""
        cfg = self.cfg
        buckets = relative_position_buckets(s, s, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)[None]

    def __call__(self, h: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
        """h: (B, S, d_model) embedded tokens, key_mask: (B, S) bool | None -> (B, S, d_model)."""
        bias = self.position_bias(h.shape[1])
        block = lambda h, blk, _: (blk(h, bias, key_mask), None)
        if self.cfg.scan_layers:
            h, _ = L.scan(block, h, self.block)
        else:
            for i in range(self.cfg.num_layers):
                h, _ = block(h, L.layer(self.block, i), None)
        return self.final_layer_norm(h)


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder: ``(input_ids (B, S), attention_mask (B, S) | None) -> (B, S, d_model)``.

    The CogVideoX pipeline passes no attention mask (pad tokens attend and are attended to).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.shared = L.embed(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"), dtype=canonical_dtype(cfg.dtype),
                              param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.encoder = T5Stack(cfg, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        return self.encoder(self.shared(input_ids), key_mask)
