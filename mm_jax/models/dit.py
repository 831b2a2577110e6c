"""The CogVideoX video DiT (``CogVideoXTransformer3DModel``) in Flax NNX.

Reads top-down like the architecture: patch embedding (text projection + 2D patches per frame),
sinusoidal time embedding, N blocks of expert AdaLN + joint [text, video] attention with QK
LayerNorm and 3D RoPE (or a 3D sin-cos table for the 2B), a tanh-GELU feed-forward, the output
norms and unpatchify.

Public layout is channels-last: latents ``(B, F, H, W, C)`` in, ``(B, F, H, W, C_out)`` out,
where F/H/W are *latent* frames/rows/columns (H, W multiples of the patch size).

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

import dataclasses
from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mm_jax import parallel, presets
from mm_jax.models import learned_positions
from mm_jax.models import layers as L
from mm_jax.models.block_runner import REMAT_POLICIES, run_blocks
from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import attention, canonical_dtype, gelu_tanh, timestep_embedding
from mm_jax.models.positional import rope_3d, sincos_3d
from mm_jax.parallel import constrain
from mm_jax.profiling import BLOCK_SCOPE

_5B = presets.load("cogvideox5b_transformer")


@dataclasses.dataclass(frozen=True)
class DiTConfig(ConfigBase):
    """Architecture (diffusers ``config.json`` field names) plus runtime choices. The architecture
    defaults are the published CogVideoX-5B's, read from its preset (``mm_jax/presets``, their one home)."""

    num_attention_heads: int = _5B["num_attention_heads"]
    attention_head_dim: int = _5B["attention_head_dim"]
    in_channels: int = _5B["in_channels"]
    out_channels: Optional[int] = _5B["out_channels"]
    num_layers: int = _5B["num_layers"]
    patch_size: int = _5B["patch_size"]
    patch_size_t: Optional[int] = _5B["patch_size_t"]
    text_embed_dim: int = _5B["text_embed_dim"]
    time_embed_dim: int = _5B["time_embed_dim"]
    max_text_seq_length: int = _5B["max_text_seq_length"]
    sample_width: int = _5B["sample_width"]
    sample_height: int = _5B["sample_height"]
    sample_frames: int = _5B["sample_frames"]
    temporal_compression_ratio: int = _5B["temporal_compression_ratio"]
    norm_eps: float = _5B["norm_eps"]
    norm_elementwise_affine: bool = _5B["norm_elementwise_affine"]
    flip_sin_to_cos: bool = _5B["flip_sin_to_cos"]
    freq_shift: int = _5B["freq_shift"]
    patch_bias: bool = _5B["patch_bias"]
    attention_bias: bool = _5B["attention_bias"]
    use_rotary_positional_embeddings: bool = _5B["use_rotary_positional_embeddings"]
    use_learned_positional_embeddings: bool = _5B["use_learned_positional_embeddings"]
    spatial_interpolation_scale: float = _5B["spatial_interpolation_scale"]
    temporal_interpolation_scale: float = _5B["temporal_interpolation_scale"]
    activation_fn: str = _5B["activation_fn"]
    timestep_activation_fn: str = _5B["timestep_activation_fn"]
    ofs_embed_dim: Optional[int] = _5B["ofs_embed_dim"]
    dropout: float = _5B["dropout"]
    # runtime (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: Optional[str] = None
    scan_layers: bool = True       # blocks under lax.scan (one compiled body) or unrolled
    attention_parallelism: Optional[str] = None  # over a context mesh axis: "ulysses" | "ring" | None (default)

    RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_layers",
                      "attention_parallelism")
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
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"CogVideoX variants with {bad} (CogVideoX 1.5) are not supported; supported: the 1.0 "
                             "models (2B sin-cos, 5B RoPE, 5B-I2V RoPE + learned positions)")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("use_learned_positional_embeddings needs use_rotary_positional_embeddings "
                             "(as diffusers: learned positions exist only beside RoPE)")
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(f"activation_fn {self.activation_fn!r} / timestep_activation_fn "
                             f"{self.timestep_activation_fn!r}: only 'gelu-approximate' / 'silu' are supported")
        if self.attention_head_dim % 16 and self.use_rotary_positional_embeddings:
            # 3D RoPE splits the head into t: Dh/4, h: 3Dh/8, w: 3Dh/8 channels, each in rotated pairs
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must be a multiple of 16 for 3D RoPE")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")


