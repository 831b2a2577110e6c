"""Layers of the CogVideoX 3D causal VAE, channels-last: causal 3D conv with an explicit conv
cache, per-batch GroupNorm, SpatialNorm3D, ResNet blocks, odd-frame down/upsampling, and the
encoder and decoder that run one frame batch (the batching itself is in ``vae.py``).

Every ``__call__`` that holds a temporal conv takes ``cache`` and returns ``(out, new_cache)``;
the cache is a dict pytree mirroring the module tree (None for a fresh first batch).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.layers import canonical_dtype

if TYPE_CHECKING:
    from mm_jax.models.vae import VAEConfig

Cache = Optional[dict]

def _conv_param(rngs, shape, pdt):
    fan_in = int(np.prod(shape[:-1]))
    return nnx.Param(jax.random.normal(rngs.params(), shape, pdt) / np.sqrt(fan_in),
                     logical_axes=(None,) * (len(shape) - 2) + ("conv_in", "conv_out"))


class Conv(nnx.Module):
    """A plain N-d convolution over channels-last input; ``kernel`` (*k, in, out) + ``bias``."""

    def __init__(self, cin, cout, kernel: tuple, *, dtype, param_dtype, rngs):
        self.kernel = _conv_param(rngs, tuple(kernel) + (cin, cout), param_dtype)
        self.bias = nnx.Param(jnp.zeros((cout,), param_dtype), logical_axes=("conv_out",))
        self.dtype = dtype

    def temporal_taps(self, x):
        """A 3D conv (no temporal padding, 'same' spatial zero padding) as a sum over its temporal
        taps of per-frame 2D convs: the same numbers, with a third of the im2col workspace that
        XLA's CPU 3D convolution would materialize."""
        kt, kh, kw = self.kernel.get_value().shape[:3]
        b, t, h, w, c = x.shape
        to = t - kt + 1
        kern = self.kernel[...].astype(self.dtype)
        x = x.astype(self.dtype)
        y = None
        for k in range(kt):
            xs = x[:, k:k + to].reshape(b * to, h, w, c)
            yk = jax.lax.conv_general_dilated(xs, kern[k], (1, 1), [((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2],
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
            y = yk if y is None else y + yk
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, to, h, w, -1)

    def __call__(self, x, stride=1, padding="VALID"):
        nd = self.kernel.get_value().ndim - 2
        spec = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}[nd]
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         (stride,) * nd, padding, dimension_numbers=spec)
        return y + self.bias[...].astype(self.dtype)


