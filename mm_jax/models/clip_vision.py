"""The CLIP ViT image tower (transformers ``CLIPVisionModel``) in Flax NNX.

Patches (conv, no bias) + class token + learned positions -> pre-LayerNorm -> N pre-LN encoder
layers (quick-GELU MLP) -> hidden states. Magic Mirror uses the **penultimate** layer's hidden
states, all tokens: ``pixels (B, H, W, 3)`` (CLIP-normalized) -> ``(B, 1 + (H/p)(W/p), width)``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.layers import Dense, LayerNorm, attention, canonical_dtype
from mm_jax.models.t5 import Embedding

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    dtype: str = "float32"
    param_dtype: str = "float32"

    RUNTIME_FIELDS = ("dtype", "param_dtype")

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "CLIPVisionConfig":
        d = d.get("vision_config", d)  # a full CLIPModel config holds the tower's fields there
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names}, **overrides)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_FIELDS:
            d.pop(k)
        d["architectures"] = ["CLIPVisionModel"]
        return d

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported {sorted(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class Embeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        pdt, d, p = canonical_dtype(cfg.param_dtype), cfg.hidden_size, cfg.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), pdt), logical_axes=("embed",))
        self.patch_embedding = nnx.Module()
        self.patch_embedding.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (p, p, cfg.num_channels, d), pdt) / np.sqrt(p * p * cfg.num_channels),
            logical_axes=("patch", "patch", "channels", "embed"))
        self.position_embedding = Embedding(cfg.num_positions, d, axes=(None, "embed"), param_dtype=pdt, rngs=rngs)
        self.p, self.dtype = p, canonical_dtype(cfg.dtype)

    def __call__(self, pixels):
        b, h, w, c = pixels.shape
        p = self.p
        x = pixels.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("biyjxc,yxcd->bijd", x, self.patch_embedding.kernel[...].astype(self.dtype))
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...][: x.shape[1]].astype(self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        d = cfg.hidden_size
        kw = dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)
        self.heads = cfg.num_attention_heads

    def __call__(self, x):
        b, s, d = x.shape
        split = lambda t: t.reshape(b, s, self.heads, d // self.heads)
        o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(o.reshape(b, s, d))


class MLP(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        kw = dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        kw = dict(eps=cfg.layer_norm_eps, dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **kw)
        self.self_attn = SelfAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionTower(nnx.Module):
    """``pixels (B, H, W, 3) -> penultimate hidden states (B, 1+P, width)``; ``all_hidden=True`` returns
    every hidden state (embeddings after ``pre_layrnorm`` first), as transformers' ``hidden_states``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(eps=cfg.layer_norm_eps, dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, **kw)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, **kw)  # unused by Magic Mirror; kept for the checkpoint

    def __call__(self, pixels: jax.Array, all_hidden: bool = False):
        h = self.pre_layrnorm(self.embeddings(pixels))
        states = [h]
        layers = self.encoder.layers if all_hidden else list(self.encoder.layers)[:-1]
        for layer in layers:
            h = layer(h)
            states.append(h)
        return tuple(states) if all_hidden else h
