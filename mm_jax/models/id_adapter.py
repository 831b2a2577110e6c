"""The Magic Mirror identity adapter in Flax NNX (design: tests/reference/magic_mirror_reference.md s.3-4).

    clip_hidden (B, 257, clip_width)  penultimate CLIP ViT states of the 224x224 face crop
    e_id        (B, id_dim)           L2-normalized ArcFace embedding
      -> ID perceiver, queries MLP(e_id)  -> x_id   (B, N_id, T)    fused into the text (s.3.3)
      -> face perceiver, learned queries  -> x_face (B, N_face, D)  joins the DiT attention (s.3.4)
    CAN, per adapter block l (s.3.5): cond = SiLU(temb + Linear_id(mean_k x_id_k)),
      Linear_l(cond) -> 14 D-chunks: 6 face shift/scale/gate (attention, then FF), initialized from
      the block's text expert; 8 residuals (zero-init) added to the block's video/text shift, scale.

Choices the paper leaves open, fixed here and kept as config fields: every Linear has a bias;
GELU is the exact (erf) one (``gelu="erf"``, torch ``nn.GELU()``'s default and what the
PhotoMaker / IP-Adapter perceivers use); LayerNorms are affine with eps 1e-5; the perceiver
attention scale is 1/sqrt(head_dim).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.config_base import ConfigBase
from mm_jax.models.dit import CogVideoXTransformer3D
from mm_jax.models.dit_embeddings import BlockConditioning
from mm_jax.models import layers as L
from mm_jax.models.layers import attention, canonical_dtype
from mm_jax.text import CLASS_WORDS

GELUS = ("erf", "tanh")


@dataclasses.dataclass(frozen=True)
class AdapterConfig(ConfigBase):
    """Every size of the adapter (the [ours] numbers of the design are defaults here)."""

    # the backbone it joins
    dit_dim: int = 3072            # D, the DiT inner width
    text_dim: int = 4096           # T, the T5 width
    time_embed_dim: int = 512      # width of the DiT's temb
    num_dit_layers: int = 42
    adapter_layers: tuple = tuple(range(0, 42, 2))   # paper: every even-indexed block
    # perceivers
    clip_width: int = 1024
    id_dim: int = 512
    width: int = 1024              # W
    depth: int = 4
    heads: int = 16
    head_dim: int = 64
    ff_mult: int = 4
    num_face_tokens: int = 32      # N_face
    num_id_tokens: int = 4         # N_id
    id_mlp_hidden: int = 1024
    norm_eps: float = 1e-5
    gelu: str = "erf"              # every GELU of the adapter: "erf" (exact) or "tanh"
    # fusion into the text
    class_words: tuple = CLASS_WORDS
    fuse_hidden: Optional[int] = None   # hidden width of MLP_fuse; None = T
    pad_token_id: int = 0          # T5's <pad>: the dropped tail positions should hold it
    # runtime
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention_impl: Optional[str] = None

    RUNTIME_FIELDS = ("dtype", "param_dtype", "attention_impl")
    TAG = {"_class_name": "MagicMirrorAdapter"}

    @classmethod
    def for_dit(cls, dit_cfg, clip_width: int = 1024, **overrides) -> "AdapterConfig":
        """The design's adapter for a DiT config: widths from the DiT, adapters in the even blocks."""
        kw = dict(dit_dim=dit_cfg.inner_dim, text_dim=dit_cfg.text_embed_dim, time_embed_dim=dit_cfg.time_embed_dim,
                  num_dit_layers=dit_cfg.num_layers, adapter_layers=tuple(range(0, dit_cfg.num_layers, 2)),
                  clip_width=clip_width)
        kw.update(overrides)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @property
    def fuse_width(self) -> int:
        return self.fuse_hidden or self.text_dim

    def validate(self) -> None:
        sizes = ("dit_dim", "text_dim", "time_embed_dim", "num_dit_layers", "clip_width", "id_dim", "width", "depth",
                 "heads", "head_dim", "ff_mult", "num_face_tokens", "num_id_tokens", "id_mlp_hidden")
        bad = [f"{k}={getattr(self, k)}" for k in sizes if int(getattr(self, k)) < 1]
        if bad:
            raise ValueError(f"adapter sizes must be positive: {', '.join(bad)}")
        out = [i for i in self.adapter_layers if not 0 <= i < self.num_dit_layers]
        if out:
            raise ValueError(f"adapter_layers {out} lie outside the DiT's {self.num_dit_layers} blocks "
                             f"(allowed: 0..{self.num_dit_layers - 1})")
        if not self.adapter_layers or list(self.adapter_layers) != sorted(set(self.adapter_layers)):
            raise ValueError(f"adapter_layers {tuple(self.adapter_layers)} must be non-empty, increasing and unique")
        if self.gelu not in GELUS:
            raise ValueError(f"gelu {self.gelu!r}; choose from {GELUS}")
        if not self.class_words or not all(isinstance(w, str) and w.strip() for w in self.class_words):
            raise ValueError(f"class_words {self.class_words!r} must be a non-empty list of words")


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


