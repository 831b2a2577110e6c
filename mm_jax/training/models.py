"""What training holds: the frozen backbone (DiT, VAE, T5, CLIP tower) and the trainable adapter.

The adapter's parameters are the only trainable ones (magic_mirror_reference.md 5): they are kept
in float32 (the master copy) and cast to the compute dtype inside each layer; the frozen networks
are stored in the compute dtype and never get optimizer state.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from mm_jax import checkpoint
from mm_jax import schedulers as sch
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter

FROZEN = ("dit", "vae", "text_encoder", "image_encoder")


@dataclasses.dataclass
class TrainModels:
    dit: Any
    vae: Any
    text_encoder: Any
    image_encoder: Any
    adapter: MagicMirrorAdapter
    tokenizer: Any
    scheduler: sch.SchedulerConfig
    backbone_dir: Path
    adapter_dir: Path
    temporal_ratio: int = 4  # the VAE's temporal compression (face masks are pooled by it)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return sch.alphas_cumprod(self.scheduler)

    def frozen_modules(self) -> dict[str, Any]:
        """The frozen networks present (VAE / T5 / CLIP may be None when the data is precomputed)."""
        return {name: getattr(self, name) for name in FROZEN if getattr(self, name) is not None}


def _scheduler_config(backbone: Path) -> sch.SchedulerConfig:
    path = backbone / "scheduler" / "scheduler_config.json"
    if not path.exists():
        raise FileNotFoundError(f"{backbone}: no scheduler/scheduler_config.json (a converted CogVideoX checkpoint "
                                f"folder is expected)")
    return sch.SchedulerConfig.from_dict(json.loads(path.read_text()))


def adapter_config(dit_cfg, clip_width: int, overrides: dict, dtype: str) -> AdapterConfig:
    """The config of a fresh adapter for a DiT config: the design's defaults + ``overrides`` (the
    ``adapter`` section of a training config; None keeps the design's value), compute in ``dtype``,
    float32 master parameters."""
    over = {k: v for k, v in dict(overrides).items() if v is not None}  # None: the design's value
    every = int(over.pop("adapter_every", 2))
    if every < 1:
        raise ValueError(f"adapter.adapter_every={every}: must be >= 1")
    over.setdefault("adapter_layers", tuple(range(0, dit_cfg.num_layers, every)))
    over.update(dtype=dtype, param_dtype="float32")
    return AdapterConfig.for_dit(dit_cfg, clip_width=clip_width, **over)


def new_adapter(dit, clip_width: int, overrides: dict, dtype: str, mesh) -> MagicMirrorAdapter:
    """A fresh adapter for ``dit`` (``adapter_config``), CAN copied from the DiT's text expert,
    created under ``mesh`` so its parameters are sharded as declared."""
    cfg = adapter_config(dit.cfg, clip_width, overrides, dtype)
    with jax.set_mesh(mesh):
        adapter = MagicMirrorAdapter(cfg, rngs=nnx.Rngs(0))
        adapter.init_from_dit(dit)
    return adapter


def check_model_folders(model_cfg) -> None:
    """The backbone and adapter folders are mm_jax checkpoints holding the components training
    reads (checked before any work: a FileNotFoundError names the field and what is missing)."""
    backbone, adapter_dir = Path(model_cfg.checkpoint), Path(model_cfg.adapter)
    for what, d, needed in (("model.checkpoint", backbone, ("transformer", "vae", "text_encoder")),
                            ("model.adapter", adapter_dir, ("image_encoder",))):
        if not (d / checkpoint.INDEX_FILE).exists():
            raise FileNotFoundError(f"{what}={d}: not an mm_jax checkpoint folder (no {checkpoint.INDEX_FILE}); convert "
                                    f"weights with tools/convert_weights/from_torch.py")
        missing = [c for c in needed if not (d / c / "config.json").exists()]
        if missing:
            raise FileNotFoundError(f"{what}={d}: lacks component(s) {missing}; it has {checkpoint.read_index(d)}")
    if not (backbone / "tokenizer").is_dir():
        raise FileNotFoundError(f"model.checkpoint={backbone}: no tokenizer/ folder (convert with --components all)")


def load_models(model_cfg, adapter_overrides: dict, mesh, precomputed: bool = False) -> TrainModels:
    """``model_cfg``: checkpoint (backbone folder), adapter (folder with ``image_encoder`` and,
    to continue from, ``adapter``), dtype, remat_policy, attention_impl. ``precomputed``: the data
    holds VAE latents and T5 embeddings (``data.precomputed``), so the VAE and T5 are not loaded
    (they would sit unused in device memory, T5-XXL alone 9.5 GB in bf16)."""
    from mm_jax import text as text_lib

    check_model_folders(model_cfg)
    backbone, adapter_dir = Path(model_cfg.checkpoint), Path(model_cfg.adapter)
    dt = model_cfg.dtype
    runtime = {} if not model_cfg.get("attention_impl") else {"attention_impl": model_cfg.attention_impl}
    dit = checkpoint.load_component(backbone, "transformer", mesh=mesh, dtype=dt, param_dtype=dt,
                                    remat_policy=model_cfg.remat_policy, **runtime)
    vae = t5 = None
    if not precomputed:
        vae = checkpoint.load_component(backbone, "vae", mesh=mesh)  # fp32: encoding is a small share of the step
        t5 = checkpoint.load_component(backbone, "text_encoder", mesh=mesh, dtype=dt, param_dtype=dt)
    clip = checkpoint.load_component(adapter_dir, "image_encoder", mesh=mesh, dtype=dt, param_dtype=dt)
    if (adapter_dir / "adapter" / "config.json").exists():
        adapter = checkpoint.load_component(adapter_dir, "adapter", mesh=mesh, dtype=dt, param_dtype="float32",
                                            **runtime)
    else:
        adapter = new_adapter(dit, clip.cfg.hidden_size, dict(adapter_overrides, **runtime), dt, mesh)
    tok = text_lib.load_tokenizer(backbone / "tokenizer")
    temporal = checkpoint.load_config(backbone, "vae").temporal_compression_ratio
    return TrainModels(dit, vae, t5, clip, adapter, tok, _scheduler_config(backbone), backbone, adapter_dir, temporal)


def count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
