"""The CogVideoX 3D causal VAE (diffusers ``AutoencoderKLCogVideoX``) in Flax NNX, channels-last.

    video  (B, T, H, W, 3) in [-1, 1], T = 4k+1 (or 1)  --encode-->  posterior over (B, k+1, H/8, W/8, 16)
    latent (B, F, h, w, 16)                              --decode-->  video (B, 4(F-1)+1, 8h, 8w, 3)

Frames are processed in batches exactly as the reference does (encode: 8 pixel frames, the
remainder joining the first batch; decode: 2 latent frames), because GroupNorm statistics are
per batch. Temporal context flows between batches through an explicit conv cache: every causal
conv with a temporal kernel > 1 returns the last ``kt - 1`` frames of its padded input, as a
pytree mirroring the module tree. The first batch runs on its own (its size differs and it has
no cache); the equal-size rest runs under one ``lax.scan``, so compile time does not grow with
the number of frames.

The layers (causal conv, norms, resnets, down/up blocks) are in ``vae_layers.py`` and take their
sizes as arguments; the encoder and decoder here read them from ``VAEConfig``. The tiled run (tiles over
devices, blending) is in ``vae_tiling.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models import vae_tiling
from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import canonical_dtype
from mm_jax.models.vae_layers import (Cache, CausalConv3d, DownBlock3D, MidBlock3D, SpatialNorm3D, UpBlock3D, group_norm,
                                     resnet_chain, valid_mask)


@dataclasses.dataclass(frozen=True)
class VAEConfig(ConfigBase):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple = (128, 256, 256, 512)
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    temporal_compression_ratio: int = 4
    scaling_factor: float = 0.7
    sample_height: int = 480
    sample_width: int = 720
    act_fn: str = "silu"
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    invert_scale_latents: bool = False
    down_block_types: tuple = ("CogVideoXDownBlock3D",) * 4
    up_block_types: tuple = ("CogVideoXUpBlock3D",) * 4
    # runtime
    dtype: str = "float32"
    param_dtype: str = "float32"
    use_tiling: bool = False
    tile_sample_min_height: Optional[int] = None   # default sample_height // 2
    tile_sample_min_width: Optional[int] = None    # default sample_width // 2
    tile_overlap_factor_height: float = 1 / 6
    tile_overlap_factor_width: float = 1 / 5
    encode_frame_batch: int = 8
    decode_frame_batch: int = 2

    RUNTIME_FIELDS = ("dtype", "param_dtype", "use_tiling", "tile_sample_min_height", "tile_sample_min_width",
                      "tile_overlap_factor_height", "tile_overlap_factor_width", "encode_frame_batch",
                      "decode_frame_batch")
    IGNORED = ("force_upcast", "shift_factor", "latents_mean", "latents_std", "dropout")
    TAG = {"_class_name": "AutoencoderKLCogVideoX"}
    STRICT = True

    def validate(self) -> None:
        if self.use_quant_conv or self.use_post_quant_conv:
            raise ValueError("use_quant_conv / use_post_quant_conv are not used by CogVideoX and not supported")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={self.act_fn!r}: only 'silu' is supported")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of "
                                 f"norm_num_groups {self.norm_num_groups}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def temporal_levels(self) -> int:
        return int(np.log2(self.temporal_compression_ratio))


# -- one frame batch through the encoder or the decoder ------------------------------------------

def _layer_kw(cfg: VAEConfig) -> dict:
    return dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))


class Encoder3D(nnx.Module):
    """(B, T, H, W, 3) -> (B, T', H/8, W/8, 2*latent) for one frame batch, with its conv cache."""

    def __init__(self, cfg: VAEConfig, *, rngs):
        kw = dict(_layer_kw(cfg), rngs=rngs)
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps)
        ch = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, i < len(ch) - 1, i < cfg.temporal_levels,
                        **norm, **kw)
            for i in range(len(ch))])
        self.mid_block = MidBlock3D(ch[-1], zq_channels=None, **norm, **kw)
        self.norm_out = group_norm(ch[-1], cfg.norm_num_groups, 1e-6, **kw)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x, cache: Cache = None):
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(x, cache.get("conv_in"))
        for i, blk in enumerate(self.down_blocks):
            h, new[f"down_block_{i}"] = blk(h, cache.get(f"down_block_{i}"))
        h, new["mid_block"] = self.mid_block(h, None, cache.get("mid_block"))
        h = jax.nn.silu(self.norm_out(h))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