def _gelu(cfg: AdapterConfig):
    return lambda x: jax.nn.gelu(x, approximate=cfg.gelu == "tanh")


def _dense(cfg: AdapterConfig, din: int, dout: int, axes, **kw):
    return L.linear(din, dout, axes=axes, dtype=canonical_dtype(cfg.dtype),
                    param_dtype=canonical_dtype(cfg.param_dtype), **kw)


def _norm(cfg: AdapterConfig, dim: int):
    return L.layer_norm(dim, eps=cfg.norm_eps, dtype=canonical_dtype(cfg.dtype),
                        param_dtype=canonical_dtype(cfg.param_dtype), rngs=nnx.Rngs(0))


# --------------------------------------------------------------------------------------------
# Perceivers (s.3.2)

class PerceiverLayer(nnx.Module):
    """q <- q + Attn(LN_q(q), kv = [LN_f(f'), LN_q(q)]);  q <- q + FF(LN_ff(q)).

    q: (B, N, W), f': (B, P, W) -> (B, N, W). FF = Linear(W, ff_mult W), GELU (``cfg.gelu``,
    exact erf by default), Linear(ff_mult W, W).
    """

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        w, inner = cfg.width, cfg.heads * cfg.head_dim
        self.norm_f = _norm(cfg, w)
        self.norm_q = _norm(cfg, w)
        self.to_q = _dense(cfg, w, inner, ("embed", "heads"), rngs=rngs)
        self.to_k = _dense(cfg, w, inner, ("embed", "heads"), rngs=rngs)
        self.to_v = _dense(cfg, w, inner, ("embed", "heads"), rngs=rngs)
        self.to_out = _dense(cfg, inner, w, ("heads", "embed"), rngs=rngs)
        self.norm_ff = _norm(cfg, w)
        self.ff_in = _dense(cfg, w, cfg.ff_mult * w, ("embed", "mlp"), rngs=rngs)
        self.ff_out = _dense(cfg, cfg.ff_mult * w, w, ("mlp", "embed"), rngs=rngs)
        self.heads, self.head_dim, self.impl = cfg.heads, cfg.head_dim, cfg.attention_impl
        self.act = _gelu(cfg)

    def __call__(self, q: jax.Array, f: jax.Array) -> jax.Array:
        b, n, _ = q.shape
        qn = self.norm_q(q)
        kv = jnp.concatenate([self.norm_f(f), qn], axis=1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim)
        o = attention(split(self.to_q(qn)), split(self.to_k(kv)), split(self.to_v(kv)), implementation=self.impl)
        q = q + self.to_out(o.reshape(b, n, -1))
        return q + self.ff_out(self.act(self.ff_in(self.norm_ff(q))))


class Perceiver(nnx.Module):
    """f (B, P, clip_width), queries (B, N, W) or the learned ``latents`` -> LN(Linear(W -> out)(q)) (B, N, out).

    f' = Linear(clip_width -> W)(f) is the key/value source of every layer; the ``depth`` layers
    are one stack, run under ``lax.scan``.
    """

    def __init__(self, cfg: AdapterConfig, out_dim: int, num_latents: int | None, *, rngs: nnx.Rngs):
        pdt = canonical_dtype(cfg.param_dtype)
        self.proj_in = _dense(cfg, cfg.clip_width, cfg.width, (None, "embed"), rngs=rngs)
        init = L.partitioned(nnx.initializers.normal(cfg.width ** -0.5), None, "embed")
        self.latents = nnx.Param(init(rngs.params(), (num_latents, cfg.width), pdt)) if num_latents else None
        self.layers = L.stack(cfg.depth, lambda r: PerceiverLayer(cfg, rngs=r), rngs)
        self.proj_out = _dense(cfg, cfg.width, out_dim, ("embed", None), rngs=rngs)
        self.norm_out = _norm(cfg, out_dim)

    def __call__(self, f: jax.Array, queries: jax.Array | None = None) -> jax.Array:
        f = self.proj_in(f)
        if queries is None:
            lat = self.latents[...]
            queries = jnp.broadcast_to(lat.astype(f.dtype), (f.shape[0],) + lat.shape)
        q, _ = L.scan(lambda q, layer, _: (layer(q, f), None), queries.astype(f.dtype), self.layers)
        return self.norm_out(self.proj_out(q))


