"""The image-to-video sampler's phases (CogVideoX-5B-I2V, ``mm_jax.image_to_video``), beside
``phases.sample_phases``:

    text_encoder  as text-to-video                                                  once per video
    vae_encode    ``image_conditioning.encode_fn()(vae, pixels, noise, F)``          once per video
    denoise       ``denoising.denoise_step_fn(kind, cfg, image_conditioning.model_fn)``  ``steps`` per video
                  (the DiT on noise latents ++ image latents, 2 x the VAE's latent channels)
    vae_decode    ``pipeline.decode_fn()(vae, latents)``                           once per video

A model is image-to-video when its transformer takes twice the VAE's latent channels
(``image_conditioning.kind``): ``phases_for`` routes it here, from the presets (``--model i2v``)
or from a converted I2V checkpoint's configs. ``I2VParts`` is what ConsisID's phases
(``plan/consisid.py``, the same backbone plus face tokens) share with these.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax.models.layers import default_attention_impl
from mm_jax.plan.phases import Models, Phase, SampleSettings, _replace, _sds, _shape_on


def real_models() -> Models:
    """The real CogVideoX-5B-I2V: the 5B's VAE, T5 and scheduler with the I2V transformer preset."""
    from mm_jax import components, presets

    dit = components.get("transformer").config_from_dict(presets.load("cogvideox5b_i2v_transformer"))
    return dataclasses.replace(Models.real(), transformer=dit, source="mm_jax.presets (CogVideoX-5B-I2V, T5-XXL)")


def is_i2v(models: Models) -> bool:
    from mm_jax import image_conditioning

    return image_conditioning.kind(models.transformer, models.vae) == "i2v"


@dataclasses.dataclass(frozen=True)
class I2VParts:
    """The checked settings and the phases an image-conditioned sampler shares (I2V, ConsisID):
    the text encoder, the VAE encode of the first frame, the decode, and the denoising step's
    arguments around its DiT and ``extras``."""
    s: SampleSettings
    component: str           # the DiT's component name ("transformer", "consisid_transformer")
    dit_cfg: Any
    t5_cfg: Any
    latent_shape: tuple
    schedule: Any
    guidance: Any
    impl: str | None
    cfg_on: bool
    text_phase: Phase
    vae_encode: Phase
    vae_decode: Phase

    @property
    def n_text(self) -> int:
        return 2 if self.cfg_on else 1

    def dit(self, mesh):
        """The DiT as the sampler holds it: restored onto ``mesh``, its linear layers quantized."""
        from mm_jax import checkpoint
        from mm_jax.models import quantize

        return quantize.quantize_model(checkpoint.abstract_model(self.component, self.dit_cfg, mesh), self.s.quantize)

    def dit_gb(self) -> float:
        from mm_jax.models import quantize

        return quantize.weight_bytes(self.dit(None)) / 1e9

    def step_args(self, mesh, extras) -> tuple:
        """``denoising.denoise_step_fn``'s arguments: (dit, x, x0, text, schedule, guidance, key, i, extras)."""
        from mm_jax import checkpoint, text
        from mm_jax.plan.aot import replicated

        dt, shape = jnp.dtype(self.s.dtype), self.latent_shape
        ids = replicated(mesh, (self.n_text, self.s.max_sequence_length), jnp.int32)
        emb = _shape_on(mesh, text.encode_ids, checkpoint.abstract_model("text_encoder", self.t5_cfg, mesh), ids)
        key = jax.eval_shape(lambda: jax.random.key(0))
        return (self.dit(mesh), replicated(mesh, shape, dt), replicated(mesh, shape, jnp.float32),
                replicated(mesh, emb.shape, dt), jax.tree.map(lambda a: _sds(mesh, a), self.schedule),
                _sds(mesh, self.guidance), replicated(mesh, key.shape, key.dtype), replicated(mesh, (), jnp.int32),
                extras)

    def image_latents(self, mesh):
        """The image latents the step takes (its ``extras`` in I2V)."""
        from mm_jax.plan.aot import replicated

        return replicated(mesh, self.latent_shape, jnp.dtype(self.s.dtype))

    def denoise_what(self, name: str) -> str:
        qn = f", linear layers {self.s.quantize}" if self.s.quantize else ""
        return (f"{name} ({self.dit_cfg.in_channels} input channels, learned positions "
                f"{self.dit_cfg.use_learned_positional_embeddings}), CFG batch {self.n_text}, {self.s.scheduler}, "
                f"{self.s.dtype}{qn}, attention {self.impl or 'default'}; DiT weights {self.dit_gb():.2f} GB")


