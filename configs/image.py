"""Stage 1, image pre-training (magic_mirror_reference.md 5): one target frame at 480x720,
global batch 64, 30k steps, AdamW 1e-4 with 500 warmup steps, only the adapter trains.

Presets: ``configs/image.py`` (the reference run; set model.checkpoint, model.adapter, data.path),
``:tiny`` (a few steps on CPU, everything generated in the workdir).
"""
from configs.common import common, tiny


def get_config(preset=None):
    cfg = common("image")
    cfg.train.checkpoint_every = 1000
    cfg.sample.every = 5000
    if preset in (None, "", "reference"):
        return cfg
    if preset == "tiny":
        return tiny(cfg, frames=1, steps=30, batch=4)
    raise ValueError(f"unknown preset {preset!r} for configs/image.py; choose from: reference, tiny")
