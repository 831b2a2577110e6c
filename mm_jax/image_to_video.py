"""Image (+ text) to video with CogVideoX-5B-I2V: equal to diffusers' ``CogVideoXImageToVideoPipeline``
given the same initial noise and posterior noise (``mm_jax.image_conditioning``).

Order of work (the large models are never resident together): T5 embeds [negative, positive]
(then is freed); the VAE encodes the first frame (then is freed); the DiT denoises with the image
latents concatenated on channels (``denoising.denoise`` with ``image_conditioning.model_fn``); the
DiT is freed and the VAE decodes. The CLI is ``python -m mm_jax.sample --image``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import checkpoint, denoising, parallel, pipeline
from mm_jax import image_conditioning as ic
from mm_jax.gather import to_host
from mm_jax.models import learned_positions
from mm_jax.sample_settings import SampleSettings


@dataclasses.dataclass
class ImageInput:
    """The first frame, already resized: ``pixels`` (1, 1, H, W, 3) in [-1, 1]; optional
    ``noise`` (1, 1, h, w, C), the posterior's standard-normal draw (None: ``image_noise_key(seed)``);
    ``source``: where the image came from (for the sidecar)."""
    pixels: np.ndarray
    noise: np.ndarray | None = None
    source: str | None = None


def check(ckpt_dir: str | Path, settings: SampleSettings, image, *, latents: np.ndarray | None = None,
          noise: np.ndarray | None = None) -> ImageInput:
    """Every check that needs no model -> the ``ImageInput``; ``FileNotFoundError`` / ``ValueError``
    naming what is wrong: the checkpoint (complete, and image-to-video), the settings against its
    VAE and DiT (``check_conditioned``), the image."""
    pipeline.check_checkpoint(ckpt_dir)
    check_conditioned(ckpt_dir, checkpoint.load_config(ckpt_dir, "transformer"), checkpoint.load_config(ckpt_dir, "vae"),
                      settings, latents=latents, noise=noise)
    pixels = ic.load_image(image, settings.height, settings.width)
    return ImageInput(pixels, None if noise is None else np.asarray(noise, np.float32),
                      str(image) if isinstance(image, (str, Path)) else None)


def check_conditioned(ckpt_dir: str | Path, dit_cfg, vae_cfg, settings: SampleSettings, *,
                      latents: np.ndarray | None = None, noise: np.ndarray | None = None) -> None:
    """The checks of a first-frame-conditioned run (CogVideoX-5B-I2V, ConsisID) against its DiT and
    VAE configs; ``ValueError`` naming what is wrong: the DiT must take 2 x the VAE's latent channels,
    the settings must fit the VAE and DiT (the learned positional table fixes the latent height and
    width), the initial latents and the posterior noise must have their shapes."""
    if ic.kind(dit_cfg, vae_cfg) != "i2v":
        raise ValueError(f"checkpoint {ckpt_dir} is text-to-video (transformer in_channels {dit_cfg.in_channels} = "
                         "the VAE's latent channels); an image needs an image-to-video checkpoint (CogVideoX-5B-I2V)")
    spatial, temporal = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    settings.validate(spatial, temporal, dit_cfg.patch_size)
    if dit_cfg.use_learned_positional_embeddings:
        learned_positions.check_size(dit_cfg, (settings.frames - 1) // temporal + 1,
                                     settings.height // spatial, settings.width // spatial,
                                     settings.max_sequence_length)
    want = settings.latent_shape(vae_cfg.latent_channels, spatial, temporal)
    if latents is not None and tuple(np.shape(latents)) != want:
        raise ValueError(f"initial latents have shape {tuple(np.shape(latents))}; these settings need {want} "
                         "(1, (frames-1)/4+1, height/8, width/8, latent channels)")
    if noise is not None and tuple(np.shape(noise)) != ic.noise_shape(settings, vae_cfg):
        raise ValueError(f"image noise has shape {tuple(np.shape(noise))}; these settings need "
                         f"{ic.noise_shape(settings, vae_cfg)} (1, 1, height/8, width/8, latent channels)")


def generate(ckpt_dir: str | Path, settings: SampleSettings, image: ImageInput, *,
             latents: np.ndarray | None = None, mesh=None, dtype: str | None = None, progress=True,
             text_embeddings: np.ndarray | None = None, text_encoder_on_host: bool = False,
             vae_tiling: bool | None = None, quantize: str | None = None, attention_parallelism: str | None = None):
    """One video from ``image`` (``check``'s ``ImageInput``) -> (frames (F, H, W, 3) float32 in
    [0, 1], final latents (1, f, h, w, C) float32). ``latents``: the initial noise (default: drawn
    from ``settings.seed`` as text-to-video); ``text_embeddings`` (2 or 1, L, T) [negative,
    positive]; the other options as ``pipeline.generate``."""
    from mm_jax.models import quantize as quantize_lib

    ckpt_dir = Path(ckpt_dir)
    quantize_lib.check(quantize)
    dtype = dtype or pipeline.default_dtype()
    mesh = mesh or parallel.make_mesh()
    vae_cfg = checkpoint.load_config(ckpt_dir, "vae")
    spatial, temporal = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    x = pipeline.initial_latents(settings, vae_cfg.latent_channels, spatial, temporal, latents)
    cfg_on = settings.guidance > 1.0
    if text_embeddings is None:
        prompts = [settings.negative_prompt] * cfg_on + [settings.prompt]
        text_embeddings = pipeline.prompt_embeddings(ckpt_dir, prompts, max_length=settings.max_sequence_length,
                                                     mesh=mesh, dtype=dtype, on_host=text_encoder_on_host,
                                                     quantize=quantize)
    tiling = pipeline.default_vae_tiling(mesh) if vae_tiling is None else vae_tiling
    noise = image.noise if image.noise is not None else \
        jax.random.normal(ic.image_noise_key(settings.seed), ic.noise_shape(settings, vae_cfg), jnp.float32)
    vae = checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=tiling)
    with jax.set_mesh(mesh):
        cond = ic.encode_fn()(vae, jnp.asarray(image.pixels), jnp.asarray(noise), x.shape[1])
        cond = cond.astype(dtype)
    del vae
    gc.collect()
    dit = checkpoint.load_component(ckpt_dir, "transformer", mesh=mesh, dtype=dtype, param_dtype=dtype,
                                    attention_parallelism=attention_parallelism)
    quantize_lib.quantize_model(dit, quantize)
    scheduler_cfg = json.loads((ckpt_dir / "scheduler" / "scheduler_config.json").read_text())
    close = None
    if progress is True:
        progress, close = denoising.tqdm_progress(settings.steps)
    try:
        with jax.set_mesh(mesh):
            z = denoising.denoise(dit, x.astype(dtype), jnp.asarray(text_embeddings, dtype), settings, scheduler_cfg,
                                 progress=progress or None, model_fn=ic.model_fn, extras=cond)
    finally:
        if close is not None:
            close()
    del dit, cond
    gc.collect()
    vae = checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=tiling)
    with jax.set_mesh(mesh):
        video = pipeline.decode_fn()(vae, jnp.asarray(z, jnp.float32))
    frames = np.clip(to_host(video)[0].astype(np.float32) / 2 + 0.5, 0.0, 1.0)
    return frames, to_host(z).astype(np.float32)
