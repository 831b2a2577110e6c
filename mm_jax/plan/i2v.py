"""The image-to-video sampler's phases (CogVideoX-5B-I2V, ``mm_jax.image_to_video``), beside
``phases.sample_phases``:

    text_encoder  as text-to-video                                                  once per video
    vae_encode    ``image_conditioning.encode_fn()(vae, pixels, noise, F)``          once per video
    denoise       ``denoising.denoise_step_fn(kind, cfg, image_conditioning.model_fn)``  ``steps`` per video
                  (the DiT on noise latents ++ image latents, 2 x the VAE's latent channels)
    vae_decode    ``pipeline.decode_fn()(vae, latents)``                           once per video

A model is image-to-video when its transformer takes twice the VAE's latent channels
(``image_conditioning.kind``): ``phases_for`` routes it here, from the presets (``--model i2v``)
or from a converted I2V checkpoint's configs.
"""
from __future__ import annotations

import dataclasses

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


def sample_phases(models: Models, s: SampleSettings, platform: str, kind: str | None = None) -> list[Phase]:
    """text_encoder, vae_encode, denoise (x steps), vae_decode: what ``image_to_video.generate`` runs."""
    from mm_jax import checkpoint, denoising, image_conditioning, pipeline, text
    from mm_jax import schedulers as sch
    from mm_jax.models import learned_positions, quantize
    from mm_jax.plan import phases
    from mm_jax.plan.aot import replicated

    if s.identity:
        raise ValueError("image-to-video takes no identity adapter (Magic Mirror): plan it with --no-identity")
    text_phase = phases.sample_phases(models, s, platform, kind)[0]  # checks the sizes too
    q, impl, cfg_on = s.quantize, default_attention_impl(platform, kind), s.guidance > 1.0
    dt = jnp.dtype(s.dtype)
    dit_cfg = _replace(models.transformer, dtype=s.dtype, param_dtype=s.dtype, attention_impl=impl,
                       remat_policy="none")
    vae_cfg = _replace(models.vae, use_tiling=s.vae_tiling)
    sp, tc = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    latent_shape = (1, (s.frames - 1) // tc + 1, s.height // sp, s.width // sp, vae_cfg.latent_channels)
    if dit_cfg.use_learned_positional_embeddings:  # a size the learned table does not cover: refused here
        learned_positions.check_size(dit_cfg, latent_shape[1], latent_shape[2], latent_shape[3], s.max_sequence_length)
    schedule = jax.tree.map(np.asarray, sch.make_schedule(
        sch.SchedulerConfig.from_dict(models.scheduler, kind=s.scheduler), s.steps))
    guidance = denoising.guidance_per_step(schedule, s.guidance, False)
    key = jax.eval_shape(lambda: jax.random.key(0))
    n_text = 2 if cfg_on else 1

    def vae_encode(mesh):
        return image_conditioning.encode_fn(), (
            checkpoint.abstract_model("vae", vae_cfg, mesh), replicated(mesh, (1, 1, s.height, s.width, 3), jnp.float32),
            replicated(mesh, (1, 1) + latent_shape[2:], jnp.float32), latent_shape[1])

    def denoise(mesh):
        t5_cfg = _replace(models.text_encoder, dtype=s.dtype, param_dtype=s.dtype)
        ids = replicated(mesh, (n_text, s.max_sequence_length), jnp.int32)
        emb = _shape_on(mesh, text.encode_ids, checkpoint.abstract_model("text_encoder", t5_cfg, mesh), ids)
        dit = quantize.quantize_model(checkpoint.abstract_model("transformer", dit_cfg, mesh), q)
        args = (dit, replicated(mesh, latent_shape, dt), replicated(mesh, latent_shape, jnp.float32),
                replicated(mesh, emb.shape, dt), jax.tree.map(lambda a: _sds(mesh, a), schedule),
                _sds(mesh, guidance), replicated(mesh, key.shape, key.dtype), replicated(mesh, (), jnp.int32),
                replicated(mesh, latent_shape, dt))  # extras: the image latents
        return denoising.denoise_step_fn(s.scheduler, cfg_on, image_conditioning.model_fn), args

    def vae_decode(mesh):
        return pipeline.decode_fn(), (checkpoint.abstract_model("vae", vae_cfg, mesh),
                                      replicated(mesh, latent_shape, jnp.float32))

    dit_gb = quantize.weight_bytes(quantize.quantize_model(checkpoint.abstract_model("transformer", dit_cfg), q)) / 1e9
    qn = f", linear layers {q}" if q else ""
    tiling = f"tiling {'on' if s.vae_tiling else 'off'}"
    return [text_phase,
            Phase("vae_encode", vae_encode, 1, f"VAE encode of the first frame {(1, 1, s.height, s.width, 3)}, "
                                               f"float32, {tiling}"),
            Phase("denoise", denoise, s.steps, f"I2V DiT ({dit_cfg.in_channels} input channels, learned positions "
                                               f"{dit_cfg.use_learned_positional_embeddings}), CFG batch {n_text}, "
                                               f"{s.scheduler}, {s.dtype}{qn}, attention {impl or 'default'}; "
                                               f"DiT weights {dit_gb:.2f} GB"),
            Phase("vae_decode", vae_decode, 1, f"VAE decode {latent_shape}, float32, {tiling}")]
