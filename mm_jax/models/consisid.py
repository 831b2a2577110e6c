"""ConsisID's transformer (diffusers ``ConsisIDTransformer3DModel``) in Flax NNX.

Reads top-down like the paper's figure: the Local Facial Extractor (LFE) turns the ArcFace-style
identity vector ``id_cond`` (B_id, 1280) and five EVA-CLIP hidden states ``id_vit_hidden``
(5, B_id, 577, 1024) into 32 face tokens (B_id, 32, 2048); the CogVideoX DiT (``dit.py``) runs as
usual, and after every ``cross_attn_interval``-th block from block 0 a ``PerceiverCrossAttention``
lets the video tokens (only) attend to the face tokens and adds the result, scaled by
``local_face_scale``, with no gate and no timestep input.

The cross-attentions ride on the DiT's ``after_block`` hook (one stacked module, sliced per block
by the DiT's scan), so they do not depend on the backbone's positional scheme. The face tokens do
not depend on the timestep: ``face_tokens`` computes them once and ``__call__`` takes them
precomputed (``face``) or computes them from ``id_cond``/``id_vit_hidden``. A face batch of 1 is
shared by the whole video batch (the CFG pair), as diffusers' broadcasting does.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models import layers as L
from mm_jax.models.dit import CogVideoXTransformer3D
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.dit_embeddings import Tokens
from mm_jax.models.layers import canonical_dtype


@dataclasses.dataclass(frozen=True)
class ConsisIDConfig(DiTConfig):
    """The DiT's fields plus ConsisID's (diffusers' names, ``LFE_num_querie`` sic); the face
    defaults are the release's. The backbone defaults are CogVideoX-5B's (``DiTConfig``); the
    released ConsisID uses the 5B image-to-video backbone, whose ``config.json`` sets its own."""

    is_train_face: bool = True
    is_kps: bool = False   # stored by diffusers and never used by its forward; likewise here
    cross_attn_interval: int = 2
    cross_attn_dim_head: int = 128
    cross_attn_num_heads: int = 16
    LFE_id_dim: int = 1280
    LFE_vit_dim: int = 1024
    LFE_depth: int = 10
    LFE_dim_head: int = 64
    LFE_num_heads: int = 16
    LFE_num_id_token: int = 5
    LFE_num_querie: int = 32
    LFE_output_dim: int = 2048
    LFE_ff_mult: int = 4
    LFE_num_scale: int = 5
    local_face_scale: float = 1.0

    TAG = {"_class_name": "ConsisIDTransformer3DModel"}

    @property
    def cross_attn_kv_dim(self) -> int:
        """The face tokens' width the cross-attentions expect (diffusers: ``int(inner_dim / 3 * 2)``)."""
        return int(self.inner_dim / 3 * 2)

    @property
    def cross_attn_layers(self) -> tuple[int, ...]:
        """The blocks followed by a cross-attention: 0, interval, 2 * interval, ..."""
        return tuple(range(0, self.num_layers, self.cross_attn_interval))

    def validate(self) -> None:
        super().validate()
        if not self.is_train_face:
            raise ValueError("is_train_face False: a ConsisID transformer without its face modules is a plain "
                             "CogVideoX transformer; convert it as the 'transformer' component")
        if self.cross_attn_interval < 1 or self.num_layers % self.cross_attn_interval:
            # diffusers builds num_layers // interval cross-attentions but applies one after every
            # block i with i % interval == 0, so other layer counts fail there too (IndexError)
            raise ValueError(f"num_layers {self.num_layers} must be a multiple of cross_attn_interval "
                             f"{self.cross_attn_interval} (>= 1)")
        if self.LFE_num_scale < 1 or self.LFE_depth % self.LFE_num_scale:
            raise ValueError(f"LFE_depth {self.LFE_depth} must be a multiple of LFE_num_scale {self.LFE_num_scale}")
        if self.LFE_output_dim != self.cross_attn_kv_dim:
            raise ValueError(f"LFE_output_dim {self.LFE_output_dim} must equal int(inner_dim * 2 / 3) = "
                             f"{self.cross_attn_kv_dim} (the cross-attentions' key width)")


def _dense(cfg, din, dout, axes, bias=True, *, rngs):
    return L.linear(din, dout, axes=axes, use_bias=bias, dtype=canonical_dtype(cfg.dtype),
                    param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)


def _norm(cfg, dim, *, rngs):
    """torch ``nn.LayerNorm(dim)``: eps 1e-5, affine."""
    return L.layer_norm(dim, eps=1e-5, dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype),
                        rngs=rngs)