class MLP2(nnx.Module):
    """Linear -> GELU (``cfg.gelu``) -> Linear (``linear_1``, ``linear_2``); the last may start at zero.

    x (..., din) -> (..., dout).
    """

    def __init__(self, din: int, dhidden: int, dout: int, cfg: AdapterConfig, *, zero_last: bool = False,
                 rngs: nnx.Rngs):
        self.linear_1 = _dense(cfg, din, dhidden, ("embed", "mlp"), rngs=rngs)
        self.linear_2 = _dense(cfg, dhidden, dout, ("mlp", "embed"), rngs=rngs,
                               kernel_init=_zeros if zero_last else None)
        self.act = _gelu(cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


# --------------------------------------------------------------------------------------------
# The adapter

class MagicMirrorAdapter(nnx.Module):
    """All trainable Magic Mirror parameters (the DiT, T5, VAE, CLIP and ArcFace stay frozen).

    ``encode`` -> (x_id, x_face); ``fuse`` puts x_id into the text; ``dit_forward`` runs the DiT
    with the face tokens and CAN. Parameter names are the torch reference's state-dict keys (the
    perceiver layers and the CAN linears are stacks: ``can.3.weight`` is layer 3 of ``can``).
    """

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.face_perceiver = Perceiver(cfg, cfg.dit_dim, cfg.num_face_tokens, rngs=rngs)
        self.id_mlp = MLP2(cfg.id_dim, cfg.id_mlp_hidden, cfg.num_id_tokens * cfg.width, cfg, rngs=rngs)
        self.id_perceiver = Perceiver(cfg, cfg.text_dim, None, rngs=rngs)
        self.fuse_mlp = MLP2(2 * cfg.text_dim, cfg.fuse_width, cfg.text_dim, cfg, zero_last=True, rngs=rngs)
        self.linear_id = _dense(cfg, cfg.text_dim, cfg.time_embed_dim, ("embed", "cond"), kernel_init=_zeros,
                                rngs=rngs)
        self.can = L.stack(len(cfg.adapter_layers),
                           lambda r: _dense(cfg, cfg.time_embed_dim, 14 * cfg.dit_dim, ("cond", "mlp"),
                                            kernel_init=_zeros, rngs=r), rngs)

    # -- identity embeddings (s.3.2) ----------------------------------------------------------
    def encode(self, clip_hidden: jax.Array, e_id: jax.Array) -> tuple[jax.Array, jax.Array]:
        """clip_hidden (B, P, clip_width), e_id (B, id_dim) -> x_id (B, N_id, T), x_face (B, N_face, D)."""
        cfg = self.cfg
        e_id = e_id.astype(canonical_dtype(cfg.dtype))
        q_id = self.id_mlp(e_id).reshape(e_id.shape[0], cfg.num_id_tokens, cfg.width)
        return self.id_perceiver(clip_hidden, q_id), self.face_perceiver(clip_hidden)

    # -- fusion into the text embedding (s.3.3) -----------------------------------------------
    def fuse(self, text: jax.Array, x_id: jax.Array, class_index: jax.Array) -> jax.Array:
        """text (B, L, T), x_id (B, N_id, T), class_index (B,) int -> (B, L, T).

        Token w = class_index is replaced by the N_id tokens c_k = c_w + MLP_fuse([c_w, x_id_k]);
        what followed it shifts right by N_id - 1 and the last N_id - 1 positions fall off (check
        them on the host with ``mm_jax.text.check_dropped_tokens``). Static shapes: the output is a gather
        through an index map, so ``class_index`` may be traced.
        """
        b, L, _ = text.shape
        n = self.cfg.num_id_tokens
        c_w = jnp.take_along_axis(text, class_index[:, None, None], axis=1)  # (B, 1, T)
        c_rep = jnp.broadcast_to(c_w, (b, n, c_w.shape[-1]))
        fused = (c_rep + self.fuse_mlp(jnp.concatenate([c_rep, x_id.astype(text.dtype)], axis=-1))).astype(text.dtype)
        j = jnp.arange(L)[None, :]
        w = class_index[:, None]
        src = jnp.where(j < w, j, jnp.where(j < w + n, w, j - n + 1))     # source position in text
        kept = jnp.take_along_axis(text, src[..., None], axis=1)
        k = jnp.clip(j - w, 0, n - 1)                                       # which fused token
        from_fused = jnp.take_along_axis(fused, k[..., None], axis=1)
        return jnp.where(((j >= w) & (j < w + n))[..., None], from_fused, kept)

    # -- CAN (s.3.5) --------------------------------------------------------------------------
    def conditioning(self, x_id: jax.Array, has_id: jax.Array | None = None):
        """The DiT hook ``temb (B, time_embed_dim) -> BlockConditioning`` stacked over the adapter
        blocks: all CAN linears applied at once to cond = SiLU(temb + Linear_id(mean x_id)), which
        every adapter block shares. Samples whose ``has_id`` (B,) is False get zero residuals (the
        caller hides their face tokens), which is the plain block."""
        d = self.cfg.dit_dim
        id_vec = self.linear_id(jnp.mean(x_id, axis=1))  # shared by all adapter layers

        def fn(temb: jax.Array) -> BlockConditioning:
            cond = jax.nn.silu(temb + id_vec.astype(temb.dtype))
            m = jax.vmap(lambda lin: lin(cond))(self.can).reshape(-1, temb.shape[0], 14, d)  # (A, B, 14, D)
            res = m[:, :, 6:]
            if has_id is not None:
                res = res * has_id.astype(res.dtype)[None, :, None, None]
            return BlockConditioning(extra_mod=m[:, :, :6], residual=res)

        return fn

    def init_from_dit(self, dit: CogVideoXTransformer3D) -> None:
        """Start each CAN as its block's text expert: the face rows copy the rows of norm1.linear
        and norm2.linear that make enc_shift, enc_scale, enc_gate; the 8 residual chunks are zero.
        At step 0 (Linear_id is zero) face tokens are then modulated exactly like text tokens."""
        d = self.cfg.dit_dim
        if dit.cfg.inner_dim != d or dit.cfg.num_layers != self.cfg.num_dit_layers:
            raise ValueError(f"adapter (dit_dim={d}, num_dit_layers={self.cfg.num_dit_layers}) does not fit the DiT "
                             f"(inner_dim={dit.cfg.inner_dim}, num_layers={dit.cfg.num_layers})")
        at = jnp.asarray(self.cfg.adapter_layers)
        blocks = dit.transformer_blocks
        # AdaLN chunk order: shift, scale, gate (video), enc_shift, enc_scale, enc_gate (text)
        text_rows = lambda p: p[...][at][..., 3 * d:]  # (A, [in,] 3D) of the adapter blocks
        kern, bias = self.can.kernel[...], self.can.bias[...]
        kern = jnp.concatenate([text_rows(blocks.norm1.linear.kernel), text_rows(blocks.norm2.linear.kernel),
                                jnp.zeros(kern.shape[:-1] + (8 * d,))], axis=-1).astype(kern.dtype)
        bias = jnp.concatenate([text_rows(blocks.norm1.linear.bias), text_rows(blocks.norm2.linear.bias),
                                jnp.zeros(bias.shape[:-1] + (8 * d,))], axis=-1).astype(bias.dtype)
        self.can.kernel.set_value(kern)
        self.can.bias.set_value(bias)

    # -- the DiT with the identity joined (s.3.4, s.4) ----------------------------------------
    def dit_forward(self, dit: CogVideoXTransformer3D, latents: jax.Array, text: jax.Array, timestep: jax.Array,
                    face_tokens: jax.Array | None = None, x_id: jax.Array | None = None,
                    has_id: jax.Array | None = None) -> jax.Array:
        """latents (B, F, H, W, C), text (B, L, T) (already fused where there is an identity),
        timestep (B,), face_tokens (B, N_face, D), x_id (B, N_id, T), has_id (B,) bool -> (B, F, H, W, C_out).

        No face tokens: exactly the plain DiT call. ``has_id`` False for a sample (the
        unconditional half of a CFG batch) hides its face tokens as keys and zeroes its residual
        modulation, which equals running it with no face tokens.
        """
        if face_tokens is None:
            return dit(latents, text, timestep)
        if x_id is None:
            raise ValueError("dit_forward: face_tokens were given without x_id (CAN is conditioned on x_id)")
        return dit(latents, text, timestep, extra_tokens=face_tokens, extra_valid=has_id,
                   conditioning=self.conditioning(x_id, has_id), adapter_layers=tuple(self.cfg.adapter_layers))


def identity_forward(dit: CogVideoXTransformer3D, adapter: MagicMirrorAdapter | None, latents, text, timestep, *,
                     x_id=None, x_face=None, has_id=None):
    """``adapter.dit_forward`` that also accepts no adapter: then (or with no x_face) the plain DiT."""
    if adapter is None or x_face is None:
        return dit(latents, text, timestep)
    return adapter.dit_forward(dit, latents, text, timestep, x_face, x_id, has_id)


def count_adapter_params(cfg: AdapterConfig) -> int:
    """Number of added (trainable) parameters for ``cfg``, from shapes only (``nnx.eval_shape``)."""
    abstract = nnx.eval_shape(lambda: MagicMirrorAdapter(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))))


count_params = count_adapter_params  # the name sample.py and the benchmark use
