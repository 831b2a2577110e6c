"""The EVA02-CLIP-L-14-336 vision tower (``consisid_eva_clip`` ``EVAVisionTransformer``) in Flax NNX,
as ConsisID uses it on the grey face crop.

Patches (stride-p conv with bias) + class token + learned absolute positions -> N pre-LN blocks ->
final LayerNorm -> class token -> ``head``. A block: LN -> attention with separate q/k/v projections
(``q_bias`` and ``v_bias``, no k bias), 2D rotary positions on the patch tokens (not the class
token), a LayerNorm on the attention output before ``proj`` (EVA02's "subln") -> residual; LN ->
SwiGLU ``w3(ffn_ln(silu(w1 x) * w2 x))`` -> residual. Every LayerNorm has eps 1e-6.

ConsisID also takes the residual stream *entering* blocks 4, 8, 12, 16 and 20 (class token
included, before the block's norm): ``pixels (B, H, W, 3) -> ((B, embed_dim), (5, B, 1+P, width))``.
The blocks are one stack (``blocks``, a leading ``layers`` axis) run under ``lax.scan``.
``preprocess`` is ConsisID's input transform (torchvision's antialiased bicubic resize to 336 and
OpenAI CLIP's mean/std), in numpy. Weights: ``tools/convert_weights/eva_clip.py``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.face import CLIP_MEAN, CLIP_STD
from mm_jax.models import layers as L
from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import attention, canonical_dtype
from mm_jax.parallel import constrain


@dataclasses.dataclass(frozen=True)
class EVAVisionConfig(ConfigBase):
    """The release's sizes by default (consisid_eva_clip ``EVA02-CLIP-L-14-336.json``)."""
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    head_width: int = 64            # heads = width // head_width
    mlp_hidden: int = 2730          # int(1024 * mlp_ratio 2.6667), as the reference truncates
    embed_dim: int = 768            # head output
    pt_hw_seq_len: int = 16         # RoPE positions are the patch grid rescaled to this many (intp_freq)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6
    # the residual stream entering these blocks is returned (the reference hard-codes 0 < i <= 20, i % 4 == 0)
    hidden_state_blocks: tuple[int, ...] = (4, 8, 12, 16, 20)
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True

    RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers")
    TAG = {"architectures": ["EVAVisionTransformer"]}
    STRICT = True
    IGNORED = ("architectures",)

    def validate(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.head_width:
            raise ValueError(f"width {self.width} must be a multiple of head_width {self.head_width}")
        if self.head_width % 4:
            # the rotary table covers head_width in 2 halves (rows, columns) of interleaved pairs
            raise ValueError(f"head_width {self.head_width} must be a multiple of 4 for the 2D rotary positions")
        blocks = tuple(self.hidden_state_blocks)
        if list(blocks) != sorted(set(blocks)) or any(not 0 <= i < self.layers for i in blocks):
            raise ValueError(f"hidden_state_blocks {blocks}: increasing block indices in [0, layers={self.layers}) "
                             "(the state entering each block)")

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


def _kw(cfg: EVAVisionConfig) -> dict:
    return dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))


def _norm(cfg: EVAVisionConfig, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return L.layer_norm(dim, eps=cfg.layer_norm_eps, rngs=rngs, **_kw(cfg))


def _param(shape, axes, rngs: nnx.Rngs, cfg: EVAVisionConfig, init=nnx.initializers.zeros) -> nnx.Param:
    return nnx.Param(L.partitioned(init, *axes)(rngs.params(), shape, canonical_dtype(cfg.param_dtype)))


def _aa_cubic(x: np.ndarray) -> np.ndarray:
    """The Keys cubic with a = -0.5 (PIL's and torch's antialiased bicubic; plain torch bicubic uses -0.75)."""
    a, x = np.float32(-0.5), np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, np.float32(0))).astype(np.float32)


