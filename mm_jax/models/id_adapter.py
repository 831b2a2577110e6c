"""The Magic Mirror identity adapter in Flax NNX (design: shared/design/magic_mirror_reference.md s.3).

    clip_hidden (B, 257, clip_width)  -- penultimate CLIP ViT states of the 224x224 face crop
    e_id        (B, 512)              -- L2-normalized ArcFace embedding
        -> ID perceiver (queries from MLP(e_id))  -> x_id   (B, N_id, T)    fused into the text
        -> face perceiver (learned queries)        -> x_face (B, N_face, D)  joined to the attention
    CAN per adapter block: cond = SiLU(temb + Linear_id(mean_k x_id_k)) -> Linear_l(cond) -> 14 D-chunks:
        6 for the face tokens (attn shift/scale/gate, FF shift/scale/gate; initialized from the
        block's text expert), 8 residuals added to the block's video/text shift and scale (zero-init).

Choices the paper leaves open and we fixed (all config fields, documented in README):
every Linear has a bias; GELU is the exact (erf) one; LayerNorms are affine with eps 1e-5;
perceiver attention has no 1/sqrt scaling change (softmax(q k^T / sqrt(head_dim))).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.dit import BlockConditioning, CogVideoXTransformer3D
from mm_jax.models.layers import Dense, LayerNorm, attention, canonical_dtype

DEFAULT_CLASS_WORDS = ("man", "woman", "person", "boy", "girl", "kid", "child", "lady", "gentleman", "guy",
                       "baby", "teenager", "men", "women", "people")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    dit_dim: int = 3072            # D
    text_dim: int = 4096           # T
    time_embed_dim: int = 512
    num_dit_layers: int = 42
    adapter_layers: tuple = tuple(range(0, 42, 2))
    clip_width: int = 1024
    id_dim: int = 512
    width: int = 1024              # perceiver width W
    depth: int = 4
    heads: int = 16
    head_dim: int = 64
    ff_mult: int = 4
    num_face_tokens: int = 32
    num_id_tokens: int = 4
    id_mlp_hidden: int = 1024
    norm_eps: float = 1e-5
    class_words: tuple = DEFAULT_CLASS_WORDS
    dtype: str = "float32"
    param_dtype: str = "float32"

    RUNTIME_FIELDS = ("dtype", "param_dtype")

    @classmethod
    def for_dit(cls, dit_cfg, **overrides) -> "AdapterConfig":
        """The spec's adapter for a DiT config: text width from the DiT, adapters in the even blocks."""
        kw = dict(dit_dim=dit_cfg.inner_dim, text_dim=dit_cfg.text_embed_dim, time_embed_dim=dit_cfg.time_embed_dim,
                  num_dit_layers=dit_cfg.num_layers, adapter_layers=tuple(range(0, dit_cfg.num_layers, 2)))
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "AdapterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        cfg = cls(**kw, **overrides)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_FIELDS:
            d.pop(k)
        d["_class_name"] = "MagicMirrorAdapter"
        return d

    def validate(self) -> None:
        bad = [i for i in self.adapter_layers if not 0 <= i < self.num_dit_layers]
        if bad:
            raise ValueError(f"adapter_layers {bad} outside the DiT's {self.num_dit_layers} blocks")
        if list(self.adapter_layers) != sorted(set(self.adapter_layers)):
            raise ValueError(f"adapter_layers {self.adapter_layers} must be increasing and unique")


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def _zeros(key, shape, dtype):
    return jnp.zeros(shape, dtype)


