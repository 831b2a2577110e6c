"""What a video is made of: the sampler's settings, the one check of their sizes, the latent shape.

``SampleSettings`` (prompt, sizes, steps, guidance, scheduler, seed) is what ``mm_jax.pipeline``
generates; the planner's settings extend it with how the sampler runs (``mm_jax.plan.phases``).
``check_video`` is the one validation of frames, height, width and steps: the pipeline, the
planner and the trainer's config check all call it.
"""
from __future__ import annotations

import dataclasses

SCHEDULERS = ("ddim", "dpm")


def check_video(frames: int | None, height: int, width: int, steps: int = 1, *, spatial: int = 8, temporal: int = 4,
                patch: int = 2, decode_frame_batch: int | None = None) -> None:
    """Refuse sizes the models cannot honour exactly, with a ValueError naming the field: ``frames``
    a count the VAE decodes back exactly (``mm_jax.frame_counts``: 1, 9, 17, ..., 49, ... for
    CogVideoX), ``height``/``width`` positive multiples of the VAE's ``spatial`` compression times
    the DiT's ``patch``, ``steps`` >= 1. ``frames`` None: checked by the caller (a training stage's
    count, ``frame_counts.check_frames``)."""
    from mm_jax import frame_counts

    if frames is not None:
        frame_counts.check(frames, "frames", ratio=temporal, decode_batch=decode_frame_batch)
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % (spatial * patch):
            raise ValueError(f"{name}={v}: must be a positive multiple of {spatial * patch}")
    if steps < 1:
        raise ValueError(f"steps={steps}: must be >= 1")


def check_scheduler(name: str) -> None:
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler={name!r}: choose from {', '.join(SCHEDULERS)}")


def latent_shape(frames: int, height: int, width: int, channels: int, spatial: int = 8,
                 temporal: int = 4) -> tuple[int, ...]:
    """(1, F, H, W, C) latents of one video of ``frames`` x ``height`` x ``width`` pixels."""
    return (1, (frames - 1) // temporal + 1, height // spatial, width // spatial, channels)


@dataclasses.dataclass(frozen=True)
class SampleSettings:
    """What to generate. Sizes are in pixels/frames; defaults are CogVideoX-5B's."""
    prompt: str
    negative_prompt: str = ""
    frames: int = 49
    height: int = 480
    width: int = 720
    steps: int = 50
    guidance: float = 6.0
    scheduler: str = "ddim"
    dynamic_cfg: bool = False
    seed: int = 0
    max_sequence_length: int = 226

    def check_sizes(self, spatial: int = 8, temporal: int = 4, patch: int = 2,
                    decode_frame_batch: int | None = None) -> None:
        """``check_video`` of these sizes and steps, and the scheduler's name (no prompt needed)."""
        check_video(self.frames, self.height, self.width, self.steps, spatial=spatial, temporal=temporal, patch=patch,
                    decode_frame_batch=decode_frame_batch)
        check_scheduler(self.scheduler)

    def validate(self, spatial: int = 8, temporal: int = 4, patch: int = 2, decode_frame_batch: int | None = None) -> None:
        """Refuse settings the models cannot honour exactly (``check_sizes``) and an empty prompt."""
        self.check_sizes(spatial, temporal, patch, decode_frame_batch)
        if not self.prompt:
            raise ValueError("prompt is empty")

    def latent_shape(self, channels: int, spatial: int = 8, temporal: int = 4) -> tuple[int, ...]:
        """(1, F, H, W, C) of the initial noise."""
        return latent_shape(self.frames, self.height, self.width, channels, spatial, temporal)