def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 weights of torch's antialiased bicubic along one axis
    (``interpolate(mode="bicubic", antialias=True, align_corners=False)``, ATen's ``_compute_weights_aa``):
    output i is centred at ``scale * (i + 0.5)``, ``scale = in/out``; when shrinking the cubic is
    stretched by ``scale`` (support ``2 * scale``); each row's taps ``[xmin, xmin + xsize)`` are
    normalised to sum to 1. Computed in float32 like ATen for a float32 image: float64 weights move
    the tap positions by float32's rounding of the centre and the result by up to 1.4e-5 (measured)."""
    f = np.float32
    scale = f(in_size) / f(out_size)
    support = f(2) * scale if scale >= 1 else f(2)
    invscale = f(1) / scale if scale >= 1 else f(1)
    w = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        center = f(scale * f(i + 0.5))
        xmin = max(int(np.float64(center - support) + 0.5), 0)
        xmax = min(int(np.float64(center + support) + 0.5), in_size)
        offsets = (np.arange(xmin, xmax, dtype=np.float32) - center).astype(np.float64) + 0.5
        taps = _aa_cubic((offsets * np.float64(invscale)).astype(np.float32))
        total = taps.sum(dtype=np.float32)
        w[i, xmin:xmax] = taps / total if total != 0 else taps
    return w


def resize_short_side(images: np.ndarray, size: int) -> np.ndarray:
    """torchvision ``resize(images, size, InterpolationMode.BICUBIC, antialias=True)`` of float images
    ``(B, H, W, C)``: the short side becomes ``size``, the long one ``int(size * long / short)``;
    unclamped (torchvision clamps only uint8). Width is resampled first, then height, as ATen's
    separable kernel does; the sums here in float64 (torch accumulates in float32), returned as float32."""
    _, h, w, _ = images.shape
    short, long = min(h, w), max(h, w)
    new_short, new_long = size, int(size * long / short)
    oh, ow = (new_short, new_long) if h <= w else (new_long, new_short)
    if (oh, ow) == (h, w):
        return images.astype(np.float32)
    x = images.astype(np.float64).transpose(0, 3, 1, 2)                  # (B, C, H, W)
    x = x @ resize_weights(w, ow).astype(np.float64).T                   # width first
    x = resize_weights(h, oh).astype(np.float64) @ x                     # then height
    return x.transpose(0, 2, 3, 1).astype(np.float32)


def preprocess(faces: np.ndarray, image_size: int = EVAVisionConfig.image_size) -> np.ndarray:
    """ConsisID's EVA input (``consisid_utils.process_face_embeddings``): the grey face on white,
    float RGB in [0, 1] ``(B, H, W, 3)`` -> short side resized to ``image_size`` (antialiased bicubic)
    and normalised with OpenAI CLIP's mean/std -> ``(B, image_size, image_size, 3)`` float32."""
    if faces.ndim != 4 or faces.shape[-1] != 3 or not np.issubdtype(faces.dtype, np.floating):
        raise ValueError(f"faces of shape {faces.shape} and dtype {faces.dtype}: expected float RGB (B, H, W, 3) in [0, 1]")
    x = resize_short_side(faces, image_size)
    if x.shape[1:3] != (image_size, image_size):
        # the reference resizes the short side only and then fails in the patch embedding
        raise ValueError(f"faces of size {faces.shape[1:3]} resize to {x.shape[1:3]}; the EVA tower takes a square "
                         f"{image_size}x{image_size} input (ConsisID feeds the square 512x512 aligned crop)")
    return ((x - CLIP_MEAN) / CLIP_STD).astype(np.float32)


def rope_tables(cfg: EVAVisionConfig) -> tuple[np.ndarray, np.ndarray]:
    """``VisionRotaryEmbeddingFast(head_width // 2, pt_hw_seq_len, grid)``'s ``freqs_cos``/``freqs_sin``,
    ``(grid * grid, head_width)`` float32, row-major over the patch grid.

    A patch at (row i, column j) has position ``i / grid * pt_hw_seq_len`` (and the same for j), so
    the 24x24 grid spans the 16x16 positions of pre-training. Channels ``[0, head_width/2)`` rotate
    by the row position, the rest by the column; each frequency ``theta^(-2k/(head_width/2))`` is
    repeated for an adjacent (interleaved) pair. Computed in float32 as the reference does."""
    dim = cfg.head_width // 2
    freqs = np.float32(1.0) / (np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2]
                                                               / np.float32(dim)))
    t = np.arange(cfg.grid, dtype=np.float32) / np.float32(cfg.grid) * np.float32(cfg.pt_hw_seq_len)
    f = np.repeat(np.outer(t, freqs).astype(np.float32), 2, axis=-1)  # (grid, dim): pairs interleaved
    rows = np.broadcast_to(f[:, None, :], (cfg.grid, cfg.grid, dim))
    cols = np.broadcast_to(f[None, :, :], (cfg.grid, cfg.grid, dim))
    angles = np.concatenate([rows, cols], axis=-1).reshape(cfg.grid * cfg.grid, 2 * dim)
    return np.cos(angles), np.sin(angles)