class Decoder3D(nnx.Module):
    """(B, F, h, w, latent) -> (B, T, 8h, 8w, 3) for one latent frame batch; every norm is
    conditioned on that batch of latents. ``valid``: None, or the traced (h, w) of the latents that
    are real at the top left of a zero-padded z: the outputs there are those of the unpadded z
    (``vae_layers.valid_mask``), the rest is to be cropped."""

    def __init__(self, cfg: VAEConfig, *, rngs):
        kw = dict(_layer_kw(cfg), rngs=rngs)
        zc = cfg.latent_channels
        norm = dict(groups=cfg.norm_num_groups, eps=cfg.norm_eps, zq_channels=zc)
        ch = list(reversed(cfg.block_out_channels))
        self.conv_in = CausalConv3d(zc, ch[0], 3, **kw)
        self.mid_block = MidBlock3D(ch[0], **norm, **kw)
        self.up_blocks = nnx.List([
            UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, i < len(ch) - 1, i < cfg.temporal_levels,
                      **norm, **kw)
            for i in range(len(ch))])
        self.norm_out = SpatialNorm3D(ch[-1], zc, cfg.norm_num_groups, **kw)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z, cache: Cache = None, valid=None):
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        # the mid block's resnets and the first up block's are one chain: where they have one body
        # (the 5B: six 512 -> 512 blocks at the latent size) they run under one scan
        first = self.up_blocks[0]
        h, (new["mid_block"], new["up_block_0"]) = resnet_chain(
            [(self.mid_block.resnets, cache.get("mid_block")), (first.resnets, cache.get("up_block_0"))], h, z, valid)
        h = first.upsample(h, z, valid)
        for i, blk in enumerate(self.up_blocks[1:], 1):
            h, new[f"up_block_{i}"] = blk(h, z, cache.get(f"up_block_{i}"), valid)
        h = jax.nn.silu(self.norm_out(h, z, valid))
        if valid is not None:
            h = jnp.where(valid_mask(h, z, valid), h, jnp.zeros((), h.dtype))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


# -- batching over frames ----------------------------------------------------------------------

def frame_batches(num_frames: int, batch: int) -> list[tuple[int, int]]:
    """The reference's split: max(T // batch, 1) batches, the remainder joining the first."""
    n = max(num_frames // batch, 1)
    r = num_frames % batch
    return [(0 if i == 0 else batch * i + r, min(batch * (i + 1) + r, num_frames)) for i in range(n)]


def run_in_frame_batches(net: nnx.Module, x: jax.Array, batch: int, **kw) -> jax.Array:
    """Apply a cached ``net(x, cache, **kw) -> (y, cache)`` over frame batches of x (B, T, ...): the
    first batch alone, the equal-size rest under ``lax.scan``."""
    spans = frame_batches(x.shape[1], batch)
    s0, e0 = spans[0]
    y0, cache = net(x[:, s0:e0], None, **kw)
    if len(spans) == 1:
        return y0
    rest = x[:, e0:]
    b = x.shape[0]
    rest = rest.reshape(b, len(spans) - 1, batch, *x.shape[2:]).swapaxes(0, 1)
    graphdef, state = nnx.split(net)

    def body(c, xb):
        y, c = nnx.merge(graphdef, state)(xb, c, **kw)
        return c, y

    _, ys = jax.lax.scan(body, cache, rest)
    ys = ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:])
    return jnp.concatenate([y0, ys], axis=1)


