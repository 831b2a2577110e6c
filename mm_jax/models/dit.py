"""The CogVideoX video DiT (``CogVideoXTransformer3DModel``) in Flax NNX.

Reads top-down like the architecture: patch embedding (text projection + 2D patches per frame),
sinusoidal time embedding, N blocks of expert AdaLN + joint [text, video] attention with QK
LayerNorm and 3D RoPE (or a 3D sin-cos table for the 2B), a tanh-GELU feed-forward, the output
norms and unpatchify.

Public layout is channels-last: latents ``(B, F, H, W, C)`` in, ``(B, F, H, W, C_out)`` out,
where F/H/W are *latent* frames/rows/columns (H, W multiples of the patch size).

The config is ``dit_config.DiTConfig``; the embeddings, the token layout and the AdaLN modulations
are in ``dit_embeddings.py``; this file holds the attention, the blocks and the network.

The N blocks are one stack (parameters with a leading ``layers`` axis) run under ``lax.scan``, so
the 42 blocks of the 5B compile as one body; ``remat_policy`` applies to the scan body.

Adapter hooks (Magic Mirror): ``extra_tokens`` join the attention of the blocks listed in
``adapter_layers``, whose modulation ``conditioning(temb)`` returns stacked (one entry per adapter
block). The sequence there is [text, video, extra]; extra tokens get their own shift/scale/gate
(a third "expert") and the conditioning adds residuals to the video/text shift and scale. The
extra tokens are last so that masking them for some samples (the unconditional half of a CFG
batch, ID dropout) is a per-row key length, which every attention kernel takes (cuDNN's padding
mask, splash's segment ids), instead of a (B, T) key mask cuDNN refuses. Blocks without an
adapter see only [text, video]. When the adapter sits in every p-th block from block 0 (the
paper's every 2nd), the scanned unit is a group of p blocks, the first with the adapter.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mm_jax import parallel
from mm_jax.models import layers as L
from mm_jax.models import learned_positions
from mm_jax.models.block_runner import run_blocks
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.dit_embeddings import (AdaLayerNormZero, BlockConditioning, OutputNorm, PatchEmbed, Tokens, dense,
                                          norm)
from mm_jax.models.layers import attention, canonical_dtype, gelu_tanh, timestep_embedding
from mm_jax.models.positional import rope_3d, sincos_3d
from mm_jax.parallel import constrain
from mm_jax.profiling import BLOCK_SCOPE


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) in float32: x (B, N, heads, Dh), cos/sin (N, Dh)."""
    dt = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1)
    return out.reshape(x.shape).astype(dt)


class Attention(nnx.Module):
    """Joint multi-head attention with per-head QK LayerNorm (eps 1e-6) and RoPE on video tokens."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.to_q = dense(cfg, d, d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.to_k = dense(cfg, d, d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.to_v = dense(cfg, d, d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.norm_q = norm(cfg, hd, 1e-6)
        self.norm_k = norm(cfg, hd, 1e-6)
        self.to_out = dense(cfg, d, d, ("heads", "embed"), rngs=rngs)
        self.heads, self.head_dim = cfg.num_attention_heads, hd
        self.impl, self.parallelism = cfg.attention_impl, cfg.attention_parallelism

    def __call__(self, h: jax.Array, tokens: Tokens, kv_lengths=None) -> jax.Array:
        """h: (B, S, D) -> (B, S, D). ``kv_lengths`` (B,): row b attends to its first
        kv_lengths[b] tokens (the hidden ones are a suffix: padding, or extra tokens)."""
        b, n, _ = h.shape
        heads = lambda t: constrain(t.reshape(b, n, self.heads, self.head_dim), ("batch", "seq", "act_heads", None))
        q, k, v = heads(self.to_q(h)), heads(self.to_k(h)), heads(self.to_v(h))
        q, k = self.norm_q(q), self.norm_k(k)
        if tokens.rope is not None:
            q, k = apply_rope(q, *tokens.rope), apply_rope(k, *tokens.rope)
        o = attention(q, k, v, kv_lengths=kv_lengths, implementation=self.impl, parallelism=self.parallelism)
        o = checkpoint_name(o, "attention")
        return self.to_out(o.reshape(b, n, -1))


class FeedForward(nnx.Module):
    """Linear(D, 4D) -> tanh-GELU -> Linear(4D, D) (diffusers ``ff.net.0.proj`` / ``ff.net.2``)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.proj_in = dense(cfg, d, 4 * d, ("embed", "mlp"), rngs=rngs)
        self.proj_out = dense(cfg, 4 * d, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, x):
        h = constrain(gelu_tanh(self.proj_in(x)), ("batch", "seq", "act_mlp"))
        return self.proj_out(h)