def rotate_pairs(x: jax.Array) -> jax.Array:
    """``(..., 2n) -> (..., 2n)``: each adjacent pair (a, b) becomes (-b, a) (the reference's ``rotate_half``)."""
    pairs = x.reshape(*x.shape[:-1], -1, 2)
    return jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)


class PatchEmbed(nnx.Module):
    """A stride-p conv with bias: ``pixels (B, H, W, 3) -> (B, P, width)``."""

    def __init__(self, cfg: EVAVisionConfig, *, rngs: nnx.Rngs):
        p, d = cfg.patch_size, cfg.width
        init = nnx.initializers.normal((p * p * 3) ** -0.5)
        self.proj = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", use_bias=True,
                             kernel_init=L.partitioned(init, "patch", "patch", "channels", "embed"),
                             bias_init=L.partitioned(nnx.initializers.zeros, "embed"), rngs=rngs, **_kw(cfg))

    def __call__(self, pixels):
        x = self.proj(pixels)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class Attention(nnx.Module):
    """Self-attention with separate q/k/v kernels, ``q_bias``/``v_bias`` (k has none), 2D RoPE on
    the patch tokens, softmax(q k^T / sqrt(head_width)), ``inner_attn_ln``, ``proj``:
    ``(B, 1+P, width), cos/sin (1+P, head_width) -> (B, 1+P, width)``."""

    def __init__(self, cfg: EVAVisionConfig, *, rngs: nnx.Rngs):
        d = cfg.width
        dense = lambda axes, bias: L.linear(d, d, axes=axes, use_bias=bias, rngs=rngs, **_kw(cfg))
        self.q_proj = dense(("embed", "heads"), False)
        self.k_proj = dense(("embed", "heads"), False)
        self.v_proj = dense(("embed", "heads"), False)
        self.q_bias = _param((d,), ("heads",), rngs, cfg)
        self.v_bias = _param((d,), ("heads",), rngs, cfg)
        self.inner_attn_ln = _norm(cfg, d, rngs)
        self.proj = dense(("heads", "embed"), True)
        self.heads, self.head_width, self.dtype = cfg.heads, cfg.head_width, canonical_dtype(cfg.dtype)

    def __call__(self, x, cos, sin):
        b, s, d = x.shape
        split = lambda t: t.reshape(b, s, self.heads, self.head_width)
        rope = lambda t: t * cos[:, None, :] + rotate_pairs(t) * sin[:, None, :]
        q = split(self.q_proj(x) + self.q_bias[...].astype(self.dtype))
        k = split(self.k_proj(x))
        v = split(self.v_proj(x) + self.v_bias[...].astype(self.dtype))
        o = attention(rope(q), rope(k), v, scale=self.head_width ** -0.5).reshape(b, s, d)
        return self.proj(self.inner_attn_ln(o))


