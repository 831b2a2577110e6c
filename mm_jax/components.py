"""The registry of checkpoint components: what each one's config and network are.

A component is one network of a pipeline folder (``transformer``, ``vae``, ``text_encoder``,
``image_encoder``, ``adapter``, ``clip``). The converter and the checkpoint loader both look components up
here, so adding a network means adding one ``ComponentSpec``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class ComponentSpec:
    name: str
    config_path: str          # "module:Class" with from_dict / to_dict / dtype fields
    model_path: str           # "module:Class" taking (cfg, rngs=...)
    source_classes: tuple[str, ...] = ()   # diffusers _class_name / transformers architectures

    def _load(self, path: str) -> Any:
        mod, attr = path.split(":")
        return getattr(importlib.import_module(mod), attr)

    @property
    def config_cls(self) -> Any:
        return self._load(self.config_path)

    @property
    def model_cls(self) -> Callable:
        return self._load(self.model_path)

    def config_from_dict(self, d: dict, **overrides) -> Any:
        return self.config_cls.from_dict(d, **overrides)

    def build(self, cfg: Any, rngs) -> Any:
        return self.model_cls(cfg, rngs=rngs)


COMPONENTS: dict[str, ComponentSpec] = {
    "transformer": ComponentSpec(
        "transformer", "mm_jax.models.dit:DiTConfig", "mm_jax.models.dit:CogVideoXTransformer3D",
        ("CogVideoXTransformer3DModel",)),
    "vae": ComponentSpec(
        "vae", "mm_jax.models.vae:VAEConfig", "mm_jax.models.vae:AutoencoderKLCogVideoX", ("AutoencoderKLCogVideoX",)),
    "text_encoder": ComponentSpec(
        "text_encoder", "mm_jax.models.t5:T5Config", "mm_jax.models.t5:T5Encoder", ("T5EncoderModel",)),
    "image_encoder": ComponentSpec(
        "image_encoder", "mm_jax.models.clip_vision:CLIPVisionConfig", "mm_jax.models.clip_vision:CLIPVisionTower",
        ("CLIPVisionModel", "CLIPModel", "CLIPVisionModelWithProjection")),
    "adapter": ComponentSpec(
        "adapter", "mm_jax.models.id_adapter:AdapterConfig", "mm_jax.models.id_adapter:MagicMirrorAdapter",
        ("MagicMirrorAdapter",)),
    # the whole CLIP model (both towers + projections) for evaluation's text alignment; a CLIPModel
    # folder converts to image_encoder unless this one is asked for (--components clip)
    "clip": ComponentSpec("clip", "mm_jax.models.clip:CLIPConfig", "mm_jax.models.clip:CLIPModel"),
}

# components of a pipeline folder that are copied verbatim (no weights to convert)
COPIED_COMPONENTS = ("tokenizer", "scheduler")


def get(name: str) -> ComponentSpec:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(sorted(COMPONENTS))}")
    return COMPONENTS[name]


def from_source_class(class_name: str) -> ComponentSpec | None:
    for spec in COMPONENTS.values():
        if class_name in spec.source_classes:
            return spec
    return None
