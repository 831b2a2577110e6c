"""torchvision's Inception v3 as a feature extractor (``fc = Identity``): the 2048-d pooled features.

This is the network ConsisID's face FID (``eval/get_facesim_fid.py``) runs: ``inception_v3(weights=DEFAULT)``
with ``fc`` replaced by ``Identity``, in eval mode. With weights given torchvision sets ``transform_input=True``
(the input is re-mapped from ImageNet-normalised to [-1, 1] per channel); the auxiliary classifier only runs in
training mode, so it is not built. Module names equal torchvision's (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``,
``.conv``/``.bn``), so ``tools/convert_weights/inception_v3.py`` maps keys by name. Layout is NHWC; every
conv is a ``BasicConv2d``: conv without bias, BatchNorm (eps 0.001, running statistics), ReLU.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models.config_base import ConfigBase

BN_EPS = 1e-3
# transform_input: x * std / 0.5 + (mean - 0.5) / 0.5 per channel (torchvision's constants)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class InceptionV3Config(ConfigBase):
    """Sizes of torchvision's ``Inception3`` (the defaults are the published network).

    ``pool_features``: the pool-branch width of Mixed_5b/5c/5d; ``channels_7x7``: the 7x7-branch width of
    Mixed_6b..6e; ``min_size``: the smallest input side the strided stem and reductions accept (torchvision's
    ``min_size`` meta, 75).
    """
    transform_input: bool = True
    pool_features: tuple[int, int, int] = (32, 64, 64)
    channels_7x7: tuple[int, int, int, int] = (128, 160, 160, 192)
    min_size: int = 75
    STRICT = True

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if len(self.pool_features) != 3 or min(self.pool_features) < 1:
            raise ValueError(f"pool_features must be 3 positive widths (Mixed_5b/5c/5d), got {self.pool_features}")
        if len(self.channels_7x7) != 4 or min(self.channels_7x7) < 1:
            raise ValueError(f"channels_7x7 must be 4 positive widths (Mixed_6b..6e), got {self.channels_7x7}")

    @property
    def features(self) -> int:
        """Width of the pooled output (Mixed_7c: 320 + 768 + 768 + 192)."""
        return 2048


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """torchvision's ``BasicConv2d``: ``Conv2d(bias=False)`` -> ``BatchNorm2d(eps=0.001)`` -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0, *, rngs: nnx.Rngs):
        kh, kw = _pair(kernel)
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(cin, cout, (kh, kw), strides=_pair(stride), padding=[(ph, ph), (pw, pw)],
                             use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(cout, use_running_average=True, epsilon=BN_EPS, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """torch ``max_pool2d(kernel_size=3, stride=2)`` (no padding, floor)."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def avg_pool_3x3_s1_p1(x: jax.Array) -> jax.Array:
    """torch ``avg_pool2d(kernel_size=3, stride=1, padding=1)``: zero padding counted (divide by 9)."""
    s = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return s / 9.0


class InceptionA(nnx.Module):
    def __init__(self, cin: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(cin, pool_features, 1, rngs=rngs)

    def __call__(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(avg_pool_3x3_s1_p1(x))], -1)


class InceptionB(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, max_pool_3x3_s2(x)], -1)


class InceptionC(nnx.Module):
    def __init__(self, cin: int, c7: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            bd = layer(bd)
        return jnp.concatenate([self.branch1x1(x), b7, bd, self.branch_pool(avg_pool_3x3_s1_p1(x))], -1)


class InceptionD(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, max_pool_3x3_s2(x)], -1)


class InceptionE(nnx.Module):
    def __init__(self, cin: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(cin, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
        self.branch_pool = BasicConv2d(cin, 192, 1, rngs=rngs)

    def __call__(self, x):
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                                self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd),
                                self.branch_pool(avg_pool_3x3_s1_p1(x))], -1)


class InceptionV3Features(nnx.Module):
    """``inception_v3(...)`` with ``fc = Identity`` in eval mode: ``(B, H, W, 3)`` pixels -> ``(B, 2048)``.

    The input is what torchvision's model receives (ConsisID feeds ``ToTensor`` output, [0, 1], un-normalised),
    NHWC; with ``config.transform_input`` the per-channel re-mapping runs first, as in torchvision.
    """

    def __init__(self, config: InceptionV3Config | None = None, *, rngs: nnx.Rngs):
        self.config = cfg = config or InceptionV3Config()
        pf, c7 = cfg.pool_features, cfg.channels_7x7
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = InceptionA(192, pf[0], rngs=rngs)
        self.Mixed_5c = InceptionA(224 + pf[0], pf[1], rngs=rngs)
        self.Mixed_5d = InceptionA(224 + pf[1], pf[2], rngs=rngs)
        self.Mixed_6a = InceptionB(224 + pf[2], rngs=rngs)
        self.Mixed_6b = InceptionC(480 + 224 + pf[2], c7[0], rngs=rngs)
        self.Mixed_6c = InceptionC(768, c7[1], rngs=rngs)
        self.Mixed_6d = InceptionC(768, c7[2], rngs=rngs)
        self.Mixed_6e = InceptionC(768, c7[3], rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = InceptionE(1280, rngs=rngs)
        self.Mixed_7c = InceptionE(2048, rngs=rngs)

    def transform_input(self, x: jax.Array) -> jax.Array:
        """torchvision's ``_transform_input`` (identity unless ``config.transform_input``)."""
        if not self.config.transform_input:
            return x
        std = jnp.asarray(_IMAGENET_STD, x.dtype) / 0.5
        shift = (jnp.asarray(_IMAGENET_MEAN, x.dtype) - 0.5) / 0.5
        return x * std + shift

    def __call__(self, pixels: jax.Array) -> jax.Array:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise ValueError(f"pixels must be (B, H, W, 3), got shape {tuple(pixels.shape)}")
        if min(pixels.shape[1:3]) < self.config.min_size:
            raise ValueError(f"pixels must be at least {self.config.min_size}x{self.config.min_size} "
                             f"(torchvision's min_size), got {pixels.shape[1]}x{pixels.shape[2]}")
        x = self.transform_input(pixels)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = max_pool_3x3_s2(x)
        x = max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten; dropout and fc are identities
