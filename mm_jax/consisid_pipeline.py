"""Identity-preserving video with ConsisID's released weights: equal to diffusers' ``ConsisIDPipeline``
given the same initial noise and posterior noise.

A ConsisID checkpoint is what ``from_torch.py --components all`` writes from a ``ConsisIDPipeline``
folder: ``consisid_transformer`` (the CogVideoX-5B-I2V DiT with the Local Facial Extractor and the
cross-attentions to the face, ``mm_jax.models.consisid``), ``vae``, ``text_encoder``, ``tokenizer``
and ``scheduler``. An identity is a ``ConsisIDIdentity`` (``image``, ``id_cond``, ``id_vit_hidden``:
the pipeline's arguments; ``mm_jax.consisid_identity``).

The reference's steps, as done here:

- the face crop ``image`` is the first frame: resized (PIL Lanczos stretch) to width x height,
  VAE-encoded as a posterior *sample*, times the VAE's ``scaling_factor``, zero-padded to the
  latent frame count, and concatenated after the noise latents on channels in every step
  (``mm_jax.image_conditioning``; ``image_to_video.check_conditioned`` for its checks);
- ``id_cond`` / ``id_vit_hidden`` go through the LFE once per video (``face_tokens``; they have no
  timestep input), and the same face tokens serve both halves of the CFG pair (batch 1 there, as
  diffusers passes them);
- CFG, dynamic CFG, DDIM / DPM: ``mm_jax.denoising``, as text-to-video.

Order of work (the large models are never resident together): T5 embeds every prompt (then is
freed); the VAE encodes every face crop (then is freed); the DiT computes the face tokens and
denoises the videos ``videos_per_batch`` at a time; the DiT is freed and the VAE decodes each video.
The CLI is ``python -m mm_jax.sample --model consisid`` (``mm_jax.sample_consisid``).
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import checkpoint, consisid_identity, denoising, image_to_video, parallel, pipeline
from mm_jax import image_conditioning as ic
from mm_jax.consisid_identity import ConsisIDIdentity
from mm_jax.gather import to_host
from mm_jax.sample_settings import SampleSettings

TRANSFORMER = "consisid_transformer"
REQUIRED_COMPONENTS = (TRANSFORMER, "vae", "text_encoder", "tokenizer", "scheduler")


def is_consisid(ckpt_dir: str | Path) -> bool:
    """Whether ``ckpt_dir`` is a ConsisID checkpoint (its index lists ``consisid_transformer``);
    False for a folder that is no checkpoint."""
    try:
        return TRANSFORMER in checkpoint.read_index(ckpt_dir)
    except (FileNotFoundError, ValueError):
        return False


@dataclasses.dataclass
class Video:
    """One video: its settings, identity, and optionally its initial noise ``latents`` (1, f, h, w, C)
    and the face crop's posterior draw ``noise`` (1, 1, h, w, C) (default: drawn from the seed)."""
    settings: SampleSettings
    identity: ConsisIDIdentity
    latents: np.ndarray | None = None
    noise: np.ndarray | None = None


def check(ckpt_dir: str | Path, settings: SampleSettings, identity: ConsisIDIdentity | None = None, *,
          latents: np.ndarray | None = None, noise: np.ndarray | None = None) -> None:
    """Every check that needs no model; ``FileNotFoundError`` / ``ValueError`` naming what is wrong:
    the checkpoint (ConsisID, complete), the settings against its VAE and DiT (the learned
    positional table fixes the latent height and width), the initial latents' and the posterior
    noise's shapes, and the identity against the transformer (``consisid_identity.check_fits``)."""
    present = checkpoint.read_index(ckpt_dir)  # FileNotFoundError for a folder that is no checkpoint
    if TRANSFORMER not in present:
        raise ValueError(f"checkpoint {ckpt_dir} is not ConsisID: it has {present}, no {TRANSFORMER!r}; convert a "
                         "diffusers ConsisIDPipeline folder with from_torch.py --components all")
    pipeline.check_checkpoint(ckpt_dir, REQUIRED_COMPONENTS)
    dit_cfg, vae_cfg = checkpoint.load_config(ckpt_dir, TRANSFORMER), checkpoint.load_config(ckpt_dir, "vae")
    if vae_cfg.invert_scale_latents:  # ConsisIDPipeline multiplies by scaling_factor whatever the VAE says
        raise ValueError(f"checkpoint {ckpt_dir}: the VAE sets invert_scale_latents, which ConsisIDPipeline ignores "
                         "(it always multiplies the image latents by scaling_factor); ConsisID uses the 5B VAE")
    image_to_video.check_conditioned(ckpt_dir, dit_cfg, vae_cfg, settings, latents=latents, noise=noise)
    if identity is not None:
        consisid_identity.check_fits(identity, dit_cfg)


