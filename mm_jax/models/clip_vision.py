"""The CLIP ViT image tower (transformers ``CLIPVisionModel``) in Flax NNX.

Patches (conv, no bias) + class token + learned positions -> pre-LayerNorm -> N pre-LN encoder
layers (quick-GELU MLP) -> hidden states. Magic Mirror uses the **penultimate** layer's hidden
states, all tokens: ``pixels (B, H, W, 3)`` (CLIP-normalized) -> ``(B, 1 + (H/p)(W/p), width)``.

Layers are Flax's (``nnx.Conv``, ``nnx.Linear``, ``nnx.LayerNorm``, ``nnx.Embed`` through
``mm_jax.models.layers``); the encoder layers are one stack (``encoder/layers``, a leading
``layers`` axis) run under ``lax.scan``. ``EncoderLayer`` and ``run_layers`` also serve the text
tower (``mm_jax.models.clip``).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mm_jax.models import layers as L
from mm_jax.models.config_base import ConfigBase
from mm_jax.models.layers import attention, canonical_dtype
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
    scan_layers: bool = True       # encoder layers under lax.scan (one compiled body) or unrolled

    RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers")
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


def _kw(cfg) -> dict:
    """The compute and parameter dtypes of a tower's config (vision or text)."""
    return dict(dtype=canonical_dtype(cfg.dtype), param_dtype=canonical_dtype(cfg.param_dtype))


def _dense(cfg, din: int, dout: int, axes, rngs: nnx.Rngs, use_bias: bool = True) -> nnx.Linear:
    return L.linear(din, dout, axes=axes, use_bias=use_bias, rngs=rngs, **_kw(cfg))


