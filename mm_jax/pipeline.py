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

from mm_jax import checkpoint, parallel
from mm_jax import identity as id_lib
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

def prompt_embeddings(ckpt_dir: str | Path, prompts: list[str], *, max_length: int = 226, mesh=None,
                      dtype: str = "float32", on_host: bool = False) -> np.ndarray:
    """Load T5 from ``ckpt_dir``, embed ``prompts`` (``mm_jax.text.encode_prompts``) -> (B,
    max_length, d_model) host array, then free T5.

    ``on_host``: place and run T5 on the host CPU instead of ``mesh`` (T5-XXL is 9.5 GB in bf16;
    on a 16 GB chip this keeps the accelerator for the DiT; ``python -m mm_jax.plan`` says when)."""
    from mm_jax import text as text_lib

    tokenizer = text_lib.load_tokenizer(Path(ckpt_dir) / "tokenizer")
    if on_host:
        mesh = parallel.make_mesh(devices=[jax.devices("cpu")[0]])
    encoder = checkpoint.load_component(ckpt_dir, "text_encoder", mesh=mesh, dtype=dtype, param_dtype=dtype)
    with jax.set_mesh(mesh or parallel.make_mesh()):
        emb = np.asarray(text_lib.encode_prompts(encoder, tokenizer, prompts, max_length=max_length))
    del encoder
    gc.collect()
    return emb


# -- denoising -------------------------------------------------------------------------------

def guidance_per_step(schedule: sch.Schedule, guidance: float, dynamic: bool) -> np.ndarray:
    """The CFG scale of every step: constant, or the reference's dynamic (cosine) schedule."""
    n = len(schedule.timesteps)
    if not dynamic:
        return np.full((n,), guidance, np.float32)
    return np.asarray([sch.dynamic_guidance_scale(guidance, int(t), n) for t in np.asarray(schedule.timesteps)],
                      np.float32)


def default_model_fn(dit, x, text_emb, t, extras=None):
    """The plain DiT; ``extras`` (any pytree, modules included) is passed through the compiled step."""
    return dit(x, text_emb, t)


@functools.lru_cache(maxsize=None)
def denoise_step_fn(kind: str, cfg_on: bool, model_fn: Callable = default_model_fn):
    """The compiled denoising step, the function the sampler runs ``steps`` times and the planner
    (``python -m mm_jax.plan``) compiles for its targets:

        step(dit, x, x0, text, schedule, guidance, key, i, extras) -> (x, x0)

    dit: the DiT module; x (1, F, H, W, C) latents in the compute dtype (donated); x0 (1, F, H, W,
    C) float32, the DPM sampler's previous x0 (donated; unused by DDIM); text (2, L, T) [negative,
    positive] with CFG, else (1, L, T); schedule: ``schedulers.Schedule``; guidance (steps,) float32;
    key: the DPM noise key; i: int32 step index (traced: one compile serves every step); extras:
    ``model_fn``'s pytree (the adapter and the identity tokens), or None.
    """

    def step(dit, x, x0, text, schedule, guidance, key, i, extras):
        t = schedule.timesteps[i]
        xin = jnp.concatenate([x, x], axis=0) if cfg_on else x
        v = model_fn(dit, xin, text, jnp.full((xin.shape[0],), t), extras).astype(jnp.float32)
        if cfg_on:
            v = sch.cfg_combine(*jnp.split(v, 2, axis=0), guidance[i])
        xf = x.astype(jnp.float32)
        if kind == "ddim":
            x_new = sch.ddim_step(schedule, i, v, xf)
        else:
            x_new, x0 = sch.dpm_step(schedule, i, v, xf, x0, *sch.dpm_noise(key, i, x.shape))
        return x_new.astype(x.dtype), x0.astype(jnp.float32)

    return jax.jit(step, donate_argnums=(1, 2))


ProgressFn = Callable[[int, int], None]  # (steps done, steps in all), called on the host


def denoise(dit, latents, text_emb, settings: SampleSettings, scheduler_cfg: dict, *,
            progress: ProgressFn | None = None, model_fn: Callable = default_model_fn, extras=None) -> jax.Array:
    """Run the sampling loop: ``settings.steps`` calls of ``denoise_step_fn`` from the host.

    ``text_emb`` is (2, L, T) [negative, positive] with CFG, else (1, L, T). ``progress(done,
    total)`` is called on the host after each step has finished on the devices, so a progress bar
    is exact on any mesh and any number of devices or processes (the loop is driven from the host;
    no callback runs inside compiled code)."""
    cfg = sch.SchedulerConfig.from_dict(scheduler_cfg, kind=settings.scheduler)
    schedule = sch.make_schedule(cfg, settings.steps)
    cfg_on = settings.guidance > 1.0
    guidance = jnp.asarray(guidance_per_step(schedule, settings.guidance, settings.dynamic_cfg))
    step = denoise_step_fn(settings.scheduler, cfg_on, model_fn)
    key = jax.random.key(settings.seed)
    x, x0 = latents, jnp.zeros(latents.shape, jnp.float32)
    n = settings.steps
    for i in range(n):
        x, x0 = step(dit, x, x0, text_emb, schedule, guidance, key, jnp.int32(i), extras)
        if progress is not None:
            jax.block_until_ready(x)
            progress(i + 1, n)
    return x