class CogVideoXBlock(nnx.Module):
    """One DiT block over the joint sequence h (B, S, D) = [text | video | extra | pad] -> same shape.

    With ``cond`` (one block's (B, 6, D) / (B, 8, D)) it is an adapter block: the extra tokens are
    modulated by CAN and attend with the rest (keys up to ``kv_lengths``). Without, the extra tokens
    are hidden as keys and pass through unchanged (zero gate): the plain block over [text, video].
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNormZero(cfg, rngs=rngs)
        self.attn1 = Attention(cfg, rngs=rngs)
        self.norm2 = AdaLayerNormZero(cfg, rngs=rngs)
        self.ff = FeedForward(cfg, rngs=rngs)

    def __call__(self, h, temb, tokens: Tokens, kv_lengths=None, cond: BlockConditioning | None = None):
        r1, r2, m1, m2 = (None,) * 4
        if cond is not None:
            r1, r2, m1, m2 = cond.residual[:, :4], cond.residual[:, 4:], cond.extra_mod[:, :3], cond.extra_mod[:, 3:]
        with jax.named_scope(BLOCK_SCOPE):  # names the block's ops in a profile (mm_jax.profiling)
            hn, gate = self.norm1(h, temb, tokens, r1, m1)
            h = h + gate * self.attn1(hn, tokens, kv_lengths)
            hn, gate = self.norm2(h, temb, tokens, r2, m2)
            return constrain(h + gate * self.ff(hn), ("batch", "seq", "act_embed"))


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
        self.time_embedding = L.TimestepEmbedding(d, cfg.time_embed_dim, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.transformer_blocks = L.stack(cfg.num_layers, lambda r: CogVideoXBlock(cfg, rngs=r), rngs)
        self.norm_final = norm(cfg, d, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.norm_out = OutputNorm(cfg, rngs=rngs)
        p = cfg.patch_size
        self.proj_out = dense(cfg, d, p * p * cfg.out_dim, ("embed", None), rngs=rngs)

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
                 extra_tokens: jax.Array | None = None, extra_valid: jax.Array | None = None,
                 conditioning: Callable[[jax.Array], BlockConditioning] | None = None,
                 adapter_layers: tuple[int, ...] = (),
                 after_block: Callable[[jax.Array, Tokens, Any], jax.Array] | None = None,
                 after_block_params: Any = None) -> jax.Array:
        """``extra_tokens`` (B, E, D) join the blocks of ``adapter_layers`` with the stacked
        ``conditioning(temb)``; ``extra_valid`` (B,) bool: False hides a sample's extra tokens (as
        keys, by a shorter key length) and the caller zeroes its residuals, which is the plain model.
        ``after_block(seq, tokens, params_k)`` runs on the joint sequence after the k-th block of
        ``adapter_layers``, with ``after_block_params`` stacked over those blocks (ConsisID's face
        cross-attentions); it works with or without extra tokens."""
        cfg, p = self.cfg, self.cfg.patch_size
        b, f, h, w, _ = latents.shape
        if h % p or w % p:
            raise ValueError(f"latent height/width ({h}, {w}) must be multiples of patch_size {p}")
        temb = self.time_embed(timestep)
        c, x = self.patch_embed(text, latents)
        if cfg.use_learned_positional_embeddings:  # on [text, video], RoPE still applies in attention
            c, x = learned_positions.add(cfg, self.patch_embed.pos_embedding[...], c, x, f, h, w)
        rope = None
        table = self.positional_tables(f, h, w)
        if cfg.use_rotary_positional_embeddings:
            rope = (jnp.asarray(table[0]), jnp.asarray(table[1]))
        else:
            x = x + jnp.asarray(table, x.dtype)[None]
        x = constrain(x, ("batch", "seq", "act_embed"))

        extra, cond, kv_lengths = None, None, None
        if extra_tokens is not None and conditioning is not None:
            extra = extra_tokens.astype(x.dtype)
            cond = conditioning(temb)
        L_, N, E = c.shape[1], x.shape[1], 0 if extra is None else extra.shape[1]
        context = parallel.context_size()
        pad = (-(L_ + N + E)) % context  # the joint sequence splits evenly over the context axis
        if extra is not None and extra_valid is not None:
            kv_lengths = (L_ + N + jnp.where(extra_valid, E, 0)).astype(jnp.int32)
        rope_full = None
        if rope is not None:  # no rotation (cos 1, sin 0) outside the video rows
            rope_full = tuple(jnp.pad(t, ((L_, E + pad), (0, 0)), constant_values=v) for t, v in zip(rope, (1.0, 0.0)))
        tokens = Tokens(L_, N, E, pad, rope_full)
        parts = [c, x] + ([extra] if extra is not None else [])
        if pad:
            parts.append(jnp.zeros((b, pad, c.shape[-1]), x.dtype))
        seq = constrain(jnp.concatenate(parts, axis=1), ("batch", "seq", "act_embed"))
        seq = run_blocks(self.transformer_blocks, seq, temb, tokens, kv_lengths=kv_lengths, cond=cond,
                         adapter_layers=tuple(adapter_layers), after=after_block, after_params=after_block_params,
                         remat_policy=cfg.remat_policy,
                         scan_layers=cfg.scan_layers)
        x = seq[:, L_:L_ + N]

        x = self.norm_out(self.norm_final(x), temb)
        x = self.proj_out(x)
        co = cfg.out_dim
        x = x.reshape(b, f, h // p, w // p, co, p, p)
        return x.transpose(0, 1, 2, 5, 3, 6, 4).reshape(b, f, h, w, co)