def _norm(cfg, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return L.layer_norm(cfg.hidden_size, eps=cfg.layer_norm_eps, rngs=rngs, **_kw(cfg))


class Embeddings(nnx.Module):
    """Patch embedding (a stride-p conv without bias), class token and learned positions:
    ``pixels (B, H, W, C) -> (B, 1 + (H/p)(W/p), width)``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
        pdt = canonical_dtype(cfg.param_dtype)
        self.class_embedding = nnx.Param(L.partitioned(nnx.initializers.normal(1.0), "embed")(rngs.params(), (d,), pdt))
        init = nnx.initializers.normal((p * p * c) ** -0.5)
        self.patch_embedding = nnx.Conv(c, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                        kernel_init=L.partitioned(init, "patch", "patch", "channels", "embed"),
                                        rngs=rngs, **_kw(cfg))
        self.position_embedding = L.embed(cfg.num_positions, d, axes=(None, "embed"), rngs=rngs, **_kw(cfg))
        self.image_size, self.channels, self.dtype = cfg.image_size, c, canonical_dtype(cfg.dtype)

    def __call__(self, pixels):
        b, h, w, c = pixels.shape
        if (h, w, c) != (self.image_size, self.image_size, self.channels):
            # the learned positions fix the grid; transformers would fail (or interpolate on request)
            raise ValueError(f"pixels of shape {pixels.shape}: the CLIP tower takes (B, {self.image_size}, "
                             f"{self.image_size}, {self.channels})")
        x = self.patch_embedding(pixels)
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding(jnp.arange(x.shape[1]))


class SelfAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scale 1/sqrt(head_dim):
    ``(B, S, width) -> (B, S, width)``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        d = cfg.hidden_size
        self.q_proj = _dense(cfg, d, d, ("embed", "heads"), rngs)
        self.k_proj = _dense(cfg, d, d, ("embed", "heads"), rngs)
        self.v_proj = _dense(cfg, d, d, ("embed", "heads"), rngs)
        self.out_proj = _dense(cfg, d, d, ("heads", "embed"), rngs)
        self.heads = cfg.num_attention_heads

    def __call__(self, x, bias=None):
        b, s, d = x.shape
        split = lambda t: t.reshape(b, s, self.heads, d // self.heads)
        o = attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), bias=bias)
        return self.out_proj(o.reshape(b, s, d))


class MLP(nnx.Module):
    """fc1 -> activation (quick-GELU for OpenAI CLIP) -> fc2: ``(B, S, width) -> (B, S, width)``."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        self.fc1 = _dense(cfg, cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), rngs)
        self.fc2 = _dense(cfg, cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x):
        return self.fc2(constrain(self.act(self.fc1(x)), ("batch", "seq", "act_mlp")))


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: ``x + attn(LN1(x))``, then ``+ mlp(LN2(.))``; shape-preserving.
    ``bias``: an additive attention-logit bias (the text tower's causal mask, ``mm_jax.models.clip``)."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs):
        self.layer_norm1 = _norm(cfg, rngs)
        self.self_attn = SelfAttention(cfg, rngs=rngs)
        self.layer_norm2 = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, bias=None):
        x = x + self.self_attn(self.layer_norm1(x), bias)
        x = x + self.mlp(self.layer_norm2(x))
        return constrain(x, ("batch", "seq", "act_embed"))


class Encoder(nnx.Module):
    """``layers``: the encoder layers as one stack (``encoder.layers.i.*`` in the checkpoint)."""

    def __init__(self, cfg, *, rngs):
        self.layers = L.stack(cfg.num_hidden_layers, lambda r: EncoderLayer(cfg, rngs=r), rngs)


def run_layers(layers: EncoderLayer, h: jax.Array, *, num_layers: int | None = None, bias=None,
               all_hidden: bool = False, scan: bool = True):
    """The first ``num_layers`` (default: all) layers of a stack over ``h`` (B, S, width) -> the
    last output, or with ``all_hidden`` every layer's output (num_layers, B, S, width), as the
    scan's per-layer outputs.

    The scan runs over layer indices into the whole stack rather than over a slice of it
    (``layers.layers_range``): XLA materializes the slice, which for CLIP-L's first 23 layers in
    float32 took the compiled forward's temporaries from 51 MiB to 1.16 GiB."""
    n = L.stack_size(layers) if num_layers is None else num_layers

    def layer(h, i):
        y = L.layer(layers, i)(h, bias)
        return y, (y if all_hidden else None)

    if scan:
        h, ys = jax.lax.scan(layer, h, jnp.arange(n))
    else:
        outs = []
        for i in range(n):
            h, y = layer(h, i)
            outs.append(y)
        ys = jnp.stack(outs) if all_hidden else None
    return ys if all_hidden else h


class CLIPVisionTower(nnx.Module):
    """``pixels (B, H, W, 3)`` (CLIP-normalized) -> penultimate hidden states ``(B, 1+P, width)``.

    transformers' ``hidden_states`` has L+1 entries: the embeddings after ``pre_layrnorm``, then the
    output of each of the L layers (no ``post_layernorm``). Magic Mirror takes ``hidden_states[-2]``,
    the output of layer L-1, so the last layer is not run (the scan covers layers 0..L-2).
    ``all_hidden=True`` runs all L and returns the L+1 states as a tuple."""

    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs):
        cfg.validate()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg, rngs=rngs)
        self.pre_layrnorm = _norm(cfg, rngs)
        self.encoder = Encoder(cfg, rngs=rngs)
        self.post_layernorm = _norm(cfg, rngs)  # unused by Magic Mirror; kept for the checkpoint

    def __call__(self, pixels: jax.Array, all_hidden: bool = False):
        if all_hidden:
            h = self._embed(pixels)
            return (h,) + tuple(run_layers(self.encoder.layers, h, all_hidden=True, scan=self.cfg.scan_layers))
        return self.hidden_state(pixels, self.cfg.num_hidden_layers - 1)

    def hidden_state(self, pixels: jax.Array, num_layers: int) -> jax.Array:
        """transformers' ``hidden_states[num_layers]``: the output of the first ``num_layers`` layers
        (only those run), ``(B, 1+P, width)``."""
        return run_layers(self.encoder.layers, self._embed(pixels), num_layers=num_layers, scan=self.cfg.scan_layers)

    def _embed(self, pixels):
        return constrain(self.pre_layrnorm(self.embeddings(pixels)), ("batch", "seq", "act_embed"))
