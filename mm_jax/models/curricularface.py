"""CurricularFace's IR-101 face recognizer (TFace's ``Backbone(..., mode='ir')``) in Flax NNX.

The network behind FaceSim-Cur in ConsisID's and OpenS2V's evaluation (ConsisID
``util/on_going_module/curricularface/model_irse.py``, ``IR_101([112, 112])``, weights
``glint360k_curricular_face_r101_backbone.bin``): ``pixels (B, S, S, 3)`` (RGB, ``(x/255 - 0.5)/0.5``)
-> input layer (3x3 conv 64, BN, PReLU) -> four stages of ``BasicBlockIR`` units ([3, 13, 30, 3] at
64/128/256/512 channels, the first unit of each stage strided 2) -> output layer (BN, dropout (identity
at inference), flatten in torch's channel-major order, Linear ``C * (S/16)^2 -> 512``, BatchNorm1d without
affine) -> ``(B, 512)`` (not normalised; ``mm_jax.metrics.curricularface_embed`` normalises).

A unit: ``res = BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN`` plus a shortcut that is
``MaxPool2d(1, stride)`` (a strided subsample) when the channel count is unchanged, else a strided 1x1
conv + BN. Module names follow the torch state dict: ``input_layer``, ``body``, ``res_layer`` and
``shortcut_layer`` are lists indexed as torch's ``Sequential`` (``body.3.res_layer.4.weight``); the
output layer's three parametrised entries are ``output_layer.0/3/4`` in torch, ``bn``/``linear``/``bn1d``
here (the converter renames). BatchNorm runs on its stored statistics (inference only).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models.config_base import ConfigBase
from mm_jax.models.conv_layers import BN_EPS, batch_norm, conv

# torch's Sequential index of each parametrised output-layer entry (1 is Dropout, 2 is Flatten)
OUTPUT_LAYER_INDEX = {"bn": 0, "linear": 3, "bn1d": 4}
NUM_STRIDED_STAGES = 4


@dataclasses.dataclass(frozen=True)
class CurricularFaceConfig(ConfigBase):
    """IR backbone sizes; the defaults are the released IR-101 at 112x112 (``IR_101([112, 112])``)."""
    IGNORED = ("architectures",)                          # the tag to_dict writes
    input_size: int = 112                                 # square input side (112 or 224 in TFace)
    stem_channels: int = 64                               # input layer's conv width
    stage_channels: tuple[int, ...] = (64, 128, 256, 512)
    stage_units: tuple[int, ...] = (3, 13, 30, 3)         # IR-101 (TFace's num_layers=100)
    embedding_size: int = 512

    RUNTIME_FIELDS = ()
    TAG = {"architectures": ["IR_101"]}
    STRICT = True

    def validate(self) -> None:
        if len(self.stage_channels) != NUM_STRIDED_STAGES or len(self.stage_units) != NUM_STRIDED_STAGES:
            raise ValueError(f"stage_channels={self.stage_channels} and stage_units={self.stage_units}: "
                             f"need {NUM_STRIDED_STAGES} stages each")
        if min(self.stage_units) < 1:
            raise ValueError(f"stage_units={self.stage_units}: every stage needs at least 1 unit")
        if self.input_size % 2 ** NUM_STRIDED_STAGES:
            raise ValueError(f"input_size={self.input_size}: must be a multiple of {2 ** NUM_STRIDED_STAGES}")

    @property
    def output_side(self) -> int:
        """Side of the last feature map (7 at 112)."""
        return self.input_size // 2 ** NUM_STRIDED_STAGES

    def units(self) -> list[tuple[int, int, int]]:
        """``(in_channels, depth, stride)`` of every unit in order (TFace's ``get_blocks``)."""
        out, cin = [], self.stem_channels
        for depth, n in zip(self.stage_channels, self.stage_units):
            out += [(cin, depth, 2)] + [(depth, depth, 1)] * (n - 1)
            cin = depth
        return out


class PReLU(nnx.Module):
    """torch ``PReLU(c)``: ``x`` where ``x > 0``, else ``a_c * x`` (one slope per channel, last axis)."""

    def __init__(self, c: int):
        self.weight = nnx.Param(jnp.full((c,), 0.25, jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.where(x > 0, x, self.weight[...] * x)


class BasicBlockIR(nnx.Module):
    """One IR unit: ``(B, H, W, cin) -> (B, H/stride, W/stride, depth)``."""

    def __init__(self, cin: int, depth: int, stride: int, *, rngs: nnx.Rngs):
        self.stride = stride
        self.shortcut_layer = (None if cin == depth else
                               nnx.List([conv(cin, depth, 1, stride, rngs=rngs), batch_norm(depth, rngs=rngs)]))
        self.res_layer = nnx.List([
            batch_norm(cin, rngs=rngs), conv(cin, depth, 3, rngs=rngs), batch_norm(depth, rngs=rngs),
            PReLU(depth), conv(depth, depth, 3, stride, rngs=rngs), batch_norm(depth, rngs=rngs)])

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.shortcut_layer is None:
            shortcut = x[:, ::self.stride, ::self.stride]  # MaxPool2d(kernel 1, stride)
        else:
            shortcut = self.shortcut_layer[1](self.shortcut_layer[0](x))
        res = x
        for layer in self.res_layer:
            res = layer(res)
        return res + shortcut


class CurricularFaceIR(nnx.Module):
    """The IR backbone: ``pixels (B, S, S, 3)`` normalised to [-1, 1] -> ``(B, embedding_size)``."""

    def __init__(self, config: CurricularFaceConfig, *, rngs: nnx.Rngs):
        config.validate()
        self.config = config
        c0 = config.stem_channels
        self.input_layer = nnx.List([conv(3, c0, 3, rngs=rngs), batch_norm(c0, rngs=rngs), PReLU(c0)])
        self.body = nnx.List([BasicBlockIR(cin, depth, s, rngs=rngs) for cin, depth, s in config.units()])
        cout = config.stage_channels[-1]
        self.bn = batch_norm(cout, rngs=rngs)
        self.linear = nnx.Linear(cout * config.output_side ** 2, config.embedding_size, rngs=rngs)
        self.bn1d = nnx.BatchNorm(config.embedding_size, use_running_average=True, use_bias=False,
                                  use_scale=False, epsilon=BN_EPS, rngs=rngs)  # BatchNorm1d(affine=False)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        s = self.config.input_size
        if pixels.ndim != 4 or pixels.shape[1:] != (s, s, 3):
            raise ValueError(f"pixels shape {tuple(pixels.shape)}: expected (B, {s}, {s}, 3)")
        x = pixels
        for layer in self.input_layer:
            x = layer(x)
        for unit in self.body:
            x = unit(x)
        x = self.bn(x)
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's Flatten of NCHW
        return self.bn1d(self.linear(x))
