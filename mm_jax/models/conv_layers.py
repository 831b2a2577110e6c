"""The torch CNN pieces that facexlib's face networks (RetinaFace, BiSeNet) are built from, in NHWC.

Each function reproduces one torch call exactly (padding, rounding of interpolation indices), so
the networks in ``retinaface.py`` and ``bisenet.py`` read like their torch sources.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

BN_EPS = 1e-5


def conv(cin: int, cout: int, k: int, stride: int = 1, *, use_bias: bool = False, rngs: nnx.Rngs) -> nnx.Conv:
    """A torch ``Conv2d(cin, cout, k, stride, padding=k // 2)`` in NHWC."""
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=[(k // 2, k // 2)] * 2,
                    use_bias=use_bias, rngs=rngs)


def batch_norm(c: int, *, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """Inference BatchNorm on the stored statistics (torch's eval mode, eps 1e-5)."""
    return nnx.BatchNorm(c, use_running_average=True, epsilon=BN_EPS, rngs=rngs)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``MaxPool2d(3, stride=2, padding=1)``: the padding never wins (-inf)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                 ((0, 0), (1, 1), (1, 1), (0, 0)))


def resize_nearest(x: jax.Array, h: int, w: int) -> jax.Array:
    """torch ``F.interpolate(x, size=(h, w), mode='nearest')``: source index floor(i * in/out),
    the scale in float32 as torch computes it."""
    ih, iw = x.shape[1:3]
    rows = np.minimum(np.floor(np.arange(h, dtype=np.float32) * np.float32(ih / h)).astype(np.int64), ih - 1)
    cols = np.minimum(np.floor(np.arange(w, dtype=np.float32) * np.float32(iw / w)).astype(np.int64), iw - 1)
    return x[:, rows][:, :, cols]


def global_avg_pool(x: jax.Array) -> jax.Array:
    """torch ``F.avg_pool2d(x, x.size()[2:])``: ``(B, H, W, C) -> (B, 1, 1, C)``."""
    return jnp.mean(x, axis=(1, 2), keepdims=True)


def _align_corners_taps(n_in: int, n_out: int):
    """Source indices and weights of torch's bilinear ``align_corners=True`` along one axis, in
    float32 as torch's CPU kernel computes them."""
    scale = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0.0)
    src = np.arange(n_out, dtype=np.float32) * scale
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w1 = (src - i0.astype(np.float32)).astype(np.float32)
    return i0, i1, np.float32(1.0) - w1, w1


def resize_bilinear_align_corners(x: jax.Array, h: int, w: int) -> jax.Array:
    """torch ``F.interpolate(x, (h, w), mode='bilinear', align_corners=True)`` on ``(B, H, W, C)``:
    interpolated along the width, then the height, as torch nests its weights."""
    r0, r1, hw0, hw1 = _align_corners_taps(x.shape[1], h)
    c0, c1, ww0, ww1 = _align_corners_taps(x.shape[2], w)
    xw = x[:, :, c0] * ww0[:, None] + x[:, :, c1] * ww1[:, None]
    return xw[:, r0] * hw0[:, None, None] + xw[:, r1] * hw1[:, None, None]