class CausalConv3d(nnx.Module):
    """Causal in time: prepend ``kt-1`` frames (the cache, else copies of the first frame); zero
    padding in space. x (B, T, H, W, Cin) -> ((B, T, H, W, Cout), new cache (B, kt-1, H, W, Cin) | None)."""

    def __init__(self, cin, cout, k: int, *, dtype, param_dtype, rngs):
        self.conv = Conv(cin, cout, (k, k, k), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k = k

    def __call__(self, x, cache=None):
        k = self.k
        new_cache = None
        if k > 1:
            pre = cache if cache is not None else jnp.repeat(x[:, :1], k - 1, axis=1)
            x = jnp.concatenate([pre.astype(x.dtype), x], axis=1)
            new_cache = x[:, -(k - 1):]
        return self.conv.temporal_taps(x), new_cache


class GroupNorm(nnx.Module):
    """GroupNorm over (T, H, W, C/G) of the frames present; ``scale``/``bias`` per channel."""

    def __init__(self, channels, groups, eps, *, param_dtype):
        self.scale = nnx.Param(jnp.ones((channels,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((channels,), param_dtype), logical_axes=("norm",))
        self.groups, self.eps = groups, eps

    def __call__(self, x):
        shape = x.shape
        xf = x.astype(jnp.float32).reshape(shape[0], -1, self.groups, shape[-1] // self.groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (y * self.scale[...] + self.bias[...]).astype(x.dtype)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """torch 'nearest' (legacy): src = floor(dst * in / out)."""
    scale = np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64), n_in - 1)


def nearest_resize(x, size: tuple[int, int, int]):
    """x (B, T, H, W, C) -> (B, *size, C) by nearest neighbour, torch's rule."""
    for axis, n in zip((1, 2, 3), size):
        m = x.shape[axis]
        if m == n:
            continue
        idx = _nearest_indices(m, n)
        if n % m == 0 and np.array_equal(idx, np.arange(n) // (n // m)):
            # an integer factor is a repeat: a broadcast XLA fuses into the consumer, not a gather
            x = jnp.repeat(x, n // m, axis=axis)
        else:
            x = jnp.take(x, jnp.asarray(idx), axis=axis)
    return x


class SpatialNorm3D(nnx.Module):
    """Decoder norm conditioned on the latents zq: GN(f) * conv_y(zq') + conv_b(zq'), zq' = zq resized
    to f (the first latent frame separately when f has an odd frame count > 1)."""

    def __init__(self, f_channels, zq_channels, groups, *, dtype, param_dtype, rngs):
        self.norm_layer = GroupNorm(f_channels, groups, 1e-6, param_dtype=param_dtype)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def _resize(zq, t, h, w):
        if t > 1 and t % 2 == 1:
            return jnp.concatenate([nearest_resize(zq[:, :1], (1, h, w)), nearest_resize(zq[:, 1:], (t - 1, h, w))], 1)
        return nearest_resize(zq, (t, h, w))

    def __call__(self, f, zq):
        t, h, w = f.shape[1:4]
        # the 1x1x1 convs commute with nearest resizing (both act per position), so they run at the
        # latent resolution and the resized maps fuse into the product instead of being materialized
        y, b = self.conv_y(zq)[0], self.conv_b(zq)[0]
        return self.norm_layer(f) * self._resize(y, t, h, w) + self._resize(b, t, h, w)


class ResnetBlock3D(nnx.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, + (1x1x1 conv) shortcut."""

    def __init__(self, cin, cout, cfg: VAEConfig, zq_channels: int | None, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        g = cfg.norm_num_groups
        if zq_channels is None:
            self.norm1 = GroupNorm(cin, g, cfg.norm_eps, param_dtype=pdt)
            self.norm2 = GroupNorm(cout, g, cfg.norm_eps, param_dtype=pdt)
        else:
            self.norm1 = SpatialNorm3D(cin, zq_channels, g, dtype=dt, param_dtype=pdt, rngs=rngs)
            self.norm2 = SpatialNorm3D(cout, zq_channels, g, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.conv_shortcut = Conv(cin, cout, (1, 1, 1), dtype=dt, param_dtype=pdt, rngs=rngs) if cin != cout else None
        self.spatial = zq_channels is not None

    def _norm(self, norm, x, zq):
        return norm(x, zq) if self.spatial else norm(x)

    def __call__(self, x, zq=None, cache: Cache = None):
        cache = cache or {}
        h = jax.nn.silu(self._norm(self.norm1, x, zq))
        h, c1 = self.conv1(h, cache.get("conv1"))
        h = jax.nn.silu(self._norm(self.norm2, h, zq))
        h, c2 = self.conv2(h, cache.get("conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, {"conv1": c1, "conv2": c2}


class Downsample3D(nnx.Module):
    """Optional temporal average pooling of frame pairs (the first frame kept alone when the count
    is odd), then zero-pad right/bottom by 1 and a stride-2 3x3 conv per frame."""

    def __init__(self, channels, compress_time: bool, *, dtype, param_dtype, rngs):
        self.conv = Conv(channels, channels, (3, 3), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x):
        if self.compress_time:
            t = x.shape[1]
            first, rest = (x[:, :1], x[:, 1:]) if t % 2 == 1 else (x[:, :0], x)
            if rest.shape[1]:
                rest = (rest[:, 0::2] + rest[:, 1::2]) / 2
            x = jnp.concatenate([first, rest], axis=1)
        b, t, h, w, c = x.shape
        y = self.conv(x.reshape(b * t, h, w, c), stride=2, padding=[(0, 1), (0, 1)])
        return y.reshape(b, t, *y.shape[1:])


class Upsample3D(nnx.Module):
    """Nearest x2 in space (and in time when compressing, the first frame of an odd count only in
    space), then a 3x3 conv per frame."""

    def __init__(self, channels, compress_time: bool, *, dtype, param_dtype, rngs):
        self.conv = Conv(channels, channels, (3, 3), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x):
        up_hw = lambda v: jnp.repeat(jnp.repeat(v, 2, axis=2), 2, axis=3)
        t = x.shape[1]
        if self.compress_time and t > 1 and t % 2 == 1:
            x = jnp.concatenate([up_hw(x[:, :1]), jnp.repeat(up_hw(x[:, 1:]), 2, axis=1)], axis=1)
        elif self.compress_time and t > 1:
            x = jnp.repeat(up_hw(x), 2, axis=1)
        else:
            x = up_hw(x)
        b, t, h, w, c = x.shape
        y = self.conv(x.reshape(b * t, h, w, c), padding=[(1, 1), (1, 1)])
        return y.reshape(b, t, *y.shape[1:])



class DownBlock3D(nnx.Module):
    def __init__(self, cin, cout, cfg: VAEConfig, add_down: bool, compress_time: bool, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, cfg, None, rngs=rngs)
                                 for i in range(cfg.layers_per_block)])
        self.downsamplers = nnx.List([Downsample3D(cout, compress_time, dtype=dt, param_dtype=pdt, rngs=rngs)]
                                     if add_down else [])

    def __call__(self, x, cache: Cache = None):
        cache = cache or {}
        new = {}
        for i, r in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = r(x, None, cache.get(f"resnet_{i}"))
        for d in self.downsamplers:
            x = d(x)
        return x, new


class UpBlock3D(nnx.Module):
    def __init__(self, cin, cout, cfg: VAEConfig, add_up: bool, compress_time: bool, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, cfg, cfg.latent_channels, rngs=rngs)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsamplers = nnx.List([Upsample3D(cout, compress_time, dtype=dt, param_dtype=pdt, rngs=rngs)]
                                   if add_up else [])

    def __call__(self, x, zq, cache: Cache = None):
        cache = cache or {}
        new = {}
        for i, r in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = r(x, zq, cache.get(f"resnet_{i}"))
        for u in self.upsamplers:
            x = u(x)
        return x, new


class MidBlock3D(nnx.Module):
    def __init__(self, channels, cfg: VAEConfig, zq_channels, *, rngs):
        self.resnets = nnx.List([ResnetBlock3D(channels, channels, cfg, zq_channels, rngs=rngs) for _ in range(2)])

    def __call__(self, x, zq=None, cache: Cache = None):
        cache = cache or {}
        new = {}
        for i, r in enumerate(self.resnets):
            x, new[f"resnet_{i}"] = r(x, zq, cache.get(f"resnet_{i}"))
        return x, new


class Encoder3D(nnx.Module):
    """(B, T, H, W, 3) -> (B, T', H/8, W/8, 2*latent) for one frame batch, with its conv cache."""

    def __init__(self, cfg: VAEConfig, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        ch = cfg.block_out_channels
        self.conv_in = CausalConv3d(cfg.in_channels, ch[0], 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock3D(ch[max(i - 1, 0)], ch[i], cfg, i < len(ch) - 1, i < cfg.temporal_levels, rngs=rngs)
            for i in range(len(ch))])
        self.mid_block = MidBlock3D(ch[-1], cfg, None, rngs=rngs)
        self.norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, 1e-6, param_dtype=pdt)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, 3, dtype=dt, param_dtype=pdt, rngs=rngs)

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
    conditioned on that batch of latents."""

    def __init__(self, cfg: VAEConfig, *, rngs):
        dt, pdt = canonical_dtype(cfg.dtype), canonical_dtype(cfg.param_dtype)
        ch = list(reversed(cfg.block_out_channels))
        zc = cfg.latent_channels
        self.conv_in = CausalConv3d(zc, ch[0], 3, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.mid_block = MidBlock3D(ch[0], cfg, zc, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock3D(ch[max(i - 1, 0)], ch[i], cfg, i < len(ch) - 1, i < cfg.temporal_levels, rngs=rngs)
            for i in range(len(ch))])
        self.norm_out = SpatialNorm3D(ch[-1], zc, cfg.norm_num_groups, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.conv_out = CausalConv3d(ch[-1], cfg.out_channels, 3, dtype=dt, param_dtype=pdt, rngs=rngs)

    def __call__(self, z, cache: Cache = None):
        cache = cache or {}
        new = {}
        h, new["conv_in"] = self.conv_in(z, cache.get("conv_in"))
        h, new["mid_block"] = self.mid_block(h, z, cache.get("mid_block"))
        for i, blk in enumerate(self.up_blocks):
            h, new[f"up_block_{i}"] = blk(h, z, cache.get(f"up_block_{i}"))
        h = jax.nn.silu(self.norm_out(h, z))
        h, new["conv_out"] = self.conv_out(h, cache.get("conv_out"))
        return h, new


