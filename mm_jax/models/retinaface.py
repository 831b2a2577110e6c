"""RetinaFace with a ResNet-50 backbone (facexlib's ``RetinaFace(network_name='resnet50')``) in Flax NNX.

ConsisID finds the face it aligns with this detector: ``pixels (B, H, W, 3)`` (BGR, minus the
(104, 117, 123) mean, any size) -> ResNet-50 stages 2-4 (strides 8, 16, 32) -> FPN (256 channels)
-> one SSH context module per level -> 1x1 heads with 2 anchors per position:
``loc (B, N, 4)``, ``conf (B, N, 2)`` (softmax over background/face), ``landmarks (B, N, 10)``,
N = 2 * sum over levels of ceil(H/s) * ceil(W/s). Decoding against the priors and NMS live in
``mm_jax.consisid_face``.

Parameter names follow facexlib's state dict (``body.layer1.0.conv1``, ``fpn.output1``,
``ssh1.conv3X3``, ``ClassHead.0.conv1x1``); a torch ``Sequential(conv, bn)`` is our ``ConvBN``
with ``conv``/``bn`` (keys ``.0.``/``.1.``, one rename in the converter). BatchNorm runs on its
stored statistics (inference only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.conv_layers import batch_norm, conv, max_pool_3x3_s2, resize_nearest

MIN_SIZES = ((16, 32), (64, 128), (256, 512))   # anchor sizes per level (pixels)
STEPS = (8, 16, 32)                             # level strides
VARIANCES = (0.1, 0.2)
BGR_MEAN = (104.0, 117.0, 123.0)


class ConvBN(nnx.Module):
    """Conv (no bias) + BatchNorm, then LeakyReLU(``leaky``) if ``act``: facexlib's ``conv_bn``
    family and torchvision's ``downsample``. ``(B, H, W, cin) -> (B, H/stride, W/stride, cout)``."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, *, act: bool = False, leaky: float = 0.0,
                 rngs: nnx.Rngs):
        self.conv = conv(cin, cout, k, stride, rngs=rngs)
        self.bn = batch_norm(cout, rngs=rngs)
        self.act, self.leaky = act, leaky

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.bn(self.conv(x))
        return jax.nn.leaky_relu(x, self.leaky) if self.act else x


