"""CogVideoX DDIM and DPM samplers as pure functions (diffusers ``CogVideoXDDIMScheduler`` /
``CogVideoXDPMScheduler``), and classifier-free guidance.

The noise schedule and every per-step multiplier are computed once on the host in float64
(including the +-inf arithmetic of the zero-terminal-SNR edges, which resolves to finite
multipliers), cast to float32 like the reference's 0-d float64 tensors are when they multiply
fp32 latents, and stored in a ``Schedule`` pytree. A step on the device is then a few fused
multiply-adds indexed by the (traced) step number, so a whole loop compiles once.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

CLASS_KINDS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """diffusers ``scheduler_config.json`` fields (the ones that change the numbers) + ``kind``."""
    kind: str = "ddim"
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    prediction_type: str = "v_prediction"
    rescale_betas_zero_snr: bool = True
    snr_shift_scale: float = 1.0
    set_alpha_to_one: bool = True
    timestep_spacing: str = "trailing"
    steps_offset: int = 0

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "SchedulerConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "kind" not in overrides and "_class_name" in d:
            kw["kind"] = CLASS_KINDS.get(d["_class_name"], "ddim")
        kw.update(overrides)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        allowed = {"kind": ("ddim", "dpm"), "beta_schedule": ("scaled_linear", "linear"),
                   "prediction_type": ("v_prediction", "epsilon"),
                   "timestep_spacing": ("trailing", "leading", "linspace")}
        for field, ok in allowed.items():
            if getattr(self, field) not in ok:
                raise ValueError(f"scheduler {field}={getattr(self, field)!r}: supported {list(ok)}")


def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """abar (num_train_timesteps,) float64: betas -> cumprod -> SNR shift -> zero terminal SNR."""
    n = cfg.num_train_timesteps
    if cfg.beta_schedule == "scaled_linear":
        betas = np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n, dtype=np.float64) ** 2
    else:  # the reference builds the linear schedule in float32
        betas = np.linspace(cfg.beta_start, cfg.beta_end, n, dtype=np.float32).astype(np.float64)
    abar = np.cumprod(1.0 - betas)
    s = cfg.snr_shift_scale
    abar = abar / (s + (1 - s) * abar)
    if cfg.rescale_betas_zero_snr:
        q = np.sqrt(abar)
        q0, qt = q[0], q[-1]
        q = (q - qt) * (q0 / (q0 - qt))
        abar = q ** 2
    return abar


def timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    n = cfg.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps={num_steps}: must be between 1 and {n}")
    if cfg.timestep_spacing == "trailing":
        return np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    if cfg.timestep_spacing == "leading":
        return (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    return np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)


@flax.struct.dataclass
class Schedule:
    """Per-step constants of one sampling run, indexed by the step number i (all shape (n,))."""
    timesteps: jax.Array      # int32
    c_x: jax.Array            # x0 = c_x * x - c_v * v   (v-prediction; epsilon: see make_schedule)
    c_v: jax.Array
    ddim_a: jax.Array         # DDIM: x_prev = a * x + b * x0
    ddim_b: jax.Array
    m1: jax.Array             # DPM: x_prev = m1 * x - m2 * d + m_noise * noise
    m2: jax.Array
    m3: jax.Array             # d = m3 * x0 - m4 * x0_old on second-order steps, else d = x0
    m4: jax.Array
    m_noise: jax.Array
    second_order: jax.Array   # bool


def make_schedule(cfg: SchedulerConfig, num_steps: int) -> Schedule:
    """All per-step multipliers for ``num_steps`` steps (float64 on the host, stored float32)."""
    abar = alphas_cumprod(cfg)
    ts = timesteps(cfg, num_steps)
    final = 1.0 if cfg.set_alpha_to_one else float(abar[0])
    stride = cfg.num_train_timesteps // num_steps  # prev = t - stride, not the next list entry
    rows = []
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i, t in enumerate(ts):
            prev = int(t) - stride
            a_t = abar[t]
            a_prev = abar[prev] if prev >= 0 else np.float64(final)
            if cfg.prediction_type == "v_prediction":
                c_x, c_v = a_t ** 0.5, (1 - a_t) ** 0.5
            else:  # epsilon: x0 = (x - sqrt(1-a) eps) / sqrt(a)
                c_x, c_v = 1 / a_t ** 0.5, (1 - a_t) ** 0.5 / a_t ** 0.5
            ddim_a = ((1 - a_prev) / (1 - a_t)) ** 0.5
            ddim_b = a_prev ** 0.5 - a_t ** 0.5 * ddim_a
            lam = np.log((a_t / (1 - a_t)) ** 0.5)
            lam_next = np.log((a_prev / (1 - a_prev)) ** 0.5)
            h = lam_next - lam
            m1 = ((1 - a_prev) / (1 - a_t)) ** 0.5 * np.exp(-h)
            m2 = np.expm1(-2 * h) * a_prev ** 0.5
            m_noise = (1 - a_prev) ** 0.5 * (1 - np.exp(-2 * h)) ** 0.5
            second = i > 0 and prev >= 0
            m3, m4 = 1.0, 0.0
            if second:
                a_back = abar[ts[i - 1]]
                r = (lam - np.log((a_back / (1 - a_back)) ** 0.5)) / h
                m3, m4 = 1 + 1 / (2 * r), 1 / (2 * r)
            rows.append((c_x, c_v, ddim_a, ddim_b, m1, m2, m3, m4, m_noise, second))
    cols = list(zip(*rows))
    f32 = lambda c: jnp.asarray(np.asarray(c, np.float64).astype(np.float32))
    out = Schedule(jnp.asarray(ts.astype(np.int32)), *(f32(c) for c in cols[:9]), jnp.asarray(np.asarray(cols[9], bool)))
    bad = [name for name, arr in zip(("c_x", "c_v", "ddim_a", "ddim_b", "m1", "m2", "m3", "m4", "m_noise"), cols[:9])
           if cfg.kind == ("ddim" if name.startswith(("c_", "ddim")) else "dpm") and not np.all(np.isfinite(arr))]
    if bad:
        raise ValueError(f"schedule has non-finite multipliers {bad} for {num_steps} steps")
    return out


def predicted_x0(schedule: Schedule, i, model_output: jax.Array, x: jax.Array) -> jax.Array:
    return schedule.c_x[i] * x - schedule.c_v[i] * model_output


def ddim_step(schedule: Schedule, i, model_output: jax.Array, x: jax.Array) -> jax.Array:
    """Deterministic CogVideoX DDIM step i: x_t -> x_prev (the reference ignores eta)."""
    x0 = predicted_x0(schedule, i, model_output, x)
    return schedule.ddim_a[i] * x + schedule.ddim_b[i] * x0


def dpm_step(schedule: Schedule, i, model_output: jax.Array, x: jax.Array, x0_old: jax.Array,
             noise1: jax.Array, noise2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CogVideoX DPM step i -> (x_prev, x0). ``x0_old`` is the previous step's x0 (ignored at i=0).

    The reference always draws ``noise1``; on second-order steps (not the first, not the last)
    it draws ``noise2`` too and uses that one. Pass both; the step picks.
    """
    x0 = predicted_x0(schedule, i, model_output, x)
    second = schedule.second_order[i]
    d = jnp.where(second, schedule.m3[i] * x0 - schedule.m4[i] * x0_old, x0)
    noise = jnp.where(second, noise2, noise1)
    return schedule.m1[i] * x - schedule.m2[i] * d + schedule.m_noise[i] * noise, x0


def init_latents(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Initial noise (init_noise_sigma is 1 for both samplers)."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def dynamic_guidance_scale(guidance_scale: float, t: int, num_steps: int) -> float:
    """The reference's cosine schedule, on the raw timestep value t (not the step index)."""
    return 1 + guidance_scale * (1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2


def cfg_combine(v_uncond: jax.Array, v_text: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: v_uncond + scale * (v_text - v_uncond)."""
    return v_uncond + scale * (v_text - v_uncond)
