"""The CogVideoX DiT's inputs and its timestep conditioning.

Patch and text embedding into tokens, the layout of the joint sequence [text | video | extra | pad],
the expert AdaLN that modulates each kind of token from the time embedding (and from an adapter's
``BlockConditioning``), and the output AdaLN. ``dit.py`` builds the blocks and the network from them.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models import layers as L
from mm_jax.models import learned_positions
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.layers import canonical_dtype
from mm_jax.parallel import constrain


def dense(cfg, din, dout, axes, **kw):
    """A linear layer in ``cfg``'s dtypes with logical ``axes`` on its kernel."""
    return L.linear(din, dout, axes=axes, dtype=canonical_dtype(cfg.dtype),
                    param_dtype=canonical_dtype(cfg.param_dtype), **kw)


def norm(cfg, dim, eps, affine=True):
    """A LayerNorm over ``dim`` in ``cfg``'s dtypes."""
    return L.layer_norm(dim, eps=eps, affine=affine, dtype=canonical_dtype(cfg.dtype),
                        param_dtype=canonical_dtype(cfg.param_dtype), rngs=nnx.Rngs(0))


class PatchEmbed(nnx.Module):
    """Text projection and per-frame 2D patches (``CogVideoXPatchEmbed``, 1.0 models).

    text (B, L, T) -> (B, L, D); latents (B, F, H, W, C) -> (B, F*(H/p)*(W/p), D), tokens frame-major.
    ``proj`` holds the patch conv's parameters (kernel (p, p, C, D), stride p), applied as a matmul.
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.inner_dim
        dtype, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        if cfg.use_learned_positional_embeddings:  # CogVideoX-5B-I2V: the checkpoint's (1, L + N, D) table
            self.pos_embedding = nnx.Param(L.partitioned(lambda key, shape, dt: jnp.asarray(
                learned_positions.initial_table(cfg), dt), None, None, "embed")(
                rngs.params(), learned_positions.table_shape(cfg), pdt))
        self.proj = nnx.Conv(c, d, kernel_size=(p, p), strides=(p, p), padding="VALID", use_bias=cfg.patch_bias,
                             dtype=dtype, param_dtype=pdt,
                             kernel_init=L.partitioned(nnx.initializers.lecun_normal(), "patch", "patch", "channels",
                                                       "embed"),
                             bias_init=L.partitioned(nnx.initializers.zeros, "embed"), rngs=rngs)
        self.text_proj = dense(cfg, cfg.text_embed_dim, d, ("mlp", "embed"), rngs=rngs)

    def __call__(self, text: jax.Array, latents: jax.Array):
        # The patch conv as a matmul over (p, p, C) patches gathered from the latents: the conv's
        # (B*F, H/p, W/p, D) output reshaped to tokens was a relayout (W/p = 45 rows per tile of 8)
        # that libtpu took minutes to compile for the 5B step; gathering the patches relayouts the
        # 48x smaller (C = 16) input instead.
        b, f, h, w, c = latents.shape
        p, conv = self.proj.kernel_size[0], self.proj
        patches = latents.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        patches = patches.reshape(b, f * (h // p) * (w // p), p * p * c).astype(conv.dtype)
        x = jnp.dot(patches, conv.kernel[...].reshape(p * p * c, -1).astype(conv.dtype))
        if conv.bias is not None:
            x = x + conv.bias[...].astype(conv.dtype)
        return self.text_proj(text), x


@flax.struct.dataclass
class Tokens:
    """Where each kind of token sits in the joint sequence [text L | video N | extra E | pad P]
    (static sizes), with the video RoPE spread over the whole sequence."""
    text: int = flax.struct.field(pytree_node=False)
    video: int = flax.struct.field(pytree_node=False)
    extra: int = flax.struct.field(pytree_node=False)
    pad: int = flax.struct.field(pytree_node=False)
    rope: tuple | None = None  # (cos, sin) (S, Dh): the video rows, 1 / 0 elsewhere (no rotation)

    @property
    def total(self) -> int:
        return self.text + self.video + self.extra + self.pad

    def per_token(self, text, video, extra):
        """(B, D) values per kind -> (B, S, D): text rows get ``text``, ... padding 0."""
        kind = jnp.concatenate([jnp.full((n,), k, jnp.int32) for k, n in
                                enumerate((self.text, self.video, self.extra, self.pad))])[None, :, None]
        zero = jnp.zeros_like(video)
        out = jnp.where(kind == 0, text[:, None], jnp.where(kind == 1, video[:, None], jnp.where(
            kind == 2, (zero if extra is None else extra)[:, None], zero[:, None])))
        return constrain(out, ("batch", "seq", None))


@flax.struct.dataclass
class BlockConditioning:
    """What an adapter gives its blocks (Magic Mirror's CAN), stacked over the adapter blocks.

    extra_mod: (A, B, 6, D) shift, scale, gate of the extra tokens for attention, then for the FF.
    residual:  (A, B, 8, D) added to (video shift, video scale, text shift, text scale) of norm1,
               then the same four of norm2. Gates are never changed.
    """
    extra_mod: jax.Array
    residual: jax.Array


class AdaLayerNormZero(nnx.Module):
    """CogVideoX expert AdaLN (``CogVideoXLayerNormZero``).

    m = linear(SiLU(temb)) -> six D-chunks: shift, scale, gate (video), enc_shift, enc_scale,
    enc_gate (text); one shared LayerNorm; y = LN(h) * (1 + scale) + shift with each token's own
    expert. Extra tokens take ``extra_mod`` (the adapter's shift, scale, gate) or, in a block
    without the adapter, zero gate (they pass through unchanged).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.linear = dense(cfg, cfg.time_embed_dim, 6 * d, ("cond", "mlp"), rngs=rngs)
        self.norm = norm(cfg, d, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.d = d

    def modulation(self, temb: jax.Array) -> jax.Array:
        """(B, time_embed_dim) -> (B, 6, D)."""
        return self.linear(jax.nn.silu(temb)).reshape(temb.shape[0], 6, self.d)

    def __call__(self, h, temb, tokens: Tokens, residual=None, extra_mod=None):
        """h (B, S, D) -> (normed and modulated h, per-token gate (B, S, D)). ``residual`` (B, 4, D):
        added to video shift, video scale, text shift, text scale; ``extra_mod`` (B, 3, D)."""
        m = self.modulation(temb)
        shift, scale, gate, e_shift, e_scale, e_gate = (m[:, i] for i in range(6))
        if residual is not None:
            r = residual.astype(m.dtype)
            shift, scale, e_shift, e_scale = shift + r[:, 0], scale + r[:, 1], e_shift + r[:, 2], e_scale + r[:, 3]
        f = (None,) * 3 if extra_mod is None else tuple(extra_mod.astype(m.dtype)[:, i] for i in range(3))
        shift_t = tokens.per_token(e_shift, shift, f[0])
        scale_t = tokens.per_token(e_scale, scale, f[1])
        gate_t = tokens.per_token(e_gate, gate, f[2])
        # The modulated activations are materialized before the q/k/v and feed-forward matmuls read
        # them: fused into those matmuls' operands, the per-token select chain above made libtpu's
        # backend take ~30 s per matmul fusion ("slow compilation", retried) in the 5B step. The
        # barrier changes no value, only what XLA may fuse.
        return jax.lax.optimization_barrier(self.norm(h) * (1 + scale_t) + shift_t), gate_t


class OutputNorm(nnx.Module):
    """``norm_out``: m = linear(SiLU(temb)); shift = m[:D], scale = m[D:] (shift first); LN(x)(1+scale)+shift."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.linear = dense(cfg, cfg.time_embed_dim, 2 * d, ("cond", "mlp"), rngs=rngs)
        self.norm = norm(cfg, d, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.d = d

    def __call__(self, x, temb):
        m = self.linear(jax.nn.silu(temb))
        shift, scale = m[:, None, :self.d], m[:, None, self.d:]
        return self.norm(x) * (1 + scale) + shift
