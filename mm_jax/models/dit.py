"""The CogVideoX video DiT (``CogVideoXTransformer3DModel``) in Flax NNX.

Reads top-down like the architecture: patch embedding (text projection + 2D patches per frame),
sinusoidal time embedding, N blocks of expert AdaLN + joint [text, video] attention with QK
LayerNorm and 3D RoPE (or a 3D sin-cos table for the 2B), a tanh-GELU feed-forward, the output
norms and unpatchify.

Public layout is channels-last: latents ``(B, F, H, W, C)`` in, ``(B, F, H, W, C_out)`` out,
where F/H/W are *latent* frames/rows/columns (H, W multiples of the patch size).

Adapter hooks (Magic Mirror): ``extra_tokens`` join the attention of the blocks for which
``block_conditioning(i, temb)`` returns a ``BlockConditioning``; the sequence there is
[extra, text, video]. Extra tokens get their own shift/scale/gate (a third "expert") and the
conditioning adds residuals to the video/text shift and scale. Blocks where it returns None see
only [text, video] and carry the extra stream through unchanged.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import (Dense, LayerNorm, TimestepEmbedding, attention, canonical_dtype, gelu_tanh,
                                  timestep_embedding)
from mm_jax.models.positional import rope_3d, sincos_3d
from mm_jax.parallel import constrain

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}


@dataclasses.dataclass(frozen=True)
class DiTConfig(ConfigBase):
    """Architecture (diffusers ``config.json`` field names) plus runtime choices."""

    num_attention_heads: int = 48
    attention_head_dim: int = 64
    in_channels: int = 16
    out_channels: Optional[int] = 16
    num_layers: int = 42
    patch_size: int = 2
    patch_size_t: Optional[int] = None
    text_embed_dim: int = 4096
    time_embed_dim: int = 512
    max_text_seq_length: int = 226
    sample_width: int = 90
    sample_height: int = 60
    sample_frames: int = 49
    temporal_compression_ratio: int = 4
    norm_eps: float = 1e-5
    norm_elementwise_affine: bool = True
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    patch_bias: bool = True
    attention_bias: bool = True
    use_rotary_positional_embeddings: bool = True
    use_learned_positional_embeddings: bool = False
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    ofs_embed_dim: Optional[int] = None
    dropout: float = 0.0
    # runtime (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: Optional[str] = None

    RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl")
    TAG = {"_class_name": "CogVideoXTransformer3DModel"}
    STRICT = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    def validate(self) -> None:
        unsupported = {
            "patch_size_t": self.patch_size_t is not None,
            "ofs_embed_dim": self.ofs_embed_dim is not None,
            "use_learned_positional_embeddings": self.use_learned_positional_embeddings,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"CogVideoX variants with {bad} (CogVideoX 1.5 / I2V) are not supported; "
                             "supported: the 1.0 text-to-video models (2B sin-cos, 5B RoPE)")
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(f"activation_fn {self.activation_fn!r} / timestep_activation_fn "
                             f"{self.timestep_activation_fn!r}: only 'gelu-approximate' / 'silu' are supported")
        if self.attention_head_dim % 8 and self.use_rotary_positional_embeddings:
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must be a multiple of 8 for 3D RoPE")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")


@flax.struct.dataclass
class BlockConditioning:
    """What an adapter gives one block (Magic Mirror's CAN), all ``(B, k, D)``.

    extra_mod: (B, 6, D) shift, scale, gate of the extra tokens for attention, then for the FF.
    residual:  (B, 8, D) added to (video shift, video scale, text shift, text scale) of norm1,
               then the same four of norm2. Gates are never changed.
    """
    extra_mod: jax.Array
    residual: jax.Array


class PatchEmbed(nnx.Module):
    """Text projection and per-frame 2D patches (``CogVideoXPatchEmbed``, 1.0 models).

    text (B, L, T) -> (B, L, D); latents (B, F, H, W, C) -> (B, F*(H/p)*(W/p), D), tokens frame-major.
    ``proj.kernel`` is the patch conv kernel (p, p, C, D); features are read as (dy, dx, c).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.inner_dim
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.p = p
        self.dtype = dtype
        self.proj = nnx.Module()
        self.proj.kernel = nnx.Param(jax.random.normal(rngs.params(), (p, p, c, d), pdt) / np.sqrt(p * p * c),
                                     logical_axes=("patch", "patch", "channels", "embed"))
        self.proj.bias = nnx.Param(jnp.zeros((d,), pdt), logical_axes=("embed",)) if cfg.patch_bias else None
        self.text_proj = Dense(cfg.text_embed_dim, d, axes=("mlp", "embed"), dtype=dtype, param_dtype=pdt, rngs=rngs)

    def __call__(self, text: jax.Array, latents: jax.Array):
        b, f, h, w, c = latents.shape
        p = self.p
        x = latents.astype(self.dtype).reshape(b, f, h // p, p, w // p, p, c)
        x = jnp.einsum("bfiyjxc,yxcd->bfijd", x, self.proj.kernel[...].astype(self.dtype))
        if self.proj.bias is not None:
            x = x + self.proj.bias[...].astype(self.dtype)
        return self.text_proj(text), x.reshape(b, f * (h // p) * (w // p), -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) in float32: x (B, N, heads, Dh), cos/sin (N, Dh)."""
    dt = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1)
    return out.reshape(x.shape).astype(dt)


class AdaLayerNormZero(nnx.Module):
    """CogVideoX expert AdaLN (``CogVideoXLayerNormZero``).

    m = linear(SiLU(temb)) -> six D-chunks: shift, scale, gate (video), enc_shift, enc_scale,
    enc_gate (text); one shared LayerNorm; y = LN(x) * (1 + scale) + shift.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.linear = Dense(cfg.time_embed_dim, 6 * d, axes=("cond", "mlp"), dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.norm = LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, dtype=dtype, param_dtype=pdt)
        self.d = d

    def modulation(self, temb: jax.Array) -> jax.Array:
        """(B, time_embed_dim) -> (B, 6, D)."""
        return self.linear(jax.nn.silu(temb)).reshape(temb.shape[0], 6, self.d)

    def __call__(self, x, c, temb, residual=None):
        m = self.modulation(temb)
        shift, scale, gate, e_shift, e_scale, e_gate = (m[:, i, None, :] for i in range(6))
        if residual is not None:  # (B, 4, D): video shift, video scale, text shift, text scale
            r = residual.astype(m.dtype)
            shift, scale = shift + r[:, 0, None], scale + r[:, 1, None]
            e_shift, e_scale = e_shift + r[:, 2, None], e_scale + r[:, 3, None]
        x = self.norm(x) * (1 + scale) + shift
        c = self.norm(c) * (1 + e_scale) + e_shift
        return x, c, gate, e_gate

    def modulate(self, f, mod3):
        """Extra tokens with their own (shift, scale, gate) (B, 3, D) through the shared norm."""
        mod3 = mod3.astype(f.dtype)
        return self.norm(f) * (1 + mod3[:, 1, None]) + mod3[:, 0, None], mod3[:, 2, None]


class Attention(nnx.Module):
    """Joint multi-head attention with per-head QK LayerNorm (eps 1e-6) and RoPE on video tokens."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        kw = dict(use_bias=cfg.attention_bias, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.to_q = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_k = Dense(d, d, axes=("embed", "heads"), **kw)
        self.to_v = Dense(d, d, axes=("embed", "heads"), **kw)
        self.norm_q = LayerNorm(hd, eps=1e-6, dtype=dtype, param_dtype=pdt)
        self.norm_k = LayerNorm(hd, eps=1e-6, dtype=dtype, param_dtype=pdt)
        self.to_out = Dense(d, d, axes=("heads", "embed"), use_bias=True, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.heads, self.head_dim = cfg.num_attention_heads, hd
        self.impl = cfg.attention_impl

    def __call__(self, s: jax.Array, num_video: int, rope=None, key_mask=None) -> jax.Array:
        """s: (B, S, D) with the last ``num_video`` tokens video -> (B, S, D)."""
        b, n, _ = s.shape
        heads = lambda t: constrain(t.reshape(b, n, self.heads, self.head_dim), ("batch", "seq", "act_heads", None))
        q, k, v = heads(self.to_q(s)), heads(self.to_k(s)), heads(self.to_v(s))
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:
            cos, sin = rope
            nv = num_video
            q = jnp.concatenate([q[:, :-nv], apply_rope(q[:, -nv:], cos, sin)], axis=1)
            k = jnp.concatenate([k[:, :-nv], apply_rope(k[:, -nv:], cos, sin)], axis=1)
        o = attention(q, k, v, key_mask=key_mask, implementation=self.impl)
        return self.to_out(o.reshape(b, n, -1))


class FeedForward(nnx.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D) (diffusers ``ff.net.0.proj`` / ``ff.net.2``)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.proj_in = Dense(d, 4 * d, axes=("embed", "mlp"), dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.proj_out = Dense(4 * d, d, axes=("mlp", "embed"), dtype=dtype, param_dtype=pdt, rngs=rngs)

    def __call__(self, x):
        h = constrain(gelu_tanh(self.proj_in(x)), ("batch", "seq", "act_mlp"))
        return self.proj_out(h)


class CogVideoXBlock(nnx.Module):
    """One DiT block: x (B, N, D) video, c (B, L, D) text, optional extra (B, E, D) -> same shapes."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNormZero(cfg, rngs=rngs)
        self.attn1 = Attention(cfg, rngs=rngs)
        self.norm2 = AdaLayerNormZero(cfg, rngs=rngs)
        self.ff = FeedForward(cfg, rngs=rngs)

    def __call__(self, x, c, temb, rope=None, extra=None, extra_mask=None, cond: BlockConditioning | None = None):
        L, N = c.shape[1], x.shape[1]
        use_extra = extra is not None and cond is not None
        r1 = cond.residual[:, :4] if use_extra else None
        r2 = cond.residual[:, 4:] if use_extra else None

        # attention over [extra, text, video]
        xn, cn, gate, e_gate = self.norm1(x, c, temb, r1)
        parts = [cn, xn]
        key_mask = None
        if use_extra:
            fn, f_gate = self.norm1.modulate(extra, cond.extra_mod[:, 0:3])
            parts = [fn] + parts
            if extra_mask is not None:
                key_mask = jnp.concatenate([extra_mask, jnp.ones((x.shape[0], L + N), bool)], axis=1)
        a = self.attn1(jnp.concatenate(parts, axis=1), N, rope, key_mask)
        E = a.shape[1] - L - N
        x = x + gate * a[:, E + L:]
        c = c + e_gate * a[:, E:E + L]
        if use_extra:
            extra = extra + f_gate * a[:, :E]

        # feed-forward, jointly on the same concatenation
        xn, cn, gate, e_gate = self.norm2(x, c, temb, r2)
        parts = [cn, xn]
        if use_extra:
            fn, f_gate = self.norm2.modulate(extra, cond.extra_mod[:, 3:6])
            parts = [fn] + parts
        h = self.ff(jnp.concatenate(parts, axis=1))
        x = constrain(x + gate * h[:, E + L:], ("batch", "seq", "act_embed"))
        c = c + e_gate * h[:, E:E + L]
        if use_extra:
            extra = extra + f_gate * h[:, :E]
        return x, c, extra


class OutputNorm(nnx.Module):
    """``norm_out``: m = linear(SiLU(temb)); shift = m[:D], scale = m[D:] (shift first); LN(x)(1+scale)+shift."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.linear = Dense(cfg.time_embed_dim, 2 * d, axes=("cond", "mlp"), dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.norm = LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, dtype=dtype, param_dtype=pdt)
        self.d = d

    def __call__(self, x, temb):
        m = self.linear(jax.nn.silu(temb))
        shift, scale = m[:, None, :self.d], m[:, None, self.d:]
        return self.norm(x) * (1 + scale) + shift


class CogVideoXTransformer3D(nnx.Module):
    """The CogVideoX DiT.

    __call__(latents (B, F, H, W, C), text (B, L, text_embed_dim), timestep (B,)) -> (B, F, H, W, C_out).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        d = cfg.inner_dim
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.time_embedding = TimestepEmbedding(d, cfg.time_embed_dim, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.transformer_blocks = nnx.List([CogVideoXBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm_final = LayerNorm(d, eps=cfg.norm_eps, affine=cfg.norm_elementwise_affine, dtype=dtype,
                                    param_dtype=pdt)
        self.norm_out = OutputNorm(cfg, rngs=rngs)
        p = cfg.patch_size
        self.proj_out = Dense(d, p * p * cfg.out_dim, axes=("embed", None), dtype=dtype, param_dtype=pdt, rngs=rngs)

    # -- pieces the adapter and the pipeline reuse -------------------------------------------
    def time_embed(self, timestep: jax.Array) -> jax.Array:
        """(B,) -> temb (B, time_embed_dim) in the compute dtype."""
        cfg = self.cfg
        t = timestep_embedding(timestep, cfg.inner_dim, flip_sin_to_cos=cfg.flip_sin_to_cos,
                               freq_shift=cfg.freq_shift)
        return self.time_embedding(t.astype(canonical_dtype(cfg.dtype)))

    def positional_tables(self, frames: int, height: int, width: int):
        """RoPE (cos, sin) for the 5B style, or the sin-cos table for the 2B style; host constants."""
        cfg, p = self.cfg, self.cfg.patch_size
        gh, gw = height // p, width // p
        if cfg.use_rotary_positional_embeddings:
            return rope_3d(cfg.attention_head_dim, frames, gh, gw, cfg.sample_height // p, cfg.sample_width // p)
        return sincos_3d(cfg.inner_dim, frames, gh, gw, cfg.spatial_interpolation_scale,
                         cfg.temporal_interpolation_scale)

    def __call__(self, latents: jax.Array, text: jax.Array, timestep: jax.Array, *,
                 extra_tokens: jax.Array | None = None, extra_mask: jax.Array | None = None,
                 block_conditioning: Callable[[int, jax.Array], BlockConditioning | None] | None = None) -> jax.Array:
        cfg, p = self.cfg, self.cfg.patch_size
        b, f, h, w, _ = latents.shape
        if h % p or w % p:
            raise ValueError(f"latent height/width ({h}, {w}) must be multiples of patch_size {p}")
        temb = self.time_embed(timestep)
        c, x = self.patch_embed(text, latents)
        rope = None
        table = self.positional_tables(f, h, w)
        if cfg.use_rotary_positional_embeddings:
            rope = (jnp.asarray(table[0]), jnp.asarray(table[1]))
        else:
            x = x + jnp.asarray(table, x.dtype)[None]
        x = constrain(x, ("batch", "seq", "act_embed"))

        block_fn = _block_runner(cfg.remat_policy)
        extra = None if extra_tokens is None else extra_tokens.astype(x.dtype)
        for i, block in enumerate(self.transformer_blocks):
            cond = block_conditioning(i, temb) if (block_conditioning is not None and extra is not None) else None
            x, c, extra = block_fn(block, x, c, temb, rope, extra, extra_mask, cond)

        x = self.norm_out(self.norm_final(x), temb)
        x = self.proj_out(x)
        co = cfg.out_dim
        x = x.reshape(b, f, h // p, w // p, co, p, p)
        return x.transpose(0, 1, 2, 5, 3, 6, 4).reshape(b, f, h, w, co)


def _block_runner(policy: str):
    def run(block, *args):
        return block(*args)

    if policy == "none":
        return run
    # jax.checkpoint over the block as a pytree argument: nnx.remat captured the block's variables
    # from an outer trace and failed inside the train step ("Cannot mutate Param from a different
    # trace level"); a pure function of (params, activations) has nothing to mutate.
    return jax.checkpoint(run, policy=REMAT_POLICIES[policy], static_argnums=())