def parts(models: Models, s: SampleSettings, platform: str, kind: str | None = None,
          component: str = "transformer", what: str = "image-to-video") -> I2VParts:
    """``I2VParts`` for ``models`` (checked: the text encoder's sizes, no Magic Mirror identity, a
    size the learned positional table covers)."""
    from mm_jax import checkpoint, denoising, image_conditioning, pipeline
    from mm_jax import schedulers as sch
    from mm_jax.models import learned_positions
    from mm_jax.plan import phases
    from mm_jax.plan.aot import replicated

    if s.identity:
        raise ValueError(f"{what} takes no identity adapter (Magic Mirror): plan it with --no-identity")
    text_phase = phases.sample_phases(models, s, platform, kind)[0]  # checks the sizes too
    impl = default_attention_impl(platform, kind)
    dit_cfg = _replace(models.transformer, dtype=s.dtype, param_dtype=s.dtype, attention_impl=impl,
                       remat_policy="none")
    vae_cfg = _replace(models.vae, use_tiling=s.vae_tiling)
    sp, tc = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    latent_shape = (1, (s.frames - 1) // tc + 1, s.height // sp, s.width // sp, vae_cfg.latent_channels)
    if dit_cfg.use_learned_positional_embeddings:  # a size the learned table does not cover: refused here
        learned_positions.check_size(dit_cfg, latent_shape[1], latent_shape[2], latent_shape[3], s.max_sequence_length)
    schedule = jax.tree.map(np.asarray, sch.make_schedule(
        sch.SchedulerConfig.from_dict(models.scheduler, kind=s.scheduler), s.steps))
    tiling = f"tiling {'on' if s.vae_tiling else 'off'}"

    def vae_encode(mesh):
        return image_conditioning.encode_fn(), (
            checkpoint.abstract_model("vae", vae_cfg, mesh), replicated(mesh, (1, 1, s.height, s.width, 3), jnp.float32),
            replicated(mesh, (1, 1) + latent_shape[2:], jnp.float32), latent_shape[1])

    def vae_decode(mesh):
        return pipeline.decode_fn(), (checkpoint.abstract_model("vae", vae_cfg, mesh),
                                      replicated(mesh, latent_shape, jnp.float32))

    return I2VParts(s, component, dit_cfg, _replace(models.text_encoder, dtype=s.dtype, param_dtype=s.dtype),
                    latent_shape, schedule, denoising.guidance_per_step(schedule, s.guidance, False), impl,
                    s.guidance > 1.0, text_phase,
                    Phase("vae_encode", vae_encode, 1, f"VAE encode of the first frame {(1, 1, s.height, s.width, 3)}, "
                                                       f"float32, {tiling}"),
                    Phase("vae_decode", vae_decode, 1, f"VAE decode {latent_shape}, float32, {tiling}"))


def sample_phases(models: Models, s: SampleSettings, platform: str, kind: str | None = None) -> list[Phase]:
    """text_encoder, vae_encode, denoise (x steps), vae_decode: what ``image_to_video.generate`` runs."""
    from mm_jax import denoising, image_conditioning

    p = parts(models, s, platform, kind)

    def denoise(mesh):
        return (denoising.denoise_step_fn(s.scheduler, p.cfg_on, image_conditioning.model_fn),
                p.step_args(mesh, p.image_latents(mesh)))

    return [p.text_phase, p.vae_encode, Phase("denoise", denoise, s.steps, p.denoise_what("I2V DiT")), p.vae_decode]
