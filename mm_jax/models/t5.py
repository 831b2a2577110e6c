"""The T5 v1.1 encoder (transformers ``T5EncoderModel``) in Flax NNX.

Embedding (no sqrt(d) scaling) -> N blocks of [RMS norm -> self-attention with a relative
position bias, no 1/sqrt(d) logit scaling] + [RMS norm -> gated tanh-GELU feed-forward] ->
final RMS norm (``feed_forward_proj`` "relu" / "gated-silu" etc. swap the feed-forward for
original T5's variants). The position bias table lives in block 0 only and is reused by every block.
Module names mirror the checkpoint (``encoder.block.3.layer.1.DenseReluDense.wi_0``) so the
converter maps keys with its generic rules.

    input_ids (B, S) int -> (B, S, d_model)

Precision: ``dtype`` float32 or bfloat16. Under bfloat16 everything, ``wo`` included, runs in
bfloat16, as transformers 5 does for ``T5EncoderModel.from_pretrained(..., dtype=torch.bfloat16)``
(what CogVideoXPipeline loads): its ``_keep_in_fp32_modules = ["wo"]`` upcasts only under float16.
Norm statistics are float32 in both. float16 is refused: the reference needs activation clamping
there (T5 overflows fp16), which this port does not reproduce.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import Dense, attention, canonical_dtype, gelu_tanh
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
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight (variance in float32, no mean, no bias)."""

    def __init__(self, dim: int, eps: float, *, dtype, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps, self.dtype = eps, dtype

    def __call__(self, x):
        var = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
        y = x.astype(jnp.float32) * jax.lax.rsqrt(var + self.eps)
        w = self.scale[...]
        if w.dtype in (jnp.bfloat16, jnp.float16):
            y = y.astype(w.dtype)  # the reference rounds to the half weight's dtype before the product
        return (w * y).astype(self.dtype)


class Embedding(nnx.Module):
    """A lookup table ``embedding (num, dim)``."""

    def __init__(self, num: int, dim: int, *, axes, param_dtype, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (num, dim), param_dtype), logical_axes=axes)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


class SelfAttention(nnx.Module):
    """Multi-head attention with logits ``q k^T + bias`` (no 1/sqrt(d_kv) scaling, as T5 was trained).

    h: (B, S, d_model), bias: (1, heads, S, S), key_mask: (B, S) bool | None -> (B, S, d_model).
    """

    def __init__(self, cfg: T5Config, has_bias: bool, *, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.q = Dense(cfg.d_model, inner, axes=("embed", "heads"), **kw)
        self.k = Dense(cfg.d_model, inner, axes=("embed", "heads"), **kw)
        self.v = Dense(cfg.d_model, inner, axes=("embed", "heads"), **kw)
        self.o = Dense(inner, cfg.d_model, axes=("heads", "embed"), **kw)
        self.relative_attention_bias = (Embedding(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                  axes=("rel_buckets", "heads"), param_dtype=pdt, rngs=rngs)
                                        if has_bias else None)
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv

    def __call__(self, h, bias, key_mask=None):
        b, s, _ = h.shape
        split = lambda t: t.reshape(b, s, self.heads, self.d_kv)
        o = attention(split(self.q(h)), split(self.k(h)), split(self.v(h)), scale=1.0, bias=bias, key_mask=key_mask)
        return self.o(o.reshape(b, s, -1))


class AttentionLayer(nnx.Module):
    """``h + SelfAttention(RMS(h))``: (B, S, d_model) -> (B, S, d_model)."""

    def __init__(self, cfg: T5Config, has_bias: bool, *, rngs: nnx.Rngs):
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.SelfAttention = SelfAttention(cfg, has_bias, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=pdt)

    def __call__(self, h, bias, key_mask=None):
        return h + self.SelfAttention(self.layer_norm(h), bias, key_mask)


class DenseReluDense(nnx.Module):
    """Gated: ``wo(act(wi_0 x) * wi_1 x)`` (T5 v1.1, act = tanh GELU); plain: ``wo(act(wi x))``.

    x: (B, S, d_model) -> (B, S, d_model).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        kw = dict(use_bias=False, dtype=dtype, param_dtype=pdt, rngs=rngs)
        if cfg.is_gated:
            self.wi_0 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
            self.wi_1 = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
        else:
            self.wi = Dense(cfg.d_model, cfg.d_ff, axes=("embed", "mlp"), **kw)
        self.wo = Dense(cfg.d_ff, cfg.d_model, axes=("mlp", "embed"), **kw)
        self.act, self.gated = ACTIVATIONS[cfg.act_name], cfg.is_gated

    def __call__(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(constrain(h, ("batch", "seq", "act_mlp")))


class FFLayer(nnx.Module):
    """``h + DenseReluDense(RMS(h))``: (B, S, d_model) -> (B, S, d_model)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.DenseReluDense = DenseReluDense(cfg, rngs=rngs)
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=pdt)

    def __call__(self, h):
        return h + self.DenseReluDense(self.layer_norm(h))


class T5Block(nnx.Module):
    """``layer[0]`` attention then ``layer[1]`` feed-forward: (B, S, d_model) -> (B, S, d_model)."""

    def __init__(self, cfg: T5Config, has_bias: bool, *, rngs: nnx.Rngs):
        self.layer = nnx.List([AttentionLayer(cfg, has_bias, rngs=rngs), FFLayer(cfg, rngs=rngs)])

    def __call__(self, h, bias, key_mask=None):
        h = self.layer[0](h, bias, key_mask)
        return constrain(self.layer[1](h), ("batch", "seq", "act_embed"))


class T5Stack(nnx.Module):
    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.block = nnx.List([T5Block(cfg, i == 0, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype, param_dtype=pdt)


class T5Encoder(nnx.Module):
    """T5 v1.1 encoder: ``(input_ids (B, S), attention_mask (B, S) | None) -> (B, S, d_model)``.

    The CogVideoX pipeline passes no attention mask (pad tokens attend and are attended to).
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model, axes=("vocab", "embed"),
                                param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.encoder = T5Stack(cfg, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: Optional[jax.Array] = None) -> jax.Array:
        cfg = self.cfg
        s = input_ids.shape[1]
        h = self.shared(input_ids).astype(canonical_dtype(cfg.dtype))
        buckets = relative_position_buckets(s, s, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        table = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.embedding[...]
        bias = jnp.take(table, jnp.asarray(buckets), axis=0).transpose(2, 0, 1)[None]  # (1, heads, S, S)
        key_mask = None if attention_mask is None else attention_mask.astype(bool)
        for blk in self.encoder.block:
            h = blk(h, bias, key_mask)
        return self.encoder.final_layer_norm(h)