def _attend(q, k, v, heads: int, dim_head: int):
    """softmax((q s)(k s)^T) v with s = dim_head^-1/4 and the softmax in float32, as both ConsisID
    attentions compute it. q (B, N, h*d); k, v (1 or B, M, h*d) -> (B, N, h*d)."""
    b, n, _ = q.shape
    if k.shape[0] not in (1, b):
        raise ValueError(f"face batch {k.shape[0]} must be 1 or the video batch {b}")
    split = lambda t: jnp.broadcast_to(t, (b, *t.shape[1:])).reshape(b, t.shape[1], heads, dim_head)
    s = 1 / math.sqrt(math.sqrt(dim_head))
    w = jnp.einsum("bnhd,bmhd->bhnm", split(q) * s, split(k) * s)
    w = jax.nn.softmax(w.astype(jnp.float32), axis=-1).astype(w.dtype)
    return jnp.einsum("bhnm,bmhd->bnhd", w, split(v)).reshape(b, n, heads * dim_head)


class PerceiverAttention(nnx.Module):
    """The LFE's attention: the queries attend to [context, queries] (no biases).

    ctx (B, M, kv_dim), x (B, N, dim) -> (B, N, dim); norm1 on ctx, norm2 on x, one ``to_kv``
    projection whose output halves are the keys and the values.
    """

    def __init__(self, cfg: ConsisIDConfig, dim: int, dim_head: int, heads: int, *, rngs: nnx.Rngs):
        inner = dim_head * heads
        self.norm1 = _norm(cfg, dim, rngs=rngs)
        self.norm2 = _norm(cfg, dim, rngs=rngs)
        self.to_q = _dense(cfg, dim, inner, (None, None), bias=False, rngs=rngs)
        self.to_kv = _dense(cfg, dim, 2 * inner, (None, None), bias=False, rngs=rngs)
        self.to_out = _dense(cfg, inner, dim, (None, None), bias=False, rngs=rngs)
        self.heads, self.dim_head = heads, dim_head

    def __call__(self, ctx: jax.Array, x: jax.Array) -> jax.Array:
        ctx, x = self.norm1(ctx), self.norm2(x)
        k, v = jnp.split(self.to_kv(jnp.concatenate([ctx, x], axis=1)), 2, axis=-1)
        return self.to_out(_attend(self.to_q(x), k, v, self.heads, self.dim_head))


class FeedForward(nnx.Module):
    """LN -> Linear(dim, mult*dim) -> exact GELU -> Linear (no biases; torch ``Sequential`` 0, 1, 3)."""

    def __init__(self, cfg: ConsisIDConfig, dim: int, mult: int, *, rngs: nnx.Rngs):
        self.norm = _norm(cfg, dim, rngs=rngs)
        self.proj_in = _dense(cfg, dim, mult * dim, (None, None), bias=False, rngs=rngs)
        self.proj_out = _dense(cfg, mult * dim, dim, (None, None), bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(self.norm(x)), approximate=False))


class LFELayer(nnx.Module):
    """x = attn(ctx, x) + x; x = ff(x) + x (torch ``layers.i.0`` / ``layers.i.1``)."""

    def __init__(self, cfg: ConsisIDConfig, *, rngs: nnx.Rngs):
        d = cfg.LFE_vit_dim
        self.attn = PerceiverAttention(cfg, d, cfg.LFE_dim_head, cfg.LFE_num_heads, rngs=rngs)
        self.ff = FeedForward(cfg, d, cfg.LFE_ff_mult, rngs=rngs)

    def __call__(self, ctx: jax.Array, x: jax.Array) -> jax.Array:
        x = self.attn(ctx, x) + x
        return self.ff(x) + x