class Bottleneck(nnx.Module):
    """torchvision's ResNet-50 bottleneck (stride on the 3x3, "v1.5"): 1x1 -> 3x3 -> 1x1 (x4 width)
    plus the identity or a strided 1x1 projection."""

    def __init__(self, cin: int, width: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = conv(cin, width, 1, rngs=rngs), batch_norm(width, rngs=rngs)
        self.conv2, self.bn2 = conv(width, width, 3, stride, rngs=rngs), batch_norm(width, rngs=rngs)
        self.conv3, self.bn3 = conv(width, 4 * width, 1, rngs=rngs), batch_norm(4 * width, rngs=rngs)
        self.downsample = ConvBN(cin, 4 * width, 1, stride, rngs=rngs) if stride != 1 or cin != 4 * width else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x)))
        y = jax.nn.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return jax.nn.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nnx.Module):
    """torchvision ``resnet50`` up to layer4: ``(B, H, W, 3) -> [C2 (H/8, 512), C3 (H/16, 1024),
    C4 (H/32, 2048)]`` (facexlib's ``IntermediateLayerGetter`` of layers 2-4)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = conv(3, 64, 7, 2, rngs=rngs), batch_norm(64, rngs=rngs)
        cin = 64
        for i, (width, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)), 1):
            layer = []
            for b in range(blocks):
                layer.append(Bottleneck(cin, width, stride if b == 0 else 1, rngs=rngs))
                cin = 4 * width
            setattr(self, f"layer{i}", nnx.List(layer))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
        outs = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
            outs.append(x)
        return outs[1:]


class FPN(nnx.Module):
    """Top-down feature pyramid: 1x1 lateral convs, nearest upsampling, 3x3 merges (ReLU at 256
    channels: facexlib uses LeakyReLU(0.1) only at <= 64)."""

    def __init__(self, in_channels: tuple[int, int, int], out: int, *, rngs: nnx.Rngs):
        leaky = 0.1 if out <= 64 else 0.0
        self.output1, self.output2, self.output3 = (ConvBN(c, out, 1, act=True, leaky=leaky, rngs=rngs)
                                                    for c in in_channels)
        self.merge1 = ConvBN(out, out, 3, act=True, leaky=leaky, rngs=rngs)
        self.merge2 = ConvBN(out, out, 3, act=True, leaky=leaky, rngs=rngs)

    def __call__(self, feats: list[jax.Array]) -> list[jax.Array]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + resize_nearest(o3, *o2.shape[1:3]))
        o1 = self.merge1(o1 + resize_nearest(o2, *o1.shape[1:3]))
        return [o1, o2, o3]


class SSH(nnx.Module):
    """Single-stage headless context module: 3x3 (out/2) ++ 5x5 (out/4, two 3x3) ++ 7x7 (out/4,
    three 3x3, sharing the first), then ReLU."""

    def __init__(self, cin: int, out: int, *, rngs: nnx.Rngs):
        leaky = 0.1 if out <= 64 else 0.0
        self.conv3X3 = ConvBN(cin, out // 2, 3, rngs=rngs)
        self.conv5X5_1 = ConvBN(cin, out // 4, 3, act=True, leaky=leaky, rngs=rngs)
        self.conv5X5_2 = ConvBN(out // 4, out // 4, 3, rngs=rngs)
        self.conv7X7_2 = ConvBN(out // 4, out // 4, 3, act=True, leaky=leaky, rngs=rngs)
        self.conv7x7_3 = ConvBN(out // 4, out // 4, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        c5_1 = self.conv5X5_1(x)
        c7_2 = self.conv7X7_2(c5_1)
        return jax.nn.relu(jnp.concatenate([self.conv3X3(x), self.conv5X5_2(c5_1), self.conv7x7_3(c7_2)], -1))


class Head(nnx.Module):
    """A 1x1 conv predicting ``per_anchor`` values for each of ``anchors`` anchors per position:
    ``(B, H, W, C) -> (B, H * W * anchors, per_anchor)`` (torch's NCHW -> NHWC view order)."""

    def __init__(self, cin: int, per_anchor: int, anchors: int = 2, *, rngs: nnx.Rngs):
        self.conv1x1 = conv(cin, anchors * per_anchor, 1, use_bias=True, rngs=rngs)
        self.per_anchor = per_anchor

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv1x1(x).reshape(x.shape[0], -1, self.per_anchor)


class RetinaFace(nnx.Module):
    """``pixels (B, H, W, 3)`` BGR minus ``BGR_MEAN`` -> ``(loc (B, N, 4), conf (B, N, 2) softmaxed,
    landmarks (B, N, 10))``, N anchors in ``priors`` order (levels, rows, columns, 2 sizes)."""

    def __init__(self, *, rngs: nnx.Rngs, channels: int = 256):
        self.body = ResNet50(rngs=rngs)
        self.fpn = FPN((512, 1024, 2048), channels, rngs=rngs)
        self.ssh1, self.ssh2, self.ssh3 = (SSH(channels, channels, rngs=rngs) for _ in range(3))
        self.ClassHead = nnx.List([Head(channels, 2, rngs=rngs) for _ in range(3)])
        self.BboxHead = nnx.List([Head(channels, 4, rngs=rngs) for _ in range(3)])
        self.LandmarkHead = nnx.List([Head(channels, 10, rngs=rngs) for _ in range(3)])

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        loc = jnp.concatenate([h(f) for h, f in zip(self.BboxHead, feats)], 1)
        conf = jnp.concatenate([h(f) for h, f in zip(self.ClassHead, feats)], 1)
        landmarks = jnp.concatenate([h(f) for h, f in zip(self.LandmarkHead, feats)], 1)
        return loc, jax.nn.softmax(conf, axis=-1), landmarks


def priors(height: int, width: int) -> np.ndarray:
    """facexlib's ``PriorBox``: ``(N, 4)`` float32 anchors (cx, cy, w, h) relative to the image,
    for every level, row, column and anchor size, computed in float64 and then rounded as torch
    does."""
    out = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        fh, fw = -(-height // step), -(-width // step)
        cy, cx = np.meshgrid((np.arange(fh) + 0.5) * step / height, (np.arange(fw) + 0.5) * step / width,
                             indexing="ij")
        per_size = [np.stack([cx, cy, np.full_like(cx, s / width), np.full_like(cy, s / height)], -1)
                    for s in sizes]
        out.append(np.stack(per_size, 2).reshape(-1, 4))
    return np.concatenate(out).astype(np.float32)
