"""Stage 2, video fine-tuning (magic_mirror_reference.md 5): 49 frames at 480x720, global batch 8,
5k steps, initialized from stage 1 (``--config.init_from=<stage-1 workdir>``), only the adapter trains.

Presets: ``configs/video.py`` (the reference run), ``:tiny`` (a few steps on CPU) and ``:demo``
(the README's first command: synthetic data, a tiny model, a few hundred steps in minutes on 2 CPU
cores, then a sample video).
"""
from configs.common import common, tiny


def get_config(preset=None):
    cfg = common("video")
    cfg.train.checkpoint_every = 500
    cfg.sample.every = 1000
    if preset in (None, "", "reference"):
        return cfg
    if preset == "tiny":
        return tiny(cfg, frames=9, steps=30, batch=2)
    if preset == "demo":
        cfg = tiny(cfg, frames=9, steps=300, batch=4)
        cfg.data.synthetic.num_clips = 32
        cfg.data.num_workers = 1  # decode in a worker process: data wait 16% of step time -> 0.3%
        cfg.train.trainable = ("adapter", "dit")  # the tiny backbone is random: let it learn the data too
        cfg.optimizer.lr = 1e-3
        cfg.optimizer.warmup_steps = 20
        cfg.train.checkpoint_every = 100
        cfg.sample.enabled = True
        return cfg
    raise ValueError(f"unknown preset {preset!r} for configs/video.py; choose from: reference, tiny, demo")
