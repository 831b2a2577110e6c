"""The first-frame conditioning of CogVideoX image-to-video (diffusers ``CogVideoXImageToVideoPipeline``).

An I2V checkpoint is told apart by its configs: the transformer takes twice the VAE's latent
channels (``in_channels`` 32 = 2 x 16 for CogVideoX-5B-I2V: noisy latents ++ image latents on
channels), a text-to-video one exactly the VAE's (``kind``).

The conditioning, step by step as the reference:

1. ``load_image``: PIL Lanczos resize straight to width x height (a stretch, no crop; PIL leaves
   an image already at that size untouched), then [0, 255] -> [-1, 1].
2. ``image_latents``: the VAE encodes that one frame; the latents are a *sample* of the posterior,
   mean + std * noise (diffusers ``latent_dist.sample(generator)``), times the VAE's
   ``scaling_factor`` (or divided by it when ``invert_scale_latents``), then zero-padded to the
   latent frame count.
3. ``model_fn``: in every DiT call the image latents (duplicated for the CFG pair, as the noise
   latents) are concatenated after the noise latents on the channel axis.

Randomness: diffusers draws the posterior noise from the pipeline's generator *before* the initial
noise. Here both are inputs: ``noise`` (1, 1, h, w, C) standard normal, given (``--image-noise``)
or drawn from ``image_noise_key(seed)``, a key of its own beside the initial noise's
``jax.random.key(seed)``. To reproduce a diffusers run, pass both draws (parity tests do).
"""
from __future__ import annotations

import functools
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def kind(dit_cfg, vae_cfg) -> str:
    """"i2v" when the transformer takes 2 x the VAE's latent channels, "t2v" when it takes exactly
    them; ValueError for anything else."""
    c, z = dit_cfg.in_channels, vae_cfg.latent_channels
    if c == z:
        return "t2v"
    if c == 2 * z:
        return "i2v"
    raise ValueError(f"transformer in_channels {c} fits neither text-to-video ({z}, the VAE's latent_channels) "
                     f"nor image-to-video ({2 * z})")


def load_image(path_or_array, height: int, width: int) -> np.ndarray:
    """An RGB image (path, PIL image or uint8 (H, W, 3) array) -> (1, 1, height, width, 3) float32
    in [-1, 1]: diffusers ``VideoProcessor.preprocess`` (Lanczos resize to the output size).
    An image with alpha or in another mode is converted to RGB, with a warning; an unreadable file
    is a ValueError."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(path_or_array, (str, Path)):
        if not Path(path_or_array).is_file():
            raise FileNotFoundError(f"image {path_or_array} not found")
        try:
            img = Image.open(path_or_array)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"image {path_or_array}: cannot read ({e})") from None
    elif isinstance(path_or_array, np.ndarray):
        if path_or_array.dtype != np.uint8 or path_or_array.ndim != 3 or path_or_array.shape[-1] != 3:
            raise ValueError(f"image array: need uint8 (H, W, 3), got {path_or_array.dtype} {path_or_array.shape}")
        img = Image.fromarray(path_or_array)
    else:
        img = path_or_array
    if img.mode != "RGB":
        warnings.warn(f"image mode {img.mode}: converted to RGB (diffusers takes RGB images)", stacklevel=2)
        img = img.convert("RGB")
    img = img.resize((width, height), resample=Image.LANCZOS)
    arr = np.asarray(img, np.float32) / 255.0
    return (2.0 * arr - 1.0)[None, None]


def image_noise_key(seed: int) -> jax.Array:
    """The key the posterior noise is drawn from when none is given (not the initial noise's key)."""
    return jax.random.fold_in(jax.random.key(seed), 1)


def noise_shape(settings, vae_cfg) -> tuple[int, ...]:
    """(1, 1, h, w, C) of the posterior noise of one image."""
    s = vae_cfg.spatial_compression
    return 1, 1, settings.height // s, settings.width // s, vae_cfg.latent_channels


def image_latents(vae, image: jax.Array, noise: jax.Array, latent_frames: int) -> jax.Array:
    """Pixels (1, 1, H, W, 3) in [-1, 1] and standard-normal ``noise`` (1, 1, h, w, C) -> the
    conditioning (1, latent_frames, h, w, C): the scaled posterior sample, then zero frames."""
    post = vae.encode(image)
    z = post.mean + post.std * noise.astype(post.mean.dtype)
    sf = vae.cfg.scaling_factor
    z = z / sf if vae.cfg.invert_scale_latents else z * sf
    return jnp.pad(z, ((0, 0), (0, latent_frames - 1), (0, 0), (0, 0), (0, 0)))


@functools.lru_cache(maxsize=None)
def encode_fn():
    """The compiled ``image_latents(vae, pixels, noise, latent_frames)`` (``latent_frames`` static):
    what the sampler runs and the planner compiles as the ``vae_encode`` phase."""
    return jax.jit(image_latents, static_argnums=3)


def with_image(x, image_latents):
    """The DiT input of an image-conditioned step: x (V or 2V, F, h, w, C) ++ the image latents
    (V, F, h, w, C) on channels, the latents repeated for the CFG pair as x is."""
    img = image_latents.astype(x.dtype)
    if x.shape[0] != img.shape[0]:  # the CFG pair: the same image latents for both halves
        img = jnp.concatenate([img] * (x.shape[0] // img.shape[0]), axis=0)
    return jnp.concatenate([x, img], axis=-1)


def model_fn(dit, x, text_emb, t, extras):
    """The DiT of an I2V step (``denoising.denoise``'s ``model_fn``): ``extras`` holds the image
    latents (V, F, h, w, C) of the V videos; x is (V or 2V, F, h, w, C), [x, x] with CFG."""
    return dit(with_image(x, extras), text_emb, t)
