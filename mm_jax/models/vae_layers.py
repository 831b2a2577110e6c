"""Layers of the CogVideoX 3D causal VAE, channels-last: causal 3D conv with an explicit conv
cache, GroupNorm over the frames present, SpatialNorm3D, ResNet blocks, odd-frame down/upsampling,
and the down/mid/up blocks. The encoder and decoder built from them are in ``vae.py`` with the
config; these layers take what they need (widths, groups, eps, dtypes), not the config.

Every ``__call__`` that holds a temporal conv takes ``cache`` and returns ``(out, new_cache)``;
the cache is a dict pytree mirroring the module tree (None for a fresh first batch).

Consecutive resnets of one body (same structure, same parameter shapes) run under one
``lax.scan`` over their stacked parameters (``resnet_chain``): the TPU backend spends its compile
time lowering each 3x3x3 convolution, and a scanned body is lowered once (the 5B decoder: 18
resnets in 6 bodies), with the same numbers as one block after the other. The encoder's resnets
run one by one (``ENCODER_SCAN``: the scan cost the train step's frozen encoder 8.9 GiB of peak).

The decoder's layers also take ``valid`` (None, or the traced (height, width) of the latents that
are real, at the top left of a zero-padded tile): every GroupNorm then takes its statistics over
the valid region only and every spatial conv sees zeros outside it, so the valid region's outputs
are those of the unpadded tile (``valid_mask``). One tile shape then serves every tile of a tiled
decode (``vae.py``).

Parameters live in Flax's layers: ``nnx.Conv`` (kernel ``(*k, in, out)``, bias) and
``nnx.GroupNorm`` (``scale``/``bias``; statistics over (T, H, W, C/G) of the input, two-pass
variance in float32), both exact against the hand-written versions they replace. What stays
hand-written is what diffusers' ``CogVideoXCausalConv3d`` adds around its conv: the causal
temporal padding (the cache, else copies of the first frame) and the cache it returns; and, when
compiling for CPU only, how the 3D conv is computed (``temporal_taps``: per-frame 2D convs summed
over the temporal taps, 1.9x faster than XLA:CPU's 3D convolution on a (1, 6, 64, 96, 128) input,
128 -> 128 channels, measured on 2 cores; other platforms run ``nnx.Conv`` itself). The platform
is the one compiled for (``layers.target_platform``), so a TPU program compiled from a CPU host
(the planner) holds the TPU's 3D convolutions.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models import layers as L

Cache = Optional[dict]

# The encoder's resnets run one by one: under the scan the v5p-8 train-video step (the frozen
# encoder inside it) compiled in 177 s instead of 192 s but peaked at 46.78 GiB instead of 37.86
# (benchmarks/compile_time.py, load 0.1-0.4), so the scan is the decoder's only.
ENCODER_SCAN = False

# backends on which CausalConv3d runs its conv as temporal taps (see the module docstring)
TEMPORAL_TAPS_BACKENDS = ("cpu",)


def conv(cin: int, cout: int, kernel: tuple, *, dtype, param_dtype, rngs: nnx.Rngs, strides=1,
         padding="VALID") -> nnx.Conv:
    """``nnx.Conv`` over channels-last input (any leading batch dims), ``kernel (*k, in, out)``
    starting N(0, 1/fan_in), zero bias; computes in ``dtype``."""
    fan_in = int(np.prod(kernel)) * cin
    axes = (None,) * len(kernel) + ("conv_in", "conv_out")
    return nnx.Conv(cin, cout, tuple(kernel), strides=strides, padding=padding, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=L.partitioned(nnx.initializers.normal(fan_in ** -0.5), *axes),
                    bias_init=L.partitioned(nnx.initializers.zeros, "conv_out"), rngs=rngs)


def group_norm(channels: int, groups: int, eps: float, *, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.GroupNorm:
    """``nnx.GroupNorm`` over all axes but the batch, per group of channels: x (B, T, H, W, C) is
    normalized over (T, H, W, C/G) of the frames present (the reference's per-batch statistics)."""
    return nnx.GroupNorm(channels, num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                         param_dtype=param_dtype, scale_init=L.partitioned(nnx.initializers.ones, "norm"),
                         bias_init=L.partitioned(nnx.initializers.zeros, "norm"), rngs=rngs)


def temporal_taps(c: nnx.Conv, x: jax.Array) -> jax.Array:
    """``c`` (a 3D conv: no temporal padding, 'same' spatial zero padding) as a sum over its
    temporal taps of per-frame 2D convs: the same numbers, with a third of the im2col workspace
    that XLA's CPU 3D convolution would materialize. x (B, T, H, W, Cin) -> (B, T-kt+1, H, W, Cout)."""
    kt, kh, kw = c.kernel.get_value().shape[:3]
    b, t, h, w, ch = x.shape
    to = t - kt + 1
    kern = c.kernel[...].astype(c.dtype)
    x = x.astype(c.dtype)
    y = None
    for k in range(kt):
        xs = x[:, k:k + to].reshape(b * to, h, w, ch)
        yk = jax.lax.conv_general_dilated(xs, kern[k], (1, 1), [((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2],
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
        y = yk if y is None else y + yk
    y = y + c.bias[...].astype(c.dtype)
    return y.reshape(b, to, h, w, -1)


class CausalConv3d(nnx.Module):
    """Causal in time: prepend ``kt-1`` frames (the cache, else copies of the first frame); zero
    padding in space. x (B, T, H, W, Cin) -> ((B, T, H, W, Cout), new cache (B, kt-1, H, W, Cin) | None)."""

    def __init__(self, cin, cout, k: int, *, dtype, param_dtype, rngs):
        p = (k - 1) // 2
        self.conv = conv(cin, cout, (k, k, k), padding=((0, 0), (p, p), (p, p)), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.k = k

    def __call__(self, x, cache=None):
        k = self.k
        new_cache = None
        if k > 1:
            pre = cache if cache is not None else jnp.repeat(x[:, :1], k - 1, axis=1)
            x = jnp.concatenate([pre.astype(x.dtype), x], axis=1)
            new_cache = x[:, -(k - 1):]
        y = temporal_taps(self.conv, x) if L.target_platform() in TEMPORAL_TAPS_BACKENDS else self.conv(x)
        return y, new_cache


def valid_mask(x, zq, valid):
    """(1, 1, H, W, 1) bool: the positions of x (B, T, H, W, C) inside the valid (h, w) latents of
    zq (B, F, h', w', C'), scaled by x's resolution over zq's; None when ``valid`` is None."""
    if valid is None:
        return None
    sh, sw = x.shape[2] // zq.shape[2], x.shape[3] // zq.shape[3]
    rows = jnp.arange(x.shape[2]) < valid[0] * sh
    cols = jnp.arange(x.shape[3]) < valid[1] * sw
    return (rows[:, None] & cols[None, :])[None, None, :, :, None]


def _zero_outside(x, mask):
    return x if mask is None else jnp.where(mask, x, jnp.zeros((), x.dtype))


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
        self.norm_layer = group_norm(f_channels, groups, 1e-6, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_y = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_b = CausalConv3d(zq_channels, f_channels, 1, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    @staticmethod
    def _resize(zq, t, h, w):
        if t > 1 and t % 2 == 1:
            return jnp.concatenate([nearest_resize(zq[:, :1], (1, h, w)), nearest_resize(zq[:, 1:], (t - 1, h, w))], 1)
        return nearest_resize(zq, (t, h, w))

    def __call__(self, f, zq, valid=None):
        t, h, w = f.shape[1:4]
        # the 1x1x1 convs commute with nearest resizing (both act per position), so they run at the
        # latent resolution and the resized maps fuse into the product instead of being materialized
        y, b = self.conv_y(zq)[0], self.conv_b(zq)[0]
        mask = valid_mask(f, zq, valid)
        norm = self.norm_layer(f) if mask is None else self.norm_layer(f, mask=jnp.broadcast_to(mask, f.shape))
        return norm * self._resize(y, t, h, w) + self._resize(b, t, h, w)


class ResnetBlock3D(nnx.Module):
    """norm -> SiLU -> causal conv -> norm -> SiLU -> causal conv, + (1x1x1 conv) shortcut:
    x (B, T, H, W, cin) -> (B, T, H, W, cout). The norms are GroupNorms (eps ``eps``), or with
    ``zq_channels`` the decoder's SpatialNorm3D conditioned on the latents zq."""

    def __init__(self, cin, cout, *, groups: int, eps: float, zq_channels: int | None = None, dtype, param_dtype,
                 rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if zq_channels is None:
            self.norm1 = group_norm(cin, groups, eps, **kw)
            self.norm2 = group_norm(cout, groups, eps, **kw)
        else:
            self.norm1 = SpatialNorm3D(cin, zq_channels, groups, **kw)
            self.norm2 = SpatialNorm3D(cout, zq_channels, groups, **kw)
        self.conv1 = CausalConv3d(cin, cout, 3, **kw)
        self.conv2 = CausalConv3d(cout, cout, 3, **kw)
        self.conv_shortcut = conv(cin, cout, (1, 1, 1), **kw) if cin != cout else None
        self.spatial = zq_channels is not None

    def _norm(self, norm, x, zq, valid):
        return norm(x, zq, valid) if self.spatial else norm(x)

    def __call__(self, x, zq=None, cache: Cache = None, valid=None):
        cache = cache or {}
        mask = valid_mask(x, zq, valid)
        h = _zero_outside(jax.nn.silu(self._norm(self.norm1, x, zq, valid)), mask)
        h, c1 = self.conv1(h, cache.get("conv1"))
        h = _zero_outside(jax.nn.silu(self._norm(self.norm2, h, zq, valid)), mask)
        h, c2 = self.conv2(h, cache.get("conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, {"conv1": c1, "conv2": c2}


class Downsample3D(nnx.Module):
    """Optional temporal average pooling of frame pairs (the first frame kept alone when the count
    is odd), then zero-pad right/bottom by 1 and a stride-2 3x3 conv per frame:
    x (B, T, H, W, C) -> (B, T', H/2, W/2, C)."""

    def __init__(self, channels, compress_time: bool, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)), dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.compress_time = compress_time

    def __call__(self, x):
        if self.compress_time:
            t = x.shape[1]
            first, rest = (x[:, :1], x[:, 1:]) if t % 2 == 1 else (x[:, :0], x)
            if rest.shape[1]:
                rest = (rest[:, 0::2] + rest[:, 1::2]) / 2
            x = jnp.concatenate([first, rest], axis=1)
        return self.conv(x)  # (B, T) are batch dims of the 2D conv


class Upsample3D(nnx.Module):
    """Nearest x2 in space (and in time when compressing, the first frame of an odd count only in
    space), then a 3x3 conv per frame: x (B, T, H, W, C) -> (B, T', 2H, 2W, C)."""

    def __init__(self, channels, compress_time: bool, *, dtype, param_dtype, rngs):
        self.conv = conv(channels, channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype,
                         rngs=rngs)
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
        return self.conv(x)


def _same_body(a: nnx.Module, b: nnx.Module) -> bool:
    """Whether two modules have one structure and parameters of the same shapes and dtypes (so one
    compiled body serves both)."""
    (ga, sa), (gb, sb) = nnx.split(a), nnx.split(b)
    la, lb = jax.tree.leaves(sa), jax.tree.leaves(sb)
    return ga == gb and len(la) == len(lb) and all(u.shape == v.shape and u.dtype == v.dtype for u, v in zip(la, lb))


def _runs(resnets) -> list[list[int]]:
    """The indices of ``resnets`` in runs of consecutive blocks with one body (``_same_body``)."""
    runs: list[list[int]] = []
    for i, r in enumerate(resnets):
        if runs and _same_body(resnets[runs[-1][0]], r):
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _scan_resnets(blocks, x, zq, caches, valid):
    """Consecutive ResnetBlock3D of one body under one ``lax.scan`` over their stacked parameters
    (and caches): the compiler lowers the block's convolutions once, not once per block (the TPU
    backend's time goes to lowering each 3x3x3 convolution). Returns (x, [cache per block])."""
    graphdef = nnx.graphdef(blocks[0])
    stack = lambda trees: jax.tree.map(lambda *a: jnp.stack(a), *trees)
    params = stack([nnx.state(b) for b in blocks])
    # a first frame batch has no caches (all None); later ones have every block's
    cache_in = None if all(c is None for c in caches) else stack(caches)

    def body(h, pc):
        state, c = pc
        h, nc = nnx.merge(graphdef, state)(h, zq, c, valid)
        return h, nc

    x, out = jax.lax.scan(body, x, (params, cache_in))
    return x, [jax.tree.map(lambda a: a[k], out) for k in range(len(blocks))]


def resnet_chain(parts, x, zq, valid=None, scan: bool = True):
    """Run the ResnetBlock3D lists of several blocks one after the other, ``parts`` = [(resnets,
    cache of their block)], threading each one's cache entry ``resnet_i``; consecutive blocks of one
    body run under one scan (``_scan_resnets``), also across parts (the decoder's mid block and
    first up block), with the same numbers as one by one. ``scan=False``: every block on its own.
    Returns (x, [new cache per part])."""
    blocks, caches, where = [], [], []
    for p, (resnets, cache) in enumerate(parts):
        for i, r in enumerate(resnets):
            blocks.append(r)
            caches.append((cache or {}).get(f"resnet_{i}"))
            where.append((p, f"resnet_{i}"))
    outs: list = [None] * len(blocks)
    for run in (_runs(blocks) if scan else [[k] for k in range(len(blocks))]):
        if len(run) == 1:
            x, outs[run[0]] = blocks[run[0]](x, zq, caches[run[0]], valid)
        else:
            x, got = _scan_resnets([blocks[k] for k in run], x, zq, [caches[k] for k in run], valid)
            for k, c in zip(run, got):
                outs[k] = c
    new: list[dict] = [{} for _ in parts]
    for (p, name), c in zip(where, outs):
        new[p][name] = c
    return x, new


def _resnets(resnets, x, zq, cache: Cache, valid=None, scan: bool = True):
    """Run a list of ResnetBlock3D (``resnet_chain`` of one part)."""
    x, (new,) = resnet_chain([(resnets, cache)], x, zq, valid, scan)
    return x, new


class DownBlock3D(nnx.Module):
    """``num_layers`` GroupNorm resnets (cin -> cout), then optionally ``Downsample3D``:
    x (B, T, H, W, cin) -> ((B, T', H', W', cout), cache)."""

    def __init__(self, cin, cout, num_layers: int, add_down: bool, compress_time: bool, *, groups: int, eps: float,
                 dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, groups=groups, eps=eps, **kw)
                                 for i in range(num_layers)])
        self.downsamplers = nnx.List([Downsample3D(cout, compress_time, **kw)] if add_down else [])

    def __call__(self, x, cache: Cache = None):
        x, new = _resnets(self.resnets, x, None, cache, scan=ENCODER_SCAN)
        for d in self.downsamplers:
            x = d(x)
        return x, new


class UpBlock3D(nnx.Module):
    """``num_layers`` SpatialNorm resnets (cin -> cout) conditioned on zq, then optionally
    ``Upsample3D``: x (B, T, H, W, cin), zq (B, F, h, w, zq_channels) -> ((B, T', H', W', cout), cache)."""

    def __init__(self, cin, cout, num_layers: int, add_up: bool, compress_time: bool, *, zq_channels: int,
                 groups: int, eps: float, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, groups=groups, eps=eps,
                                               zq_channels=zq_channels, **kw) for i in range(num_layers)])
        self.upsamplers = nnx.List([Upsample3D(cout, compress_time, **kw)] if add_up else [])

    def __call__(self, x, zq, cache: Cache = None, valid=None):
        x, new = _resnets(self.resnets, x, zq, cache, valid)
        return self.upsample(x, zq, valid), new

    def upsample(self, x, zq, valid=None):
        """The block's upsampler (if any) after its resnets."""
        for u in self.upsamplers:
            x = u(_zero_outside(x, valid_mask(x, zq, valid)))  # its 3x3 conv sees zeros outside
        return x


class MidBlock3D(nnx.Module):
    """Two resnets at one width (GroupNorm, or SpatialNorm with ``zq_channels``): shape-preserving."""

    def __init__(self, channels, *, zq_channels: int | None, groups: int, eps: float, dtype, param_dtype, rngs):
        self.resnets = nnx.List([ResnetBlock3D(channels, channels, groups=groups, eps=eps, zq_channels=zq_channels,
                                               dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(2)])

    def __call__(self, x, zq=None, cache: Cache = None, valid=None):
        """The encoder's mid block (the decoder chains its resnets with the first up block's)."""
        return _resnets(self.resnets, x, zq, cache, valid, scan=ENCODER_SCAN if zq is None else True)
