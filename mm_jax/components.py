"""The registry of checkpoint components: what each one's config and network are.

A component is one network of a pipeline folder (``transformer``, ``vae``, ``text_encoder``,
``image_encoder``, ``adapter``, ``clip``, ``eva_clip``, ``consisid_transformer``). The converter and the checkpoint loader both look components up
here, so adding a network means adding one ``ComponentSpec``. The classes are referenced directly
(no "module:Class" strings), so a renamed class fails at import, not at first use; the models
import nothing from here, so there is no cycle.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from mm_jax.models.clip import CLIPConfig, CLIPModel
from mm_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from mm_jax.models.consisid import ConsisIDConfig, ConsisIDTransformer3D
from mm_jax.models.dit import CogVideoXTransformer3D
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.eva_clip import EVAVisionConfig, EVAVisionTower
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter
from mm_jax.models.t5 import T5Config, T5Encoder
from mm_jax.models.vae import AutoencoderKLCogVideoX, VAEConfig


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    config_cls: type          # a ConfigBase: from_dict / to_dict / dtype fields
    model_cls: type           # an nnx.Module taking (cfg, rngs=...)
    source_classes: tuple[str, ...] = ()   # diffusers _class_name / transformers architectures
    # stacks of identical layers, by their path in our parameter tree ("a/b"): one parameter with
    # a leading "layers" axis there holds what the torch state dict keeps as "a.b.0. ...", "a.b.1. ..."
    stacks: tuple[str, ...] = ()

    def config_from_dict(self, d: dict, **overrides) -> Any:
        return self.config_cls.from_dict(d, **overrides)

    def build(self, cfg: Any, rngs) -> Any:
        return self.model_cls(cfg, rngs=rngs)


COMPONENTS: dict[str, ComponentSpec] = {
    "transformer": ComponentSpec("transformer", DiTConfig, CogVideoXTransformer3D, ("CogVideoXTransformer3DModel",),
                                 stacks=("transformer_blocks",)),
    # ConsisID's transformer (a pipeline folder's transformer/ of this class converts to it)
    "consisid_transformer": ComponentSpec("consisid_transformer", ConsisIDConfig, ConsisIDTransformer3D,
                                          ("ConsisIDTransformer3DModel",),
                                          stacks=("transformer_blocks", "local_facial_extractor/layers",
                                                  "perceiver_cross_attention")),
    "vae": ComponentSpec("vae", VAEConfig, AutoencoderKLCogVideoX, ("AutoencoderKLCogVideoX",)),
    "text_encoder": ComponentSpec("text_encoder", T5Config, T5Encoder, ("T5EncoderModel",),
                                  stacks=("encoder/block",)),
    "image_encoder": ComponentSpec("image_encoder", CLIPVisionConfig, CLIPVisionTower,
                                   ("CLIPVisionModel", "CLIPModel", "CLIPVisionModelWithProjection"),
                                   stacks=("encoder/layers",)),
    "adapter": ComponentSpec("adapter", AdapterConfig, MagicMirrorAdapter, ("MagicMirrorAdapter",),
                             stacks=("face_perceiver/layers", "id_perceiver/layers", "can")),
    # the whole CLIP model (both towers + projections) for evaluation's text alignment; a CLIPModel
    # folder converts to image_encoder unless this one is asked for (--components clip)
    "clip": ComponentSpec("clip", CLIPConfig, CLIPModel,
                          stacks=("text_model/encoder/layers", "vision_model/encoder/layers")),
    # ConsisID's face-feature tower (EVA02-CLIP-L-14-336, face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt)
    "eva_clip": ComponentSpec("eva_clip", EVAVisionConfig, EVAVisionTower, ("EVAVisionTransformer",),
                              stacks=("blocks",)),
}

# components of a pipeline folder that are copied verbatim (no weights to convert)
COPIED_COMPONENTS = ("tokenizer", "scheduler")


def get(name: str) -> ComponentSpec:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(sorted(COMPONENTS))}")
    return COMPONENTS[name]


def stack_of(name: str, key: str) -> str | None:
    """The stack (a path of ``COMPONENTS[name].stacks``) that flat key ``key`` lies in, or None."""
    for prefix in get(name).stacks:
        if key.startswith(prefix + "/"):
            return prefix
    return None


def from_source_class(class_name: str) -> ComponentSpec | None:
    for spec in COMPONENTS.values():
        if class_name in spec.source_classes:
            return spec
    return None
