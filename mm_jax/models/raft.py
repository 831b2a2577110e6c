"""RAFT optical flow (Teed & Deng 2020, the ``raft-things`` release VBench's dynamic degree uses) in Flax NNX.

``RAFT(image1, image2, iters)``: two ``(B, H, W, 3)`` images in [0, 255] (``H``, ``W`` multiples of 8)
-> ``(flow_low (B, H/8, W/8, 2), flow_up (B, H, W, 2))`` (x then y displacement, in pixels), as VBench's
``RAFT.forward(..., test_mode=True)`` returns them (NCHW there, NHWC here):

- ``fnet`` (``BasicEncoder``, instance norm, no affine) maps both images (scaled to [-1, 1]) to
  ``feature_dim`` features at 1/8; ``cnet`` (same encoder, eval BatchNorm) maps image1 to
  ``hidden_dim + context_dim`` channels, split into the GRU's start state (tanh) and context (relu).
- The all-pairs correlation ``<f1(i,j), f2(k,l)> / sqrt(feature_dim)``, average-pooled 2x2 over ``(k, l)``
  into ``corr_levels`` levels, is read around the current match in a ``(2r+1)^2`` window per level with
  torch's ``grid_sample(align_corners=True)`` (zeros outside). As in the original, the window's first
  index moves the x coordinate, the second the y coordinate.
- ``iters`` rounds (``lax.fori_loop``) of the update block (motion encoder, separable ConvGRU, flow head,
  upsampling-mask head) move the match; the last mask convex-upsamples the flow 8x.

Module names follow the torch state dict (``fnet.layer2.0.downsample.0.weight``,
``update_block.gru.convz1.bias``, ``update_block.mask.2.weight``; ``tools/convert_weights/raft.py``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models.config_base import ConfigBase
from mm_jax.models.conv_layers import BN_EPS

DOWNSAMPLE = 8  # stem stride 2, layer2 and layer3 stride 2


@dataclasses.dataclass(frozen=True)
class RAFTConfig(ConfigBase):
    """RAFT sizes; the defaults are the released ``raft-things`` (``RAFT(args)`` with ``small=False``)."""
    stem_channels: int = 64
    layer_channels: tuple[int, ...] = (64, 96, 128)     # layer1 (stride 1), layer2, layer3 (stride 2)
    feature_dim: int = 256                              # fnet output
    hidden_dim: int = 128
    context_dim: int = 128
    corr_levels: int = 4
    corr_radius: int = 4
    corr_channels: tuple[int, int] = (256, 192)         # motion encoder convc1, convc2
    flow_channels: tuple[int, int] = (128, 64)          # motion encoder convf1 (7x7), convf2
    motion_dim: int = 128                               # motion features incl. the 2 flow channels
    flow_head_dim: int = 256
    mask_dim: int = 256
    iters: int = 20                                     # VBench's dynamic degree runs 20

    RUNTIME_FIELDS = ()
    TAG = {"architectures": ["RAFT"]}
    STRICT = True

    def validate(self) -> None:
        if len(self.layer_channels) != 3:
            raise ValueError(f"layer_channels={self.layer_channels}: need 3 layers (strides 1, 2, 2)")
        if self.corr_levels < 1 or self.corr_radius < 0:
            raise ValueError(f"corr_levels={self.corr_levels}, corr_radius={self.corr_radius}: "
                             "need at least 1 level and a radius >= 0")
        if self.motion_dim <= 2:
            raise ValueError(f"motion_dim={self.motion_dim}: must exceed the 2 flow channels")

    def min_side(self) -> int:
        """Smallest image side: the coarsest correlation level needs 2 cells (torch divides by side-1)."""
        return DOWNSAMPLE * 2 ** self.corr_levels


def _conv(cin: int, cout: int, k, *, rngs: nnx.Rngs) -> nnx.Conv:
    """torch ``Conv2d(cin, cout, k, padding=k//2)`` with bias, NHWC; ``k`` an int or (kh, kw)."""
    kh, kw = (k, k) if isinstance(k, int) else k
    return nnx.Conv(cin, cout, (kh, kw), padding=[(kh // 2, kh // 2), (kw // 2, kw // 2)], rngs=rngs)


def _strided(cin: int, cout: int, k: int, stride: int, *, rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=[(k // 2, k // 2)] * 2, rngs=rngs)


def instance_norm(x: jax.Array) -> jax.Array:
    """torch ``InstanceNorm2d`` (no affine, biased variance, eps 1e-5) over ``H, W`` of NHWC."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    return (x - mean) / jnp.sqrt(var + BN_EPS)


class _Norm(nnx.Module):
    """``instance`` (parameter-free) or ``batch`` (eval BatchNorm2d on stored statistics)."""

    def __init__(self, kind: str, c: int, *, rngs: nnx.Rngs):
        self.bn = (nnx.BatchNorm(c, use_running_average=True, epsilon=BN_EPS, rngs=rngs)
                   if kind == "batch" else None)

    def __call__(self, x):
        return instance_norm(x) if self.bn is None else self.bn(x)


class ResidualBlock(nnx.Module):
    """``relu(x' + relu(n2(conv2(relu(n1(conv1(x)))))))``, ``x'`` a strided 1x1 conv + norm when strided."""

    def __init__(self, cin: int, cout: int, norm: str, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = _strided(cin, cout, 3, stride, rngs=rngs)
        self.conv2 = _conv(cout, cout, 3, rngs=rngs)
        self.norm1, self.norm2 = _Norm(norm, cout, rngs=rngs), _Norm(norm, cout, rngs=rngs)
        self.downsample = (None if stride == 1 else
                           nnx.List([_strided(cin, cout, 1, stride, rngs=rngs), _Norm(norm, cout, rngs=rngs)]))

    def __call__(self, x):
        y = jax.nn.relu(self.norm1(self.conv1(x)))
        y = jax.nn.relu(self.norm2(self.conv2(y)))
        if self.downsample is not None:
            x = self.downsample[1](self.downsample[0](x))
        return jax.nn.relu(x + y)


class BasicEncoder(nnx.Module):
    """7x7/2 conv, norm, relu, three pairs of residual blocks (strides 1, 2, 2), 1x1 conv to ``cout``."""

    def __init__(self, config: RAFTConfig, cout: int, norm: str, *, rngs: nnx.Rngs):
        c0 = config.stem_channels
        self.conv1 = _strided(3, c0, 7, 2, rngs=rngs)
        self.norm1 = _Norm(norm, c0, rngs=rngs)
        cin, layers = c0, []
        for c, stride in zip(config.layer_channels, (1, 2, 2)):
            layers.append(nnx.List([ResidualBlock(cin, c, norm, stride, rngs=rngs),
                                    ResidualBlock(c, c, norm, 1, rngs=rngs)]))
            cin = c
        self.layer1, self.layer2, self.layer3 = layers
        self.conv2 = _conv(cin, cout, 1, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.norm1(self.conv1(x)))
        for layer in (self.layer1, self.layer2, self.layer3):
            x = layer[1](layer[0](x))
        return self.conv2(x)


class BasicMotionEncoder(nnx.Module):
    def __init__(self, config: RAFTConfig, *, rngs: nnx.Rngs):
        planes = config.corr_levels * (2 * config.corr_radius + 1) ** 2
        (c1, c2), (f1, f2) = config.corr_channels, config.flow_channels
        self.convc1 = _conv(planes, c1, 1, rngs=rngs)
        self.convc2 = _conv(c1, c2, 3, rngs=rngs)
        self.convf1 = _conv(2, f1, 7, rngs=rngs)
        self.convf2 = _conv(f1, f2, 3, rngs=rngs)
        self.conv = _conv(c2 + f2, config.motion_dim - 2, 3, rngs=rngs)

    def __call__(self, flow, corr):
        cor = jax.nn.relu(self.convc2(jax.nn.relu(self.convc1(corr))))
        flo = jax.nn.relu(self.convf2(jax.nn.relu(self.convf1(flow))))
        out = jax.nn.relu(self.conv(jnp.concatenate([cor, flo], -1)))
        return jnp.concatenate([out, flow], -1)


class SepConvGRU(nnx.Module):
    """A GRU step with 1x5 convs, then one with 5x1 convs."""

    def __init__(self, hidden: int, cin: int, *, rngs: nnx.Rngs):
        for axis, k in (("1", (1, 5)), ("2", (5, 1))):
            for gate in "zrq":
                setattr(self, f"conv{gate}{axis}", _conv(hidden + cin, hidden, k, rngs=rngs))

    def __call__(self, h, x):
        for axis in "12":
            hx = jnp.concatenate([h, x], -1)
            z = jax.nn.sigmoid(getattr(self, f"convz{axis}")(hx))
            r = jax.nn.sigmoid(getattr(self, f"convr{axis}")(hx))
            q = jnp.tanh(getattr(self, f"convq{axis}")(jnp.concatenate([r * h, x], -1)))
            h = (1 - z) * h + z * q
        return h


class FlowHead(nnx.Module):
    def __init__(self, cin: int, hidden: int, *, rngs: nnx.Rngs):
        self.conv1, self.conv2 = _conv(cin, hidden, 3, rngs=rngs), _conv(hidden, 2, 3, rngs=rngs)

    def __call__(self, x):
        return self.conv2(jax.nn.relu(self.conv1(x)))


class BasicUpdateBlock(nnx.Module):
    """``(net, inp, corr, flow) -> (net', 0.25 * mask, delta_flow)``."""

    def __init__(self, config: RAFTConfig, *, rngs: nnx.Rngs):
        h = config.hidden_dim
        self.encoder = BasicMotionEncoder(config, rngs=rngs)
        self.gru = SepConvGRU(h, config.context_dim + config.motion_dim, rngs=rngs)
        self.flow_head = FlowHead(h, config.flow_head_dim, rngs=rngs)
        # torch's Sequential(conv, ReLU, conv): entries 0 and 2
        self.mask = nnx.Dict({"0": _conv(h, config.mask_dim, 3, rngs=rngs),
                              "2": _conv(config.mask_dim, 9 * DOWNSAMPLE ** 2, 1, rngs=rngs)})

    def __call__(self, net, inp, corr, flow):
        net = self.gru(net, jnp.concatenate([inp, self.encoder(flow, corr)], -1))
        mask = 0.25 * self.mask["2"](jax.nn.relu(self.mask["0"](net)))
        return net, mask, self.flow_head(net)


def coords_grid(b: int, h: int, w: int) -> jax.Array:
    """``(B, h, w, 2)`` pixel coordinates, x (column) then y (row)."""
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    return jnp.broadcast_to(jnp.stack([xs, ys], -1), (b, h, w, 2))


def grid_sample_points(img: jax.Array, x: jax.Array, y: jax.Array) -> jax.Array:
    """torch ``grid_sample(img, grid, align_corners=True)`` (bilinear, zeros padding) on a one-channel
    ``img (N, H, W)`` at pixel points ``x, y (N, P)`` given as RAFT's ``bilinear_sampler`` passes them
    (normalised by ``2x/(W-1) - 1`` and back, in float32 as torch rounds)."""
    _, hh, ww = img.shape
    ix = ((2 * x / (ww - 1) - 1) + 1) / 2 * (ww - 1)
    iy = ((2 * y / (hh - 1) - 1) + 1) / 2 * (hh - 1)
    x0, y0 = jnp.floor(ix), jnp.floor(iy)
    x1, y1 = x0 + 1, y0 + 1
    flat = img.reshape(img.shape[0], -1)
    out = 0.0
    for cx, cy, wgt in ((x0, y0, (x1 - ix) * (y1 - iy)), (x1, y0, (ix - x0) * (y1 - iy)),
                        (x0, y1, (x1 - ix) * (iy - y0)), (x1, y1, (ix - x0) * (iy - y0))):
        inside = (cx >= 0) & (cx <= ww - 1) & (cy >= 0) & (cy <= hh - 1)
        idx = (jnp.clip(cy, 0, hh - 1) * ww + jnp.clip(cx, 0, ww - 1)).astype(jnp.int32)
        out = out + jnp.where(inside, jnp.take_along_axis(flat, idx, axis=1), 0.0) * wgt
    return out


def correlation_pyramid(f1: jax.Array, f2: jax.Array, levels: int) -> list[jax.Array]:
    """All-pairs correlation ``(B*h*w, h, w)`` and its 2x2 average pools (floor on odd sides)."""
    b, h, w, d = f1.shape
    corr = jnp.einsum("bijd,bkld->bijkl", f1, f2, precision=jax.lax.Precision.HIGHEST) / jnp.sqrt(jnp.float32(d))
    corr = corr.reshape(b * h * w, h, w)
    out = [corr]
    for _ in range(levels - 1):
        n, hh, ww = corr.shape
        corr = corr[:, :hh // 2 * 2, :ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2).mean(axis=(2, 4))
        out.append(corr)
    return out


def lookup(pyramid: list[jax.Array], coords: jax.Array, radius: int) -> jax.Array:
    """The ``(2r+1)^2`` window of every level around ``coords (B, h, w, 2)`` -> ``(B, h, w, L*(2r+1)^2)``,
    window index ``a*(2r+1) + b`` at ``x + a - r, y + b - r`` (RAFT's meshgrid order)."""
    b, h, w, _ = coords.shape
    d = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    da, db = jnp.meshgrid(d, d, indexing="ij")
    out = []
    for i, corr in enumerate(pyramid):
        c = coords.reshape(b * h * w, 1, 2) / 2 ** i
        x = c[..., 0] + da.reshape(1, -1)
        y = c[..., 1] + db.reshape(1, -1)
        out.append(grid_sample_points(corr, x, y).reshape(b, h, w, -1))
    return jnp.concatenate(out, -1)


def convex_upsample(flow: jax.Array, mask: jax.Array) -> jax.Array:
    """``(B, h, w, 2)`` flow and ``(B, h, w, 9*64)`` mask logits -> ``(B, 8h, 8w, 2)``: every fine pixel a
    softmax-weighted mix of the 3x3 coarse neighbours of ``8 * flow`` (zeros outside)."""
    b, h, w, _ = flow.shape
    s = DOWNSAMPLE
    mask = jax.nn.softmax(mask.reshape(b, h, w, 9, s, s), axis=3)
    padded = jnp.pad(s * flow, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = jnp.stack([padded[:, ky:ky + h, kx:kx + w] for ky in range(3) for kx in range(3)], axis=3)
    up = jnp.sum(mask[..., None] * taps[:, :, :, :, None, None, :], axis=3)  # (B, h, w, s, s, 2)
    return up.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * s, w * s, 2)


class RAFT(nnx.Module):
    """``(image1, image2) (B, H, W, 3)`` in [0, 255] -> ``(flow_low, flow_up)`` after ``iters`` updates."""

    def __init__(self, config: RAFTConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        self.fnet = BasicEncoder(config, config.feature_dim, "instance", rngs=rngs)
        self.cnet = BasicEncoder(config, config.hidden_dim + config.context_dim, "batch", rngs=rngs)
        self.update_block = BasicUpdateBlock(config, rngs=rngs)

    def features(self, image1: jax.Array, image2: jax.Array):
        """``(fmap1, fmap2, net, inp)``: feature maps of both images, GRU start state and context."""
        cfg = self.config
        for name, im in (("image1", image1), ("image2", image2)):
            if im.ndim != 4 or im.shape[-1] != 3 or im.shape[1] % DOWNSAMPLE or im.shape[2] % DOWNSAMPLE:
                raise ValueError(f"{name} shape {tuple(im.shape)}: expected (B, H, W, 3), H and W multiples "
                                 f"of {DOWNSAMPLE} (pad with mm_jax.metrics.dynamic_degree.pad_sintel)")
            if min(im.shape[1:3]) < cfg.min_side():
                raise ValueError(f"{name} shape {tuple(im.shape)}: sides must be >= {cfg.min_side()} for "
                                 f"{cfg.corr_levels} correlation levels")
        if image1.shape != image2.shape:
            raise ValueError(f"image shapes differ: {tuple(image1.shape)} vs {tuple(image2.shape)}")
        x1, x2 = 2 * (image1 / 255.0) - 1.0, 2 * (image2 / 255.0) - 1.0
        f = self.fnet(jnp.concatenate([x1, x2], 0))
        fmap1, fmap2 = jnp.split(f, 2, axis=0)
        c = self.cnet(x1)
        return fmap1, fmap2, jnp.tanh(c[..., :cfg.hidden_dim]), jax.nn.relu(c[..., cfg.hidden_dim:])

    def __call__(self, image1: jax.Array, image2: jax.Array, iters: int | None = None):
        cfg = self.config
        iters = cfg.iters if iters is None else iters
        if iters < 1:
            raise ValueError(f"iters={iters}: need at least 1 update")
        fmap1, fmap2, net, inp = self.features(image1, image2)
        pyramid = correlation_pyramid(fmap1, fmap2, cfg.corr_levels)
        b, h, w, _ = fmap1.shape
        coords0 = coords_grid(b, h, w)
        block = self.update_block

        def step(_, carry):
            net, coords1, _ = carry
            corr = lookup(pyramid, coords1, cfg.corr_radius)
            net, mask, delta = block(net, inp, corr, coords1 - coords0)
            return net, coords1 + delta, mask

        mask0 = jnp.zeros((b, h, w, 9 * DOWNSAMPLE ** 2), jnp.float32)
        _, coords1, mask = jax.lax.fori_loop(0, iters, step, (net, coords0, mask0))
        flow = coords1 - coords0
        return flow, convex_upsample(flow, mask)
