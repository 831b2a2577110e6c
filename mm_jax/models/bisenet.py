"""BiSeNet face parsing (facexlib's ``BiSeNet(num_class=19)``, CelebAMask-HQ labels) in Flax NNX.

ConsisID keeps the face's own pixels with it: ``pixels (B, H, W, 3)`` (RGB in [0, 1], ImageNet-
normalised; H, W multiples of 32) -> ResNet-18 context path (features at 1/8, 1/16, 1/32;
attention refinement and a global-context branch) -> feature fusion of the 1/8 features ->
three per-pixel class maps ``(out, out16, out32)``, each ``(B, H, W, num_class)``, bilinearly
upsampled with ``align_corners=True``. ConsisID uses ``out`` only.

Parameter names follow facexlib's state dict (``cp.resnet.layer1.0.conv1``, ``cp.arm16.conv_atten``,
``ffm.convblk.conv``, ``conv_out.conv_out``); a ``downsample`` ``Sequential(conv, bn)`` is our
``ConvBN`` (keys ``.0.``/``.1.``, one rename in the converter). BatchNorm runs on its stored
statistics (inference only).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models.conv_layers import (batch_norm, conv, global_avg_pool, max_pool_3x3_s2, resize_bilinear_align_corners,
                                       resize_nearest)
from mm_jax.models.retinaface import ConvBN

NUM_CLASSES = 19


class ConvBNReLU(nnx.Module):
    """Conv (no bias) + BatchNorm + ReLU, padding ``k // 2``: ``(B, H, W, cin) -> (B, H, W, cout)``."""

    def __init__(self, cin: int, cout: int, k: int = 3, *, rngs: nnx.Rngs):
        self.conv = conv(cin, cout, k, rngs=rngs)
        self.bn = batch_norm(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class BasicBlock(nnx.Module):
    """ResNet-18 block: two 3x3 convs (stride on the first) plus the identity or a 1x1 projection."""

    def __init__(self, cin: int, cout: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = conv(cin, cout, 3, stride, rngs=rngs), batch_norm(cout, rngs=rngs)
        self.conv2, self.bn2 = conv(cout, cout, 3, rngs=rngs), batch_norm(cout, rngs=rngs)
        self.downsample = ConvBN(cin, cout, 1, stride, rngs=rngs) if cin != cout or stride != 1 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.bn2(self.conv2(jax.nn.relu(self.bn1(self.conv1(x)))))
        return jax.nn.relu((x if self.downsample is None else self.downsample(x)) + y)


class ResNet18(nnx.Module):
    """facexlib's ResNet-18 trunk: ``(B, H, W, 3) -> (feat8 (128), feat16 (256), feat32 (512))``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1, self.bn1 = conv(3, 64, 7, 2, rngs=rngs), batch_norm(64, rngs=rngs)
        cin = 64
        for i, (cout, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2)), 1):
            setattr(self, f"layer{i}", nnx.List([BasicBlock(cin, cout, stride, rngs=rngs),
                                                 BasicBlock(cout, cout, rngs=rngs)]))
            cin = cout

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        x = max_pool_3x3_s2(jax.nn.relu(self.bn1(self.conv1(x))))
        feats = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
            feats.append(x)
        return feats[1], feats[2], feats[3]


class AttentionRefinementModule(nnx.Module):
    """3x3 ConvBNReLU, then a channel gate from the global average: sigmoid(BN(1x1 conv))."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.conv = ConvBNReLU(cin, cout, rngs=rngs)
        self.conv_atten = conv(cout, cout, 1, rngs=rngs)
        self.bn_atten = batch_norm(cout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        feat = self.conv(x)
        return feat * jax.nn.sigmoid(self.bn_atten(self.conv_atten(global_avg_pool(feat))))


class ContextPath(nnx.Module):
    """ResNet-18 + refinement of the 1/16 and 1/32 features with a global-context term, upsampled
    (nearest) one level each: ``-> (feat8 (128 at 1/8), up16 (128 at 1/8), up32 (128 at 1/16))``."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.resnet = ResNet18(rngs=rngs)
        self.arm16 = AttentionRefinementModule(256, 128, rngs=rngs)
        self.arm32 = AttentionRefinementModule(512, 128, rngs=rngs)
        self.conv_head32 = ConvBNReLU(128, 128, rngs=rngs)
        self.conv_head16 = ConvBNReLU(128, 128, rngs=rngs)
        self.conv_avg = ConvBNReLU(512, 128, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(global_avg_pool(feat32))
        feat32_sum = self.arm32(feat32) + avg  # torch's nearest upsampling of a 1x1 map: a broadcast
        feat32_up = self.conv_head32(resize_nearest(feat32_sum, *feat16.shape[1:3]))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(resize_nearest(feat16_sum, *feat8.shape[1:3]))
        return feat8, feat16_up, feat32_up


class FeatureFusionModule(nnx.Module):
    """Concatenate, 1x1 ConvBNReLU, then ``feat * (1 + gate)`` with a squeeze-excite gate."""

    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
        self.convblk = ConvBNReLU(cin, cout, 1, rngs=rngs)
        self.conv1 = conv(cout, cout // 4, 1, rngs=rngs)
        self.conv2 = conv(cout // 4, cout, 1, rngs=rngs)

    def __call__(self, fsp: jax.Array, fcp: jax.Array) -> jax.Array:
        feat = self.convblk(jnp.concatenate([fsp, fcp], -1))
        atten = jax.nn.sigmoid(self.conv2(jax.nn.relu(self.conv1(global_avg_pool(feat)))))
        return feat * atten + feat


class BiSeNetOutput(nnx.Module):
    """3x3 ConvBNReLU then a 1x1 classifier (no bias)."""

    def __init__(self, cin: int, mid: int, num_class: int, *, rngs: nnx.Rngs):
        self.conv = ConvBNReLU(cin, mid, rngs=rngs)
        self.conv_out = conv(mid, num_class, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv_out(self.conv(x))


class BiSeNet(nnx.Module):
    """``pixels (B, H, W, 3)`` -> ``(out, out16, out32)``, each ``(B, H, W, num_class)`` logits."""

    def __init__(self, num_class: int = NUM_CLASSES, *, rngs: nnx.Rngs):
        self.cp = ContextPath(rngs=rngs)
        self.ffm = FeatureFusionModule(256, 256, rngs=rngs)
        self.conv_out = BiSeNetOutput(256, 256, num_class, rngs=rngs)
        self.conv_out16 = BiSeNetOutput(128, 64, num_class, rngs=rngs)
        self.conv_out32 = BiSeNetOutput(128, 64, num_class, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        h, w = x.shape[1:3]
        feat8, feat_cp8, feat_cp16 = self.cp(x)
        outs = (self.conv_out(self.ffm(feat8, feat_cp8)), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
        return tuple(resize_bilinear_align_corners(o, h, w) for o in outs)