def model_fn(dit, x, text_emb, t, extras):
    """The DiT of a ConsisID step (``denoising.denoise``'s ``model_fn``): ``extras`` = (image latents
    (V, F, h, w, C), face tokens (V, M, D)); x is (V or 2V, ...), [x, x] with CFG. One video's face
    tokens stay batch 1 across the CFG pair (they broadcast, as in diffusers)."""
    image_latents, face = extras
    if face.shape[0] > 1 and x.shape[0] != face.shape[0]:
        face = jnp.concatenate([face] * (x.shape[0] // face.shape[0]), axis=0)
    return dit(ic.with_image(x, image_latents), text_emb, t, face=face)


@functools.lru_cache(maxsize=None)
def face_tokens_fn():
    """The compiled LFE: ``(dit, id_cond (1, id_dim), id_vit_hidden (S, 1, T, vit)) -> (1, M, D)``."""
    return jax.jit(lambda dit, id_cond, vit: dit.face_tokens(id_cond, vit))


def iter_videos(ckpt_dir: str | Path, videos: list[Video], *, mesh=None, dtype: str | None = None,
                progress=True, videos_per_batch: int = 1, text_embeddings: np.ndarray | None = None,
                text_encoder_on_host: bool = False, vae_tiling: bool | None = None, quantize: str | None = None,
                attention_parallelism: str | None = None):
    """Many ConsisID videos with the models loaded once, yielded as each is decoded: ``(index into
    videos, frames (F, H, W, 3) float32 in [0, 1], final latents (1, f, h, w, C) float32)``.

    Videos must share ``pipeline.SHARED_FIELDS`` (they fix the compiled shapes); each is checked by
    ``check``. ``videos_per_batch`` videos are denoised together (their CFG pairs in one DiT
    batch, each with its own face tokens and image latents). ``text_embeddings``: (2V or V, L, T)
    precomputed [negatives, positives]; ``dtype``, ``text_encoder_on_host``, ``vae_tiling``,
    ``quantize``, ``attention_parallelism`` as ``pipeline.iter_videos``. On several processes every
    process makes the same call and gets every video."""
    from mm_jax.models import quantize as quantize_lib

    ckpt_dir = Path(ckpt_dir)
    if not videos:
        return
    first = videos[0].settings
    for v in videos:
        diff = [f for f in pipeline.SHARED_FIELDS if getattr(v.settings, f) != getattr(first, f)]
        if diff:
            raise ValueError(f"videos of one run must share {diff}")
        check(ckpt_dir, v.settings, v.identity, latents=v.latents, noise=v.noise)
    quantize_lib.check(quantize)
    dtype = dtype or pipeline.default_dtype()
    mesh = mesh or parallel.make_mesh()
    vae_cfg = checkpoint.load_config(ckpt_dir, "vae")
    spatial, temporal = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    xs = [pipeline.initial_latents(v.settings, vae_cfg.latent_channels, spatial, temporal, v.latents) for v in videos]
    cfg_on = first.guidance > 1.0
    n = len(videos)
    if text_embeddings is None:
        prompts = [v.settings.negative_prompt for v in videos] * cfg_on + [v.settings.prompt for v in videos]
        text_embeddings = pipeline.prompt_embeddings(ckpt_dir, prompts, max_length=first.max_sequence_length,
                                                     mesh=mesh, dtype=dtype, on_host=text_encoder_on_host,
                                                     quantize=quantize)
    neg = np.asarray(text_embeddings[:n]) if cfg_on else None
    pos = np.asarray(text_embeddings[-n:])
    tiling = pipeline.default_vae_tiling(mesh) if vae_tiling is None else vae_tiling
    vae = checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=tiling)
    conds = []
    with jax.set_mesh(mesh):
        for v, x in zip(videos, xs):
            pixels = ic.load_image(v.identity.image, v.settings.height, v.settings.width)
            noise = v.noise if v.noise is not None else \
                jax.random.normal(ic.image_noise_key(v.settings.seed), ic.noise_shape(v.settings, vae_cfg), jnp.float32)
            conds.append(ic.encode_fn()(vae, jnp.asarray(pixels), jnp.asarray(noise, jnp.float32), x.shape[1]))
    del vae
    gc.collect()
    dit = checkpoint.load_component(ckpt_dir, TRANSFORMER, mesh=mesh, dtype=dtype, param_dtype=dtype,
                                    attention_parallelism=attention_parallelism)
    quantize_lib.quantize_model(dit, quantize)
    with jax.set_mesh(mesh):  # the LFE once per video: its face tokens serve every step
        faces = [face_tokens_fn()(dit, jnp.asarray(v.identity.id_cond, dtype), jnp.asarray(v.identity.id_vit_hidden, dtype))
                 for v in videos]
    scheduler_cfg = json.loads((ckpt_dir / "scheduler" / "scheduler_config.json").read_text())
    chunks = [list(range(k, min(k + videos_per_batch, n))) for k in range(0, n, videos_per_batch)]
    close = None
    if progress is True:
        progress, close = denoising.tqdm_progress(first.steps * len(chunks), desc=f"denoising {n} video(s)")
    finals = {}
    try:
        for c, chunk in enumerate(chunks):
            text = jnp.asarray(np.concatenate(([neg[chunk]] if cfg_on else []) + [pos[chunk]]), dtype)
            extras = (jnp.concatenate([conds[i] for i in chunk]).astype(dtype),
                      jnp.concatenate([faces[i] for i in chunk]))
            done = (lambda k, _t, c=c: progress(c * first.steps + k, first.steps * len(chunks))) if progress else None
            with jax.set_mesh(mesh):
                z = denoising.denoise(dit, jnp.concatenate([xs[i] for i in chunk]).astype(dtype), text, first,
                                      scheduler_cfg, progress=done, model_fn=model_fn, extras=extras,
                                      seeds=[videos[i].settings.seed for i in chunk])
            for j, i in enumerate(chunk):
                finals[i] = z[j:j + 1]
            del z, extras
    finally:
        if close is not None:
            close()
    del dit, faces, conds
    gc.collect()  # the DiT is released before the VAE is placed
    vae = checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=tiling)
    for i in sorted(finals):
        z = finals.pop(i)
        with jax.set_mesh(mesh), jax.profiler.TraceAnnotation("vae_decode"):
            video = pipeline.decode_fn()(vae, jnp.asarray(z, jnp.float32))
        yield i, np.clip(to_host(video)[0].astype(np.float32) / 2 + 0.5, 0.0, 1.0), to_host(z).astype(np.float32)


def generate(ckpt_dir: str | Path, settings: SampleSettings, identity: ConsisIDIdentity, *,
             latents: np.ndarray | None = None, noise: np.ndarray | None = None, mesh=None, dtype: str | None = None,
             progress=True, **options):
    """One ConsisID video -> (frames (F, H, W, 3) float32 in [0, 1], final latents (1, f, h, w, C)
    float32). ``latents``: the initial noise (default: drawn from ``settings.seed``); ``noise``: the
    face crop's posterior draw (default: ``image_conditioning.image_noise_key(seed)``); ``options``
    as ``iter_videos``."""
    [(_, frames, final)] = iter_videos(ckpt_dir, [Video(settings, identity, latents, noise)], mesh=mesh, dtype=dtype,
                                       progress=progress, **options)
    return frames, final