# -- the autoencoder ---------------------------------------------------------------------------

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DiagonalGaussian:
    """Posterior over latents: mean and clamped logvar, (B, F, h, w, C) each."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, h):
        mean, logvar = jnp.split(h, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    def mode(self):
        return self.mean

    def sample(self, key):
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)


def _check_video(x_shape, spatial: int):
    t, h, w = x_shape[1:4]
    if t != 1 and (t - 1) % 4:
        raise ValueError(f"video has {t} frames: the VAE takes 4k+1 frames (1, 5, 9, ..., 49) or 1 for an image")
    if h % spatial or w % spatial:
        raise ValueError(f"video size {h}x{w}: height and width must be multiples of {spatial}")


class AutoencoderKLCogVideoX(nnx.Module):
    """CogVideoX VAE: ``encode(video) -> DiagonalGaussian``, ``decode(latents) -> video`` (unscaled
    latents; see ``encode_video`` / ``decode_latents`` for the scaling factor)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder3D(cfg, rngs=rngs)
        self.decoder = Decoder3D(cfg, rngs=rngs)

    # tile geometry (pixel and latent), as the reference derives it
    def _tiles(self):
        cfg = self.cfg
        th = cfg.tile_sample_min_height or cfg.sample_height // 2
        tw = cfg.tile_sample_min_width or cfg.sample_width // 2
        s = cfg.spatial_compression
        return th, tw, int(th / s), int(tw / s)

    def _encode_moments(self, x):
        return run_in_frame_batches(self.encoder, x, self.cfg.encode_frame_batch)

    def _decode_frames(self, z, valid=None):
        return run_in_frame_batches(self.decoder, z, self.cfg.decode_frame_batch, valid=valid)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """x (B, T, H, W, in_channels) in [-1, 1] -> posterior."""
        _check_video(x.shape, self.cfg.spatial_compression)
        th, tw, lh, lw = self._tiles()
        h, w = x.shape[2:4]
        cfg = self.cfg
        stride = (int(th * (1 - cfg.tile_overlap_factor_height)), int(tw * (1 - cfg.tile_overlap_factor_width)))
        blend = (int(lh * cfg.tile_overlap_factor_height), int(lw * cfg.tile_overlap_factor_width))
        if cfg.use_tiling and (h > th or w > tw) and vae_tiling.tiles_align(stride, (th, tw), blend, (lh, lw), "encode"):
            # not spread over the mesh: the trainer encodes a batch the mesh already splits
            moments = self._tiled(x, type(self)._encode_moments, stride, (th, tw), blend, (lh, lw))
        else:
            moments = self._encode_moments(x)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """z (B, F, h, w, latent_channels) -> video (B, T, 8h, 8w, out_channels), not clipped. Tiled,
        every tile goes through one decoder body of one shape (edge tiles zero-padded to it, their
        padding masked out: ``Decoder3D``'s ``valid``), and under a mesh of several devices the
        tiles are decoded in parallel over all of them (``vae_tiling.map_tiles``)."""
        stride, (lh, lw), blend, out_tile = self.decode_tiles()
        h, w = z.shape[2:4]
        if self.cfg.use_tiling and (h > lh or w > lw) and vae_tiling.tiles_align(stride, (lh, lw), blend, out_tile, "decode"):
            return self._tiled(z, type(self)._decode_frames, stride, (lh, lw), blend, out_tile, spread=True,
                               padded=True)
        return self._decode_frames(z)

    def decode_tiles(self):
        """The reference's tiled-decode geometry: latent stride, latent tile, pixel blend, pixel tile."""
        cfg = self.cfg
        th, tw, lh, lw = self._tiles()
        stride = (int(lh * (1 - cfg.tile_overlap_factor_height)), int(lw * (1 - cfg.tile_overlap_factor_width)))
        blend = (int(th * cfg.tile_overlap_factor_height), int(tw * cfg.tile_overlap_factor_width))
        return stride, (lh, lw), blend, (th, tw)

    def _tiled(self, x, fn, stride, tile, blend, out_tile, spread: bool = False, padded: bool = False):
        """``vae_tiling.tiled`` over this VAE: ``fn(self, tile[, valid])`` per tile."""
        return vae_tiling.tiled(self, x, fn, stride, tile, blend, out_tile, spread, padded)


# -- the one place the scaling factor is applied --------------------------------------------------

def encode_video(vae: AutoencoderKLCogVideoX, video: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """Pixels (B, T, H, W, 3) in [-1, 1] -> DiT latents: posterior sample (mode without a key) x scaling_factor."""
    post = vae.encode(video)
    z = post.mode() if key is None else post.sample(key)
    return z * vae.cfg.scaling_factor


def decode_latents(vae: AutoencoderKLCogVideoX, latents: jax.Array) -> jax.Array:
    """DiT latents (B, F, h, w, C) -> pixels in about [-1, 1]: decode(latents / scaling_factor)."""
    return vae.decode(latents / vae.cfg.scaling_factor)