def tqdm_progress(total: int, desc: str = "denoising") -> tuple[ProgressFn, Callable[[], None]]:
    """A tqdm bar as a ``ProgressFn``, shown by the main process only -> (progress, close)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, unit="step", disable=jax.process_index() != 0)

    def update(done: int, _total: int) -> None:
        bar.update(done - bar.n)

    return update, bar.close


@functools.lru_cache(maxsize=None)
def decode_fn():
    """The compiled VAE decode ``(vae, latents (1, f, h, w, C) float32) -> video (1, F, H, W, 3) in
    [-1, 1]`` (what the planner compiles as the ``vae_decode`` phase)."""
    from mm_jax.models import vae as vae_lib

    return jax.jit(lambda vae, z: vae_lib.decode_latents(vae, z))


# -- end to end ------------------------------------------------------------------------------

def initial_latents(settings: SampleSettings, channels: int, spatial: int, temporal: int,
                    latents: np.ndarray | None = None, dtype=jnp.float32) -> jax.Array:
    """The initial noise: ``latents`` (checked against the settings' shape) or drawn from the seed."""
    shape = settings.latent_shape(channels, spatial, temporal)
    if latents is not None:
        latents = np.asarray(latents)
        if tuple(latents.shape) != shape:
            raise ValueError(f"initial latents have shape {tuple(latents.shape)}; these settings need {shape} "
                             "(1, (frames-1)/4+1, height/8, width/8, latent channels)")
        return jnp.asarray(latents, dtype)
    return sch.init_latents(jax.random.key(settings.seed), shape, dtype)


def generate(ckpt_dir: str | Path, settings: SampleSettings, *, latents: np.ndarray | None = None, mesh=None,
             dtype: str = "float32", progress: bool | ProgressFn = True, text_embeddings: np.ndarray | None = None,
             model_fn: Callable = default_model_fn, transformer=None, vae=None,
             identity: Optional[Any] = None, text_encoder_on_host: bool = False,
             vae_tiling: bool = False) -> np.ndarray:
    """Text (+ identity) to video: returns frames (F, H, W, 3) float32 in [0, 1].

    ``identity``: an ``mm_jax.identity.Identity`` (reference embeddings + adapter folder); None is
    plain CogVideoX text-to-video. ``progress``: True for a tqdm bar, False for none, or a
    ``ProgressFn``. ``text_encoder_on_host``: run T5 on the host CPU. ``vae_tiling``: decode in
    overlapping spatial tiles (diffusers ``enable_tiling``), one tile's activations at a time."""
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
        text_embeddings = prompt_embeddings(ckpt_dir, prompts, max_length=settings.max_sequence_length, mesh=mesh,
                                            dtype=dtype, on_host=text_encoder_on_host)
    owns_dit = transformer is None
    dit = transformer or checkpoint.load_component(ckpt_dir, "transformer", mesh=mesh, dtype=dtype, param_dtype=dtype)
    scheduler_cfg = json.loads((ckpt_dir / "scheduler" / "scheduler_config.json").read_text())
    extras = None
    text = jnp.asarray(text_embeddings, dtype)
    if identity is not None:
        text, extras, model_fn = id_lib.prepare(identity, dit, text, settings, ckpt_dir, mesh, dtype, cfg_on)
    close = None
    if progress is True:
        progress, close = tqdm_progress(settings.steps)
    try:
        with jax.set_mesh(mesh):
            z = denoise(dit, x.astype(dtype), text, settings, scheduler_cfg, progress=progress or None,
                        model_fn=model_fn, extras=extras)
    finally:
        if close is not None:
            close()
    del dit, extras  # the adapter too: neither is needed for decoding
    if owns_dit:  # release the DiT before the VAE is placed
        gc.collect()
    vae = vae or checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=vae_tiling)
    with jax.set_mesh(mesh):
        video = decode_fn()(vae, jnp.asarray(z, jnp.float32))
    return np.clip(np.asarray(video[0], np.float32) / 2 + 0.5, 0.0, 1.0)


def sample_identity(ckpt_dir: str | Path, settings: SampleSettings, reference, face_models: str | Path,
                    adapter_dir: str | Path, *, clip_dir: str | Path | None = None, mesh=None,
                    dtype: str | None = None, progress: bool | ProgressFn = True, text_encoder_on_host: bool = False,
                    vae_tiling: bool | None = None) -> np.ndarray:
    """One call from a reference photo to frames (F, H, W, 3) in [0, 1] (what the notebook uses).

    ``reference``: image path or RGB uint8 array. ``clip_dir``: the checkpoint folder with the
    ``image_encoder`` (default: the adapter's folder, else the backbone's). ``dtype`` defaults to
    bfloat16 on accelerators and float32 on CPU, as ``mm_jax.sample``; ``vae_tiling`` defaults to on
    for accelerators and off on CPU.
    """
    mesh = mesh or parallel.make_mesh()
    dtype = dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    clip_dir = clip_dir or id_lib.component_dir("image_encoder", adapter_dir, ckpt_dir)
    ident = id_lib.compute(reference, face_models, clip_dir, adapter_dir, mesh=mesh)
    accel = jax.default_backend() != "cpu"
    return generate(ckpt_dir, settings, mesh=mesh, dtype=dtype, progress=progress, identity=ident,
                    text_encoder_on_host=text_encoder_on_host, vae_tiling=accel if vae_tiling is None else vae_tiling)
