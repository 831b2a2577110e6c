"""The whole CLIP model (transformers ``CLIPModel``) in Flax NNX: both towers and their projections.

Used by evaluation for text alignment, cos(image embedding, text embedding). The image tower is
``mm_jax.models.clip_vision``'s; this file adds what CLIP scores with:

* text: token + learned position embeddings -> N pre-LN layers with a **causal** mask ->
  final LayerNorm -> the hidden state at the end-of-text token -> ``text_projection``;
* image: the last layer's class token -> ``post_layernorm`` -> ``visual_projection``.

``text_embeds(ids) -> (B, projection_dim)``, ``image_embeds(pixels) -> (B, projection_dim)``,
neither normalized (as transformers' ``get_text_features`` / ``get_image_features``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models import layers as L
from mm_jax.models.clip_vision import ACTIVATIONS, CLIPVisionConfig, CLIPVisionTower, Encoder, run_layers
from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import canonical_dtype

# transformers keeps this id for configs written before its eos fix: the pooled token is then the
# argmax of the ids (the end-of-text token has the largest id of CLIP's vocabulary)
LEGACY_EOS_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(ConfigBase):
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"
    eos_token_id: int = LEGACY_EOS_ID
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True

    RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers")

    @classmethod
    def source_fields(cls, d: dict) -> dict:
        return d.get("text_config", d)

    def validate(self) -> None:
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text hidden_act={self.hidden_act!r}: supported {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} is not a multiple of {self.num_attention_heads} heads")


@dataclasses.dataclass(frozen=True)
class CLIPConfig(ConfigBase):
    """A ``CLIPModel`` config: the two towers' configs (nested, as in its config.json) and the
    width of the shared embedding space."""
    text: CLIPTextConfig = CLIPTextConfig()
    vision: CLIPVisionConfig = CLIPVisionConfig()
    projection_dim: int = 768
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True       # both towers' layers under lax.scan, or unrolled

    RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers")
    TAG = {"architectures": ["CLIPModel"]}

    @classmethod
    def from_dict(cls, d: dict, **overrides):
        if "text_config" not in d or "vision_config" not in d:
            raise ValueError("a CLIPModel config needs text_config and vision_config (this looks like one tower's "
                             "config; the text-alignment metric needs the whole CLIP model)")
        runtime = {k: overrides[k] for k in cls.RUNTIME_FIELDS if k in overrides}
        cfg = cls(text=CLIPTextConfig.from_dict(d, **runtime), vision=CLIPVisionConfig.from_dict(d, **runtime),
                  projection_dim=int(d.get("projection_dim", 512)), **overrides)
        cfg.validate()
        return cfg

    def to_dict(self, runtime: bool = False) -> dict:
        return {"text_config": self.text.to_dict(runtime), "vision_config": self.vision.to_dict(runtime),
                "projection_dim": self.projection_dim,
                **({k: getattr(self, k) for k in self.RUNTIME_FIELDS} if runtime else {}), **self.TAG}


class TextEmbeddings(nnx.Module):
    """``ids (B, S) -> (B, S, width)``: token embedding + the first S learned positions."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs):
        kw = dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.token_embedding = L.embed(cfg.vocab_size, cfg.hidden_size, axes=("vocab", "embed"), **kw)
        self.position_embedding = L.embed(cfg.max_position_embeddings, cfg.hidden_size, axes=(None, "embed"), **kw)
        self.max_len = cfg.max_position_embeddings

    def __call__(self, ids):
        if ids.shape[1] > self.max_len:
            raise ValueError(f"{ids.shape[1]} text tokens: CLIP's text tower has {self.max_len} positions")
        return self.token_embedding(ids) + self.position_embedding(jnp.arange(ids.shape[1]))


class CLIPTextTower(nnx.Module):
    """``ids (B, S) -> (B, S, width)`` final-LayerNormed hidden states (causal self-attention).
    The layers are one stack (``encoder/layers``) run under ``lax.scan``."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs):
        self.embeddings = TextEmbeddings(cfg, rngs=rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.final_layer_norm = L.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=canonical_dtype(cfg.dtype),
                                             param_dtype=canonical_dtype(cfg.param_dtype), rngs=rngs)
        self.scan_layers = cfg.scan_layers

    def __call__(self, ids):
        h = self.embeddings(ids)
        s = ids.shape[1]
        causal = jnp.where(jnp.tril(jnp.ones((s, s), bool)), 0.0, -1e9)[None, None]  # (1, 1, S, S)
        return self.final_layer_norm(run_layers(self.encoder.layers, h, bias=causal, scan=self.scan_layers))


class CLIPModel(nnx.Module):
    """Both towers and the projections into the shared embedding space."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        pdt, dt = canonical_dtype(cfg.param_dtype), canonical_dtype(cfg.dtype)
        self.text_model = CLIPTextTower(cfg.text, rngs=rngs)
        self.vision_model = CLIPVisionTower(cfg.vision, rngs=rngs)
        self.text_projection = L.linear(cfg.text.hidden_size, cfg.projection_dim, axes=("embed", None),
                                        use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.visual_projection = L.linear(cfg.vision.hidden_size, cfg.projection_dim, axes=("embed", None),
                                          use_bias=False, dtype=dt, param_dtype=pdt, rngs=rngs)
        self.logit_scale = nnx.Param(jnp.asarray(np.log(1 / 0.07), pdt))  # in the checkpoint; unused by scoring

    def text_embeds(self, ids: jax.Array) -> jax.Array:
        """``ids (B, S)`` (with an end-of-text token per row) -> ``(B, projection_dim)``."""
        h = self.text_model(ids)
        eos = self.cfg.text.eos_token_id
        pos = jnp.argmax(ids, axis=-1) if eos == LEGACY_EOS_ID else jnp.argmax(ids == eos, axis=-1)
        return self.text_projection(h[jnp.arange(ids.shape[0]), pos])

    def image_embeds(self, pixels: jax.Array) -> jax.Array:
        """``pixels (B, H, W, 3)`` (CLIP-normalized) -> ``(B, projection_dim)``."""
        last = self.vision_model.hidden_state(pixels, self.cfg.vision.num_hidden_layers)
        return self.visual_projection(self.vision_model.post_layernorm(last[:, 0]))
