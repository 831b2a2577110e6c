"""Text (+ identity) to video: T5 prompt embeddings -> one compiled denoising loop -> VAE decode.

Equal to diffusers' ``CogVideoXPipeline`` given the same initial latents (section 6 of the
CogVideoX reference): CFG as one batch [negative, positive], trailing timesteps, DDIM or DPM,
dynamic CFG on the raw timestep value, latents / scaling_factor before decoding, frames
(x / 2 + 0.5) clipped to [0, 1]. No argument parsing here: the CLI is ``mm_jax.sample``.

Memory order: T5 is loaded, run and released before the DiT is placed, so the two large models
are never resident together.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax import checkpoint, parallel
from mm_jax import schedulers as sch

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


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

    def validate(self, spatial: int = 8, temporal: int = 4, patch: int = 2, decode_frame_batch: int | None = None) -> None:
        """Refuse settings the models cannot honour exactly; ``frames`` must be a count the VAE
        decodes back exactly (``mm_jax.frame_counts``: 1, 9, 17, ..., 49, ... for CogVideoX)."""
        from mm_jax import frame_counts

        frame_counts.check(self.frames, "frames", ratio=temporal, decode_batch=decode_frame_batch)
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % (spatial * patch):
                raise ValueError(f"{name}={v}: must be a positive multiple of {spatial * patch}")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps}: must be >= 1")
        if self.scheduler not in ("ddim", "dpm"):
            raise ValueError(f"scheduler={self.scheduler!r}: choose 'ddim' or 'dpm'")
        if not self.prompt:
            raise ValueError("prompt is empty")

    def latent_shape(self, channels: int, spatial: int = 8, temporal: int = 4) -> tuple[int, ...]:
        """(1, F, H, W, C) of the initial noise."""
        return (1, (self.frames - 1) // temporal + 1, self.height // spatial, self.width // spatial, channels)


def check_checkpoint(ckpt_dir: str | Path, needed=REQUIRED_COMPONENTS) -> None:
    ckpt_dir = Path(ckpt_dir)
    present = checkpoint.read_index(ckpt_dir)
    missing = [c for c in needed if c not in present or not (ckpt_dir / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} lacks component(s) {missing}; it has {present}. "
                                "Convert a full pipeline folder with --components all")


# -- text ------------------------------------------------------------------------------------

def encode_prompts(ckpt_dir: str | Path, prompts: list[str], *, max_length: int = 226, mesh=None,
                   dtype: str = "float32", on_host: bool = False) -> np.ndarray:
    """Load T5, embed ``prompts`` -> (B, max_length, d_model) host array, then free T5.

    ``on_host``: place and run T5 on the host CPU instead of ``mesh`` (T5-XXL is 9.5 GB in bf16;
    on a 16 GB chip this keeps the accelerator for the DiT, see ``mm_jax.memory_plan``)."""
    from mm_jax import text as text_lib

    tokenizer = text_lib.load_tokenizer(Path(ckpt_dir) / "tokenizer")
    ids = text_lib.tokenize(tokenizer, prompts, max_length=max_length)
    if on_host:
        host = jax.devices("cpu")[0]
        mesh, ids = parallel.make_mesh(devices=[host]), jax.device_put(np.asarray(ids), host)
    encoder = checkpoint.load_component(ckpt_dir, "text_encoder", mesh=mesh, dtype=dtype, param_dtype=dtype)
    emb = np.asarray(nnx.jit(lambda m, i: m(i))(encoder, jnp.asarray(ids)))
    del encoder
    gc.collect()
    return emb


# -- denoising -------------------------------------------------------------------------------

def guidance_per_step(schedule: sch.Schedule, guidance: float, dynamic: bool) -> np.ndarray:
    n = len(schedule.timesteps)
    if not dynamic:
        return np.full((n,), guidance, np.float32)
    return np.asarray([sch.dynamic_guidance_scale(guidance, int(t), n) for t in np.asarray(schedule.timesteps)],
                      np.float32)


_PROGRESS: list = [None]  # the live progress bar, updated from inside the compiled loop


def _tick(i):
    if _PROGRESS[0] is not None:
        _PROGRESS[0].update(1)


@functools.lru_cache(maxsize=None)
def make_denoise_fn(kind: str, cfg_on: bool, progress: bool = True):
    """A jitted ``(dit, latents, text_emb, schedule, guidance, key, model_fn) -> latents``: the whole
    loop is one ``lax.fori_loop``, compiled once for all steps (and cached across calls)."""

    def loop(dit, latents, text_emb, schedule, guidance, key, model_fn, extras):
        n = schedule.timesteps.shape[0]
        x_dtype = latents.dtype

        def body(i, carry):
            x, x0_old = carry
            t = schedule.timesteps[i]
            xin = jnp.concatenate([x, x], axis=0) if cfg_on else x
            v = model_fn(dit, xin, text_emb, jnp.full((xin.shape[0],), t), extras).astype(jnp.float32)
            if cfg_on:
                v_uncond, v_text = jnp.split(v, 2, axis=0)
                v = v_uncond + guidance[i] * (v_text - v_uncond)
            xf = x.astype(jnp.float32)
            if kind == "ddim":
                x_new, x0 = sch.ddim_step(schedule, i, v, xf), x0_old
            else:
                k1, k2 = jax.random.split(jax.random.fold_in(key, i))
                n1 = jax.random.normal(k1, x.shape, jnp.float32)
                n2 = jax.random.normal(k2, x.shape, jnp.float32)
                x_new, x0 = sch.dpm_step(schedule, i, v, xf, x0_old, n1, n2)
            if progress:
                jax.debug.callback(_tick, i, ordered=True)
            return x_new.astype(x_dtype), x0.astype(jnp.float32)

        x0_init = jnp.zeros(latents.shape, jnp.float32)
        out, _ = jax.lax.fori_loop(0, n, body, (latents, x0_init))
        return out

    return nnx.jit(loop, static_argnums=(6,))


def default_model_fn(dit, x, text_emb, t, extras=None):
    """The plain DiT; ``extras`` (any pytree, modules included) is passed through the compiled loop."""
    return dit(x, text_emb, t)


def denoise(dit, latents, text_emb, settings: SampleSettings, scheduler_cfg: dict, *, progress: bool = True,
            model_fn: Callable = default_model_fn, extras=None, mesh=None) -> jax.Array:
    """Run the sampling loop. ``text_emb`` is (2, L, T) [negative, positive] with CFG, else (1, L, T)."""
    kind = settings.scheduler
    cfg = sch.SchedulerConfig.from_dict(scheduler_cfg, kind=kind)
    schedule = sch.make_schedule(cfg, settings.steps)
    cfg_on = settings.guidance > 1.0
    guidance = jnp.asarray(guidance_per_step(schedule, settings.guidance, settings.dynamic_cfg))
    if progress:
        from tqdm import tqdm

        _PROGRESS[0] = tqdm(total=settings.steps, desc="denoising", unit="step")
    try:
        fn = make_denoise_fn(kind, cfg_on, progress)
        key = jax.random.key(settings.seed)
        out = jax.block_until_ready(fn(dit, latents, text_emb, schedule, guidance, key, model_fn, extras))
    finally:
        if _PROGRESS[0] is not None:
            _PROGRESS[0].close()
        _PROGRESS[0] = None
    return out


@functools.lru_cache(maxsize=None)
def _decode_fn():
    from mm_jax.models import vae as vae_lib

    return nnx.jit(lambda vae, z: vae_lib.decode_latents(vae, z))


# -- end to end ------------------------------------------------------------------------------

def initial_latents(settings: SampleSettings, channels: int, spatial: int, temporal: int,
                    latents: np.ndarray | None = None, dtype=jnp.float32) -> jax.Array:
    shape = settings.latent_shape(channels, spatial, temporal)
    if latents is not None:
        latents = np.asarray(latents)
        if tuple(latents.shape) != shape:
            raise ValueError(f"initial latents have shape {tuple(latents.shape)}; these settings need {shape} "
                             "(1, (frames-1)/4+1, height/8, width/8, latent channels)")
        return jnp.asarray(latents, dtype)
    return jax.random.normal(jax.random.key(settings.seed), shape, jnp.float32).astype(dtype)


def generate(ckpt_dir: str | Path, settings: SampleSettings, *, latents: np.ndarray | None = None, mesh=None,
             dtype: str = "float32", progress: bool = True, text_embeddings: np.ndarray | None = None,
             model_fn: Callable = default_model_fn, transformer=None, vae=None,
             identity: Optional[Any] = None, text_encoder_on_host: bool = False,
             vae_tiling: bool = False) -> np.ndarray:
    """Text (+ identity) to video: returns frames (F, H, W, 3) float32 in [0, 1].

    ``identity``: an ``mm_jax.identity.Identity`` (reference embeddings + adapter folder); None is
    plain CogVideoX text-to-video. ``text_encoder_on_host``: run T5 on the host CPU. ``vae_tiling``:
    decode in overlapping spatial tiles (diffusers ``enable_tiling``), one tile's activations at a time."""
    ckpt_dir = Path(ckpt_dir)
    check_checkpoint(ckpt_dir)
    vae_cfg = checkpoint.load_config(ckpt_dir, "vae")
    dit_cfg = checkpoint.load_config(ckpt_dir, "transformer")
    spatial, temporal = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    settings.validate(spatial, temporal, dit_cfg.patch_size)
    mesh = mesh or parallel.make_mesh()
    x = initial_latents(settings, dit_cfg.in_channels, spatial, temporal, latents)
    cfg_on = settings.guidance > 1.0
    if text_embeddings is None:
        prompts = [settings.negative_prompt, settings.prompt] if cfg_on else [settings.prompt]
        text_embeddings = encode_prompts(ckpt_dir, prompts, max_length=settings.max_sequence_length, mesh=mesh,
                                         dtype=dtype, on_host=text_encoder_on_host)
    owns_dit = transformer is None
    dit = transformer or checkpoint.load_component(ckpt_dir, "transformer", mesh=mesh, dtype=dtype, param_dtype=dtype)
    scheduler_cfg = json.loads((ckpt_dir / "scheduler" / "scheduler_config.json").read_text())
    extras = None
    text = jnp.asarray(text_embeddings, dtype)
    if identity is not None:
        from mm_jax import identity as id_lib

        text, extras, model_fn = id_lib.prepare(identity, dit, text, settings, ckpt_dir, mesh, dtype, cfg_on)
    with jax.set_mesh(mesh):
        z = denoise(dit, x.astype(dtype), text, settings, scheduler_cfg, progress=progress, model_fn=model_fn,
                    extras=extras)
    del dit, extras  # the adapter too: neither is needed for decoding
    if owns_dit:  # release the DiT before the VAE is placed
        gc.collect()
    vae = vae or checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=vae_tiling)
    with jax.set_mesh(mesh):
        video = _decode_fn()(vae, jnp.asarray(z, jnp.float32))
    frames = np.clip(np.asarray(video[0], np.float32) / 2 + 0.5, 0.0, 1.0)
    return frames