@flax.struct.dataclass
class BlockConditioning:
    """What an adapter gives its blocks (Magic Mirror's CAN), stacked over the adapter blocks.

    extra_mod: (A, B, 6, D) shift, scale, gate of the extra tokens for attention, then for the FF.
    residual:  (A, B, 8, D) added to (video shift, video scale, text shift, text scale) of norm1,
               then the same four of norm2. Gates are never changed.
    """
    extra_mod: jax.Array
    residual: jax.Array


def _dense(cfg, din, dout, axes, **kw):
    return L.linear(din, dout, axes=axes, dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype),
                    **kw)


def _norm(cfg, dim, eps, affine=True):
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
        self.text_proj = _dense(cfg, cfg.text_embed_dim, d, ("mlp", "embed"), rngs=rngs)

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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate channel pairs (2i, 2i+1) in float32: x (B, N, heads, Dh), cos/sin (N, Dh)."""
    dt = x.dtype
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1)
    return out.reshape(x.shape).astype(dt)


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


class AdaLayerNormZero(nnx.Module):
    """CogVideoX expert AdaLN (``CogVideoXLayerNormZero``).

    m = linear(SiLU(temb)) -> six D-chunks: shift, scale, gate (video), enc_shift, enc_scale,
    enc_gate (text); one shared LayerNorm; y = LN(h) * (1 + scale) + shift with each token's own
    expert. Extra tokens take ``extra_mod`` (the adapter's shift, scale, gate) or, in a block
    without the adapter, zero gate (they pass through unchanged).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.linear = _dense(cfg, cfg.time_embed_dim, 6 * d, ("cond", "mlp"), rngs=rngs)
        self.norm = _norm(cfg, d, cfg.norm_eps, cfg.norm_elementwise_affine)
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


class Attention(nnx.Module):
    """Joint multi-head attention with per-head QK LayerNorm (eps 1e-6) and RoPE on video tokens."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d, hd = cfg.inner_dim, cfg.attention_head_dim
        self.to_q = _dense(cfg, d, d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.to_k = _dense(cfg, d, d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.to_v = _dense(cfg, d, d, ("embed", "heads"), use_bias=cfg.attention_bias, rngs=rngs)
        self.norm_q = _norm(cfg, hd, 1e-6)
        self.norm_k = _norm(cfg, hd, 1e-6)
        self.to_out = _dense(cfg, d, d, ("heads", "embed"), rngs=rngs)
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
        self.proj_in = _dense(cfg, d, 4 * d, ("embed", "mlp"), rngs=rngs)
        self.proj_out = _dense(cfg, 4 * d, d, ("mlp", "embed"), rngs=rngs)

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


class OutputNorm(nnx.Module):
    """``norm_out``: m = linear(SiLU(temb)); shift = m[:D], scale = m[D:] (shift first); LN(x)(1+scale)+shift."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        d = cfg.inner_dim
        self.linear = _dense(cfg, cfg.time_embed_dim, 2 * d, ("cond", "mlp"), rngs=rngs)
        self.norm = _norm(cfg, d, cfg.norm_eps, cfg.norm_elementwise_affine)
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
        self.time_embedding = L.TimestepEmbedding(d, cfg.time_embed_dim, dtype=dtype, param_dtype=pdt, rngs=rngs)
        self.transformer_blocks = L.stack(cfg.num_layers, lambda r: CogVideoXBlock(cfg, rngs=r), rngs)
        self.norm_final = _norm(cfg, d, cfg.norm_eps, cfg.norm_elementwise_affine)
        self.norm_out = OutputNorm(cfg, rngs=rngs)
        p = cfg.patch_size
        self.proj_out = _dense(cfg, d, p * p * cfg.out_dim, ("embed", None), rngs=rngs)

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