class SwiGLU(nnx.Module):
    """``w3(ffn_ln(silu(w1 x) * w2 x))``, all with biases: ``(B, S, width) -> (B, S, width)``."""

    def __init__(self, cfg: EVAVisionConfig, *, rngs: nnx.Rngs):
        d, h = cfg.width, cfg.mlp_hidden
        self.w1 = L.linear(d, h, axes=("embed", "mlp"), rngs=rngs, **_kw(cfg))
        self.w2 = L.linear(d, h, axes=("embed", "mlp"), rngs=rngs, **_kw(cfg))
        self.ffn_ln = L.layer_norm(h, eps=cfg.layer_norm_eps, axes=("mlp",), rngs=rngs, **_kw(cfg))
        self.w3 = L.linear(h, d, axes=("mlp", "embed"), rngs=rngs, **_kw(cfg))

    def __call__(self, x):
        h = constrain(jax.nn.silu(self.w1(x)) * self.w2(x), ("batch", "seq", "act_mlp"))
        return self.w3(self.ffn_ln(h))


class Block(nnx.Module):
    """Pre-LN block: ``x + attn(norm1(x))``, then ``+ mlp(norm2(.))``; shape-preserving."""

    def __init__(self, cfg: EVAVisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, cfg.width, rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = _norm(cfg, cfg.width, rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)

    def __call__(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("batch", "seq", "act_embed"))


class EVAVisionTower(nnx.Module):
    """``pixels (B, H, W, 3)`` (CLIP-normalized, ``preprocess``) -> ``(features (B, embed_dim),
    hidden (len(hidden_state_blocks), B, 1+P, width))``.

    ``features`` is ``head(norm(x)[:, 0])``, un-normalized (ConsisID L2-normalizes it); ``hidden[n]``
    is the residual stream entering block ``hidden_state_blocks[n]``."""

    def __init__(self, cfg: EVAVisionConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        d, tokens = cfg.width, cfg.grid ** 2 + 1
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.cls_token = _param((1, 1, d), (None, None, "embed"), rngs, cfg, nnx.initializers.normal(0.02))
        self.pos_embed = _param((1, tokens, d), (None, None, "embed"), rngs, cfg, nnx.initializers.normal(0.02))
        self.blocks = L.stack(cfg.layers, lambda r: Block(cfg, rngs=r), rngs)
        self.norm = _norm(cfg, d, rngs)
        self.head = L.linear(d, cfg.embed_dim, axes=("embed", None), rngs=rngs, **_kw(cfg))

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg, dt = self.cfg, canonical_dtype(self.cfg.dtype)
        if pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"pixels of shape {pixels.shape}: the EVA tower takes (B, {cfg.image_size}, "
                             f"{cfg.image_size}, 3)")
        x = self.patch_embed(pixels.astype(dt))
        cls = jnp.broadcast_to(self.cls_token[...].astype(dt), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(dt)
        x = constrain(x, ("batch", "seq", "act_embed"))
        # the class token takes no rotation: a first row of cos 1, sin 0 leaves it exactly as it is
        cos, sin = rope_tables(cfg)
        cos = jnp.asarray(np.concatenate([np.ones_like(cos[:1]), cos]), dt)
        sin = jnp.asarray(np.concatenate([np.zeros_like(sin[:1]), sin]), dt)

        def block(h, i):
            return L.layer(self.blocks, i)(h, cos, sin), h  # emits the state entering block i

        if cfg.scan_layers:
            x, entering = jax.lax.scan(block, x, jnp.arange(cfg.layers))
        else:
            states = []
            for i in range(cfg.layers):
                x, h = block(x, i)
                states.append(h)
            entering = jnp.stack(states)
        hidden = entering[np.asarray(cfg.hidden_state_blocks, np.int32)]
        return self.head(self.norm(x)[:, 0]), hidden
