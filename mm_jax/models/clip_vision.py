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

from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import Dense, LayerNorm, attention, canonical_dtype
from mm_jax.models.t5 import Embedding
from mm_jax.parallel import constrain

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(ConfigBase):
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

    TAG = {"architectures": ["CLIPVisionModel"]}

    @classmethod
    def source_fields(cls, d: dict) -> dict:
        return d.get("vision_config", d)  # a full CLIPModel config holds the tower's fields there

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r}: supported {sorted(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


class Embeddings(nnx.Module):
    """Patch embedding (conv without bias, as a reshape + einsum), class token and learned
    positions: ``pixels (B, H, W, C) -> (B, 1 + (H/p)(W/p), width)``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        pdt, d, p = canonical_dtype(cfg.param_dtype), cfg.hidden_size, cfg.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), pdt), logical_axes=("embed",))
        self.patch_embedding = nnx.Module()
        self.patch_embedding.kernel = nnx.Param(
            jax.random.normal(rngs.params(), (p, p, cfg.num_channels, d), pdt) / np.sqrt(p * p * cfg.num_channels),
            logical_axes=("patch", "patch", "channels", "embed"))
        self.position_embedding = Embedding(cfg.num_positions, d, axes=(None, "embed"), param_dtype=pdt, rngs=rngs)
        self.p, self.image_size, self.dtype = p, cfg.image_size, canonical_dtype(cfg.dtype)

    def __call__(self, pixels):
        b, h, w, c = pixels.shape
        p = self.p
        if (h, w, c) != (self.image_size, self.image_size, self.patch_embedding.kernel.shape[2]):
            # the learned positions fix the grid; transformers would fail (or interpolate on request)
            raise ValueError(f"pixels of shape {pixels.shape}: the CLIP tower takes (B, {self.image_size}, "
                             f"{self.image_size}, {self.patch_embedding.kernel.shape[2]})")
        x = pixels.astype(self.dtype).reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("biyjxc,yxcd->bijd", x, self.patch_embedding.kernel[...].astype(self.dtype))
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(self.dtype)


class SelfAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scale 1/sqrt(head_dim):
    ``(B, S, width) -> (B, S, width)``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        d = cfg.hidden_size
        kw = dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)
        self.heads = cfg.num_attention_heads

    def __call__(self, x, bias=None):
        b, s, d = x.shape
        split = lambda t: t.reshape(b, s, self.heads, d // self.heads)
        o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), bias=bias)
        return self.out_proj(o.reshape(b, s, d))


class MLP(nnx.Module):
    """fc1 -> activation (quick-GELU for OpenAI CLIP) -> fc2: ``(B, S, width) -> (B, S, width)``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        kw = dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: ``x + attn(LN1(x))``, then ``+ mlp(LN2(.))``; shape-preserving.
    ``bias``: an additive attention-logit bias (the text tower's causal mask, ``mm_jax.models.clip``)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        kw = dict(eps=cfg.layer_norm_eps, dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **kw)
        self.self_attn = SelfAttention(cfg, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **kw)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, bias=None):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("batch", "seq", "act_embed"))


class Encoder(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        self.layers = nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_hidden_layers)])


class CLIPVisionTower(nnx.Module):
    """``pixels (B, H, W, 3)`` (CLIP-normalized) -> penultimate hidden states ``(B, 1+P, width)``.

    transformers' ``hidden_states`` has L+1 entries: the embeddings after ``pre_layrnorm``, then the
    output of each of the L layers (no ``post_layernorm``). Magic Mirror takes ``hidden_states[-2]``,
    the output of layer L-1, so the last layer is not run. ``all_hidden=True`` returns all L+1."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        kw = dict(eps=cfg.layer_norm_eps, dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, **kw)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.post_layernorm = LayerNorm(cfg.hidden_size, **kw)  # unused by Magic Mirror; kept for the checkpoint

    def __call__(self, pixels: jax.Array, all_hidden: bool = False):
        h = constrain(self.pre_layrnorm(self.embeddings(pixels)), ("batch", "seq", "act_embed"))
        states = [h]
        layers = self.encoder.layers if all_hidden else list(self.encoder.layers)[:-1]
        for layer in layers:
            h = layer(h)
            states.append(h)
        return tuple(states) if all_hidden else h
