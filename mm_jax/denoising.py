"""The denoising loop: one compiled step (CFG, DDIM or DPM) run ``steps`` times from the host.

``denoise_step_fn`` is the function the sampler runs and the planner (``python -m mm_jax.plan``)
compiles; ``denoise`` drives it with an exact progress callback; ``guidance_per_step`` is the CFG
scale of every step. ``mm_jax.pipeline`` calls these between the text encoder and the VAE.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import schedulers as sch
from mm_jax.sample_settings import SampleSettings


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
def denoise_step_fn(kind: str, cfg_on: bool, model_fn: Callable = default_model_fn, platform: str | None = None):
    """The compiled denoising step, the function the sampler runs ``steps`` times and the planner
    (``python -m mm_jax.plan``) compiles for its targets:

        step(dit, x, x0, text, schedule, guidance, key, i, extras) -> (x, x0)

    dit: the DiT module; x (V, F, H, W, C) latents of V videos in the compute dtype (donated); x0
    (V, F, H, W, C) float32, the DPM sampler's previous x0 (donated; unused by DDIM); text (2V, L, T)
    [negatives, positives] with CFG, else (V, L, T); schedule: ``schedulers.Schedule``; guidance
    (steps,) float32; key: (V,) DPM noise keys, one per video (a video's draws do not depend on
    its batch); i: int32 step index (traced: one compile serves every step); extras: ``model_fn``'s
    pytree (the adapter and the identity tokens), or None. With CFG the batch [x, x] is split
    over the ``data`` mesh axis when it has one: the guidance combine is then the one collective.
    ``platform``: where the sampler runs it; "cpu" compiles with ``layers.scan_compiler_options``
    (XLA:CPU would otherwise hold the bf16 blocks a second time in f32; the planner passes none).
    """
    from mm_jax.models import layers

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
            one = (1,) + x.shape[1:]
            n1, n2 = jax.vmap(lambda k: sch.dpm_noise(k, i, one))(key)
            x_new, x0 = sch.dpm_step(schedule, i, v, xf, x0, n1.reshape(x.shape), n2.reshape(x.shape))
        return x_new.astype(x.dtype), x0.astype(jnp.float32)

    options = layers.scan_compiler_options(platform) if platform else None
    return jax.jit(step, donate_argnums=(1, 2), compiler_options=options)


ProgressFn = Callable[[int, int], None]  # (steps done, steps in all), called on the host


def denoise(dit, latents, text_emb, settings: SampleSettings, scheduler_cfg: dict, *,
            progress: ProgressFn | None = None, model_fn: Callable = default_model_fn, extras=None,
            seeds: list[int] | None = None) -> jax.Array:
    """Run the sampling loop: ``settings.steps`` calls of ``denoise_step_fn`` from the host.

    ``latents`` (V, F, H, W, C); ``text_emb`` is (2V, L, T) [negatives, positives] with CFG, else
    (V, L, T); ``seeds`` (V,) the videos' seeds (default: ``settings.seed`` for each). ``progress(done,
    total)`` is called on the host after each step has finished on the devices, so a progress bar
    is exact on any mesh and any number of devices or processes (the loop is driven from the host;
    no callback runs inside compiled code)."""
    cfg = sch.SchedulerConfig.from_dict(scheduler_cfg, kind=settings.scheduler)
    schedule = sch.make_schedule(cfg, settings.steps)
    cfg_on = settings.guidance > 1.0
    guidance = jnp.asarray(guidance_per_step(schedule, settings.guidance, settings.dynamic_cfg))
    platform = next(iter(jax.tree.leaves(dit)[0].devices())).platform
    step = denoise_step_fn(settings.scheduler, cfg_on, model_fn, platform)
    seeds = [settings.seed] * latents.shape[0] if seeds is None else list(seeds)
    key = jnp.stack([jax.random.key(int(sd)) for sd in seeds])
    x, x0 = latents, jnp.zeros(latents.shape, jnp.float32)
    n = settings.steps
    for i in range(n):
        with jax.profiler.StepTraceAnnotation("denoise", step_num=i):  # a profile's step (mm_jax.profiling)
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