class Mapping(nnx.Module):
    """Linear, LN, LeakyReLU(0.01), Linear, LN, LeakyReLU, Linear: (..., din) -> (..., dout).
    Attribute names carry the torch ``Sequential`` indices (fc0, ln1, fc3, ln4, fc6)."""

    def __init__(self, cfg: ConsisIDConfig, din: int, d: int, dout: int, *, rngs: nnx.Rngs):
        self.fc0 = _dense(cfg, din, d, (None, None), rngs=rngs)
        self.ln1 = _norm(cfg, d, rngs=rngs)
        self.fc3 = _dense(cfg, d, d, (None, None), rngs=rngs)
        self.ln4 = _norm(cfg, d, rngs=rngs)
        self.fc6 = _dense(cfg, d, dout, (None, None), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.leaky_relu(self.ln1(self.fc0(x)), 0.01)
        x = jax.nn.leaky_relu(self.ln4(self.fc3(x)), 0.01)
        return self.fc6(x)


class LocalFacialExtractor(nnx.Module):
    """The LFE: id_cond (B, id_dim) and vit_hidden (num_scale, B, T, vit_dim) -> (B, num_querie, output_dim).

    ``id_embedding_mapping`` makes ``num_id_token`` identity tokens; the queries are [latents, id
    tokens]; for each scale i, ``mapping_i`` maps EVA hidden state i, the context is [the original
    id tokens, mapped ViT tokens], and depth / num_scale ``LFELayer``s update the queries. The
    first ``num_querie`` queries, times ``proj_out``, are the face tokens.
    """

    def __init__(self, cfg: ConsisIDConfig, *, rngs: nnx.Rngs):
        d, pdt = cfg.LFE_vit_dim, canonical_dtype(cfg.param_dtype)
        init = lambda shape: L.partitioned(nnx.initializers.normal(d ** -0.5), *(None,) * len(shape))(
            rngs.params(), shape, pdt)
        self.latents = nnx.Param(init((1, cfg.LFE_num_querie, d)))
        self.proj_out = nnx.Param(init((d, cfg.LFE_output_dim)))
        self.layers = L.stack(cfg.LFE_depth, lambda r: LFELayer(cfg, rngs=r), rngs)
        for i in range(cfg.LFE_num_scale):
            setattr(self, f"mapping_{i}", Mapping(cfg, d, d, d, rngs=rngs))
        self.id_embedding_mapping = Mapping(cfg, cfg.LFE_id_dim, d, d * cfg.LFE_num_id_token, rngs=rngs)
        self.cfg = cfg

    def __call__(self, id_cond: jax.Array, vit_hidden) -> jax.Array:
        cfg = self.cfg
        if len(vit_hidden) != cfg.LFE_num_scale:
            raise ValueError(f"id_vit_hidden has {len(vit_hidden)} hidden states; LFE_num_scale is {cfg.LFE_num_scale}")
        b, d = id_cond.shape[0], cfg.LFE_vit_dim
        ids = self.id_embedding_mapping(id_cond).reshape(b, cfg.LFE_num_id_token, d)
        x = jnp.concatenate([jnp.broadcast_to(self.latents[...].astype(ids.dtype), (b, *self.latents.shape[1:])),
                             ids], axis=1)
        per = cfg.LFE_depth // cfg.LFE_num_scale
        for i in range(cfg.LFE_num_scale):
            ctx = jnp.concatenate([ids, getattr(self, f"mapping_{i}")(vit_hidden[i].astype(ids.dtype))], axis=1)
            for j in range(i * per, (i + 1) * per):
                x = L.layer(self.layers, j)(ctx, x)
        return x[:, :cfg.LFE_num_querie] @ self.proj_out[...].astype(x.dtype)


class PerceiverCrossAttention(nnx.Module):
    """Video tokens attend to the face tokens (keys and values from the face only; no biases).

    face (1 or B, M, kv_dim), h (B, N, dim) -> (B, N, dim); norm1 on face, norm2 on h.
    """

    def __init__(self, cfg: ConsisIDConfig, *, rngs: nnx.Rngs):
        dim, kv, inner = cfg.inner_dim, cfg.cross_attn_kv_dim, cfg.cross_attn_dim_head * cfg.cross_attn_num_heads
        self.norm1 = _norm(cfg, kv, rngs=rngs)
        self.norm2 = _norm(cfg, dim, rngs=rngs)
        self.to_q = _dense(cfg, dim, inner, ("embed", "heads"), bias=False, rngs=rngs)
        self.to_kv = _dense(cfg, kv, 2 * inner, (None, "heads"), bias=False, rngs=rngs)
        self.to_out = _dense(cfg, inner, dim, ("heads", "embed"), bias=False, rngs=rngs)
        self.heads, self.dim_head = cfg.cross_attn_num_heads, cfg.cross_attn_dim_head

    def __call__(self, face: jax.Array, h: jax.Array) -> jax.Array:
        k, v = jnp.split(self.to_kv(self.norm1(face)), 2, axis=-1)
        return self.to_out(_attend(self.to_q(self.norm2(h)), k, v, self.heads, self.dim_head))


class ConsisIDTransformer3D(CogVideoXTransformer3D):
    """The CogVideoX DiT with ConsisID's LFE and cross-attentions (parameter names as diffusers').

    __call__(latents (B, F, H, W, C), text (B, L, text_embed_dim), timestep (B,), id_cond (B_id,
    id_dim), id_vit_hidden (num_scale, B_id, T, vit_dim)) -> (B, F, H, W, C_out), B_id 1 or B.
    """

    def __init__(self, cfg: ConsisIDConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.local_facial_extractor = LocalFacialExtractor(cfg, rngs=rngs)
        self.perceiver_cross_attention = L.stack(len(cfg.cross_attn_layers),
                                                 lambda r: PerceiverCrossAttention(cfg, rngs=r), rngs)

    def face_tokens(self, id_cond: jax.Array, id_vit_hidden) -> jax.Array:
        """(B_id, id_dim), (num_scale, B_id, T, vit_dim) -> (B_id, num_querie, output_dim); no timestep."""
        dt = canonical_dtype(self.cfg.dtype)
        return self.local_facial_extractor(id_cond.astype(dt), [jnp.asarray(t, dt) for t in id_vit_hidden])

    def __call__(self, latents: jax.Array, text: jax.Array, timestep: jax.Array, id_cond: jax.Array | None = None,
                 id_vit_hidden=None, *, face: jax.Array | None = None) -> jax.Array:
        """``face``: precomputed ``face_tokens`` (then ``id_cond``/``id_vit_hidden`` are not used)."""
        if face is None:
            if id_cond is None or id_vit_hidden is None:
                raise ValueError("ConsisID needs id_cond and id_vit_hidden (or precomputed face tokens)")
            face = self.face_tokens(id_cond, id_vit_hidden)
        scale = self.cfg.local_face_scale

        def cross_attend(seq: jax.Array, tokens: Tokens, pca: PerceiverCrossAttention) -> jax.Array:
            # a token-wise op on the whole joint sequence, kept on the video rows only: no slicing
            # of the (context-sharded) sequence, and text / extra / padding rows stay unchanged
            pos = jnp.arange(seq.shape[1])[None, :, None]
            video = (pos >= tokens.text) & (pos < tokens.text + tokens.video)
            return seq + jnp.where(video, scale * pca(face.astype(seq.dtype), seq), 0).astype(seq.dtype)

        return super().__call__(latents, text, timestep, adapter_layers=self.cfg.cross_attn_layers,
                                after_block=cross_attend, after_block_params=self.perceiver_cross_attention)