class PerceiverLayer(nnx.Module):
    """q <- q + Attn(LN_q(q), kv = [LN_f(f'), LN_q(q)]);  q <- q + FF(LN_ff(q))."""

    def __init__(self, cfg: AdapterConfig, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        w, inner = cfg.width, cfg.heads * cfg.head_dim
        ln = dict(eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        kw = dict(dtype=dt, param_dtype=pdt, rngs=rngs)
        self.norm_f = LayerNorm(w, **ln)
        self.norm_q = LayerNorm(w, **ln)
        self.to_q = Dense(w, inner, axes=("embed", "heads"), **kw)
        self.to_k = Dense(w, inner, axes=("embed", "heads"), **kw)
        self.to_v = Dense(w, inner, axes=("embed", "heads"), **kw)
        self.to_out = Dense(inner, w, axes=("heads", "embed"), **kw)
        self.norm_ff = LayerNorm(w, **ln)
        self.ff_in = Dense(w, cfg.ff_mult * w, axes=("embed", "mlp"), **kw)
        self.ff_out = Dense(cfg.ff_mult * w, w, axes=("mlp", "embed"), **kw)
        self.heads, self.head_dim = cfg.heads, cfg.head_dim

    def __call__(self, q, f):
        b, n, _ = q.shape
        qn = self.norm_q(q)
        kv = jnp.concatenate([self.norm_f(f), qn], axis=1)
        split = lambda t: t.reshape(b, t.shape[1], self.heads, self.head_dim)
        o = attention(split(self.to_q(qn)), split(self.to_k(kv)), split(self.to_v(kv)))
        q = q + self.to_out(o.reshape(b, n, -1))
        return q + self.ff_out(_gelu(self.ff_in(self.norm_ff(q))))


class Perceiver(nnx.Module):
    """f (B, P, clip_width), queries (B, N, W) or learned -> LN(Linear(W -> out)(q)) (B, N, out)."""

    def __init__(self, cfg: AdapterConfig, out_dim: int, num_latents: int | None, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.proj_in = Dense(cfg.clip_width, cfg.width, axes=(None, "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.latents = (nnx.Param(jax.random.normal(rngs.params(), (num_latents, cfg.width), pdt) * cfg.width ** -0.5,
                                  logical_axes=(None, "embed")) if num_latents else None)
        self.layers = nnx.List([PerceiverLayer(cfg, rngs=rngs) for _ in range(cfg.depth)])
        self.proj_out = Dense(cfg.width, out_dim, axes=("embed", None), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.norm_out = LayerNorm(out_dim, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)

    def __call__(self, f, queries=None):
        f = self.proj_in(f)
        q = queries if queries is not None else jnp.broadcast_to(self.latents[...].astype(f.dtype),
                                                                 (f.shape[0],) + self.latents.get_value().shape)
        for layer in self.layers:
            q = layer(q, f)
        return self.norm_out(self.proj_out(q))


class MLP2(nnx.Module):
    """Linear -> GELU -> Linear (``linear_1``, ``linear_2``); the last may start at zero."""

    def __init__(self, din, dhidden, dout, cfg: AdapterConfig, *, zero_last: bool = False, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.linear_1 = Dense(din, dhidden, axes=("embed", "mlp"), dtype=dt, param_dtype=pdt, rngs=rngs)
        self.linear_2 = Dense(dhidden, dout, axes=("mlp", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs,
                              kernel_init=_zeros if zero_last else None)

    def __call__(self, x):
        return self.linear_2(_gelu(self.linear_1(x)))


class MagicMirrorAdapter(nnx.Module):
    """All trainable Magic Mirror parameters (the DiT, T5, VAE, CLIP and ArcFace stay frozen)."""

    def __init__(self, cfg: AdapterConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.face_perceiver = Perceiver(cfg, cfg.dit_dim, cfg.num_face_tokens, rngs=rngs)
        self.id_mlp = MLP2(cfg.id_dim, cfg.id_mlp_hidden, cfg.num_id_tokens * cfg.width, cfg, rngs=rngs)
        self.id_perceiver = Perceiver(cfg, cfg.text_dim, None, rngs=rngs)
        self.fuse_mlp = MLP2(2 * cfg.text_dim, cfg.text_dim, cfg.text_dim, cfg, zero_last=True, rngs=rngs)
        self.linear_id = Dense(cfg.text_dim, cfg.time_embed_dim, axes=("embed", "cond"), dtype=dt, param_dtype=pdt,
                               kernel_init=_zeros, rngs=rngs)
        self.can = nnx.List([Dense(cfg.time_embed_dim, 14 * cfg.dit_dim, axes=("cond", "mlp"), dtype=dt,
                                   param_dtype=pdt, kernel_init=_zeros, rngs=rngs) for _ in cfg.adapter_layers])

    # -- identity embeddings ----------------------------------------------------------------------
    def encode(self, clip_hidden: jax.Array, e_id: jax.Array):
        """-> x_id (B, N_id, T), x_face (B, N_face, D)."""
        cfg = self.cfg
        q_id = self.id_mlp(e_id.astype(canonical_dtype(cfg.dtype))).reshape(e_id.shape[0], cfg.num_id_tokens, cfg.width)
        return self.id_perceiver(clip_hidden, q_id), self.face_perceiver(clip_hidden)

    # -- fusion into the text embedding -----------------------------------------------------------
    def fuse(self, text: jax.Array, x_id: jax.Array, class_index: jax.Array) -> jax.Array:
        """Replace token ``class_index`` (B,) of text (B, L, T) by N_id tokens c_w + MLP([c_w, x_id_k]);
        the last N_id - 1 positions fall off so the length stays L."""
        b, L, _ = text.shape
        n = self.cfg.num_id_tokens
        c_w = jnp.take_along_axis(text, class_index[:, None, None], axis=1)  # (B, 1, T)
        fused = c_w + self.fuse_mlp(jnp.concatenate([jnp.broadcast_to(c_w, x_id.shape[:2] + (c_w.shape[-1],)),
                                                     x_id.astype(text.dtype)], axis=-1))
        j = jnp.arange(L)[None, :]
        w = class_index[:, None]
        src = jnp.where(j < w, j, jnp.where(j < w + n, w, j - n + 1))
        out = jnp.take_along_axis(text, src[..., None], axis=1)
        k = jnp.clip(j - w, 0, n - 1)
        from_fused = jnp.take_along_axis(fused, k[..., None], axis=1)
        return jnp.where(((j >= w) & (j < w + n))[..., None], from_fused, out)

    # -- CAN ---------------------------------------------------------------------------------------
    def block_conditioning(self, x_id: jax.Array, has_id: jax.Array | None = None):
        """The DiT hook: ``(block index, temb) -> BlockConditioning | None``. Samples with
        ``has_id`` False get zero residuals (their face tokens are masked as keys by the caller)."""
        d = self.cfg.dit_dim
        slot = {layer: k for k, layer in enumerate(self.cfg.adapter_layers)}
        id_vec = self.linear_id(jnp.mean(x_id, axis=1))

        def fn(i: int, temb: jax.Array):
            if i not in slot:
                return None
            cond = jax.nn.silu(temb + id_vec.astype(temb.dtype))
            m = self.can[slot[i]](cond).reshape(temb.shape[0], 14, d)
            res = m[:, 6:]
            if has_id is not None:
                res = res * has_id.astype(res.dtype)[:, None, None]
            return BlockConditioning(extra_mod=m[:, :6], residual=res)

        return fn

    def init_from_dit(self, dit: CogVideoXTransformer3D) -> None:
        """Face modulation starts as the text expert of each adapter block (rows enc_shift, enc_scale,
        enc_gate of norm1/norm2), residuals at zero: at step 0 face tokens are modulated like text."""
        d = self.cfg.dit_dim
        for k, layer in enumerate(self.cfg.adapter_layers):
            blk = dit.transformer_blocks[layer]
            kern = jnp.zeros_like(self.can[k].kernel[...])
            bias = jnp.zeros_like(self.can[k].bias[...])
            for slot, norm in ((0, blk.norm1), (1, blk.norm2)):
                kern = kern.at[:, slot * 3 * d:(slot + 1) * 3 * d].set(norm.linear.kernel[...][:, 3 * d:])
                bias = bias.at[slot * 3 * d:(slot + 1) * 3 * d].set(norm.linear.bias[...][3 * d:])
            self.can[k].kernel.set_value(kern)
            self.can[k].bias.set_value(bias)


def identity_forward(dit: CogVideoXTransformer3D, adapter: MagicMirrorAdapter | None, latents, text, timestep, *,
                     x_id=None, x_face=None, has_id=None):
    """The DiT with the identity joined (text must already be fused where has_id). With no adapter or
    no identity this is exactly the plain DiT."""
    if adapter is None or x_face is None:
        return dit(latents, text, timestep)
    mask = None if has_id is None else jnp.broadcast_to(has_id[:, None], x_face.shape[:2])
    return dit(latents, text, timestep, extra_tokens=x_face, extra_mask=mask,
               block_conditioning=adapter.block_conditioning(x_id, has_id))


def find_class_token(tokenizer, prompt: str, input_ids: np.ndarray, class_words: Sequence[str]) -> int:
    """Index of the first T5 token of the first class word found in ``prompt``.

    Words are matched case-insensitively as whole words; the token index is found by tokenizing
    the prompt text before the word. Raises ValueError listing the words when none is present.
    """
    import re

    best = None
    for word in class_words:
        m = re.search(rf"\b{re.escape(word)}\b", prompt, flags=re.IGNORECASE)
        if m and (best is None or m.start() < best.start()):
            best = m
    if best is None:
        raise ValueError(f"the prompt names no subject class word; it needs one of: {', '.join(class_words)} "
                         f"(prompt: {prompt!r})")
    # tokens of the text through the word, minus the word's own tokens = where the word starts
    prefix = tokenizer(prompt[:best.end()], add_special_tokens=False).input_ids
    word_ids = tokenizer(prompt[best.start():best.end()], add_special_tokens=False).input_ids
    idx = max(len(prefix) - len(word_ids), 0)
    if idx >= len(input_ids):
        raise ValueError(f"class word {best.group(0)!r} lies beyond the {len(input_ids)} text tokens kept")
    return int(idx)


def count_params(cfg: AdapterConfig) -> int:
    abstract = nnx.eval_shape(lambda: MagicMirrorAdapter(cfg, rngs=nnx.Rngs(0)))
    return int(sum(np.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))))
