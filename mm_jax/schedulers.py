"""CogVideoX DDIM and DPM samplers as pure functions (diffusers ``CogVideoXDDIMScheduler`` /
``CogVideoXDPMScheduler``), and classifier-free guidance.

The noise schedule and every per-step multiplier are computed once on the host in float64
(including the +-inf arithmetic of the zero-terminal-SNR edges, which resolves to finite
multipliers), cast to float32 like the reference's 0-d float64 tensors are when they multiply
fp32 latents, and stored in a ``Schedule`` pytree. A step on the device is then a few fused
multiply-adds indexed by the (traced) step number, so a whole loop compiles once:

    schedule = make_schedule(SchedulerConfig.from_dict(json.load(f)), 50)
    x = init_latents(key, shape)
    x = lax.fori_loop(0, 50, lambda i, x: ddim_step(schedule, i, model(x, schedule.timesteps[i]), x), x)
"""
from __future__ import annotations

import dataclasses
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

CLASS_KINDS = {"CogVideoXDDIMScheduler": "ddim", "CogVideoXDPMScheduler": "dpm"}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """diffusers ``scheduler_config.json`` fields (the ones that change the numbers) + ``kind``.

    ``clip_sample`` and its ranges are ignored, as the CogVideoX schedulers ignore them.
    """
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
        """From a diffusers ``scheduler_config.json`` dict; ``kind`` defaults from ``_class_name``."""
        if d.get("trained_betas") is not None:
            raise ValueError("scheduler trained_betas is set: only beta_schedule-generated betas are supported")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "kind" not in overrides and "_class_name" in d:
            if d["_class_name"] not in CLASS_KINDS:
                raise ValueError(f"scheduler _class_name={d['_class_name']!r}: supported {list(CLASS_KINDS)} "
                                 "(or pass kind='ddim'|'dpm')")
            kw["kind"] = CLASS_KINDS[d["_class_name"]]
        kw.update(overrides)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        # "linear" is left out on purpose: the reference builds it in float32, whose platform-dependent
        # rounding we cannot reproduce to 1e-6 (measured 1.5e-6); scaled_linear is float64 there.
        allowed = {"kind": ("ddim", "dpm"), "beta_schedule": ("scaled_linear",),
                   "prediction_type": ("v_prediction", "epsilon"),
                   "timestep_spacing": ("trailing", "leading", "linspace")}
        for field, ok in allowed.items():
            if getattr(self, field) not in ok:
                raise ValueError(f"scheduler {field}={getattr(self, field)!r}: supported {list(ok)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"scheduler num_train_timesteps={self.num_train_timesteps}: must be >= 2")
        if not self.snr_shift_scale > 0:
            raise ValueError(f"scheduler snr_shift_scale={self.snr_shift_scale}: must be > 0")


# ----------------------------------------------------------------------------- host: the noise schedule

def alphas_cumprod(cfg: SchedulerConfig) -> np.ndarray:
    """abar (num_train_timesteps,) float64: betas -> cumprod -> SNR shift -> zero terminal SNR."""
    n, s = cfg.num_train_timesteps, cfg.snr_shift_scale
    abar = np.cumprod(1.0 - np.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, n) ** 2)
    abar = abar / (s + (1 - s) * abar)  # SD3-style SNR shift; identity for s = 1 (5B), 2B uses 3
    if cfg.rescale_betas_zero_snr:  # on sqrt(abar): shift so abar[-1] = 0, scale so abar[0] is kept
        q = np.sqrt(abar)
        q0, qt = q[0], q[-1]
        abar = ((q - qt) * (q0 / (q0 - qt))) ** 2
    return abar


def timesteps(cfg: SchedulerConfig, num_steps: int) -> np.ndarray:
    """The reference's ``set_timesteps`` (int64, descending)."""
    n = cfg.num_train_timesteps
    if not 1 <= num_steps <= n:
        raise ValueError(f"num_steps={num_steps}: must be between 1 and num_train_timesteps={n}")
    if cfg.timestep_spacing == "trailing":
        ts = np.round(np.arange(n, 0, -n / num_steps)).astype(np.int64) - 1
    elif cfg.timestep_spacing == "leading":
        ts = (np.arange(0, num_steps) * (n // num_steps)).round()[::-1].astype(np.int64) + cfg.steps_offset
    else:
        ts = np.linspace(0, n - 1, num_steps).round()[::-1].astype(np.int64)
    if ts.max() >= n or ts.min() < 0:
        raise ValueError(f"steps_offset={cfg.steps_offset} with num_steps={num_steps} gives timesteps outside "
                         f"[0, {n - 1}]: {ts.min()}..{ts.max()}")
    return ts


@flax.struct.dataclass
class Schedule:
    """Per-step constants of one sampling run, indexed by the step number i (all shape (n,)).

    For reading: ``timesteps``, ``prev_timesteps`` (t - num_train_timesteps // n, may be < 0),
    ``t_back`` (the previous list entry, -1 at i = 0), ``alphas_cumprod_t`` and
    ``alphas_cumprod_prev`` (1.0, or abar[0] without set_alpha_to_one, where prev < 0).
    The steps use only the multipliers below.
    """
    timesteps: jax.Array            # int32
    prev_timesteps: jax.Array       # int32
    t_back: jax.Array               # int32
    alphas_cumprod_t: jax.Array
    alphas_cumprod_prev: jax.Array
    c_x: jax.Array                  # x0 = (c_x * x - c_v * model_output) / c_d
    c_v: jax.Array
    c_d: jax.Array
    ddim_a: jax.Array               # DDIM: x_prev = a * x + b * x0
    ddim_b: jax.Array
    m1: jax.Array                   # DPM: x_prev = m1 * x - m2 * d + m_noise * noise
    m2: jax.Array
    m3: jax.Array                   # d = m3 * x0 - m4 * x0_old on second-order steps, else d = x0
    m4: jax.Array
    m_noise: jax.Array
    second_order: jax.Array         # bool: not the first step and prev >= 0


def _lam(a):
    """log-SNR as the reference writes it; log(0) = -inf at abar = 0, +inf at abar = 1."""
    return np.log(np.sqrt(a / (1 - a)))


def step_constants(abar: np.ndarray, ts: np.ndarray, stride: int, final: float, prediction_type: str) -> dict:
    """float64 per-step multipliers, the reference's formulas with IEEE infinities.

    Edges with zero terminal SNR: at t = 999 abar_t = 0 (lam = -inf, h = +inf -> m1 = 0); at
    i = 1 t_back = 999 (r = +inf -> m3 = 1, m4 = 0); on the last step prev < 0, abar_prev = 1
    (lam_next = +inf -> m1 = 0, m2 = -1, m_noise = 0, so x_prev = x0).
    """
    prev = ts - stride
    a_t = abar[ts]
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    if prediction_type == "v_prediction":  # x0 = sqrt(a) x - sqrt(1 - a) v
        c_x, c_v, c_d = np.sqrt(a_t), np.sqrt(1 - a_t), np.ones_like(a_t)
    else:  # epsilon: x0 = (x - sqrt(1 - a) eps) / sqrt(a), divided as the reference does (rounding)
        c_x, c_v, c_d = np.ones_like(a_t), np.sqrt(1 - a_t), np.sqrt(a_t)
    ddim_a = np.sqrt((1 - a_prev) / (1 - a_t))
    lam, lam_next = _lam(a_t), _lam(a_prev)
    h = lam_next - lam
    second = (np.arange(len(ts)) > 0) & (prev >= 0)
    r = (lam - np.concatenate([[np.nan], lam[:-1]])) / h  # t_back = ts[i-1], so lam_back = lam[i-1]
    return dict(
        alphas_cumprod_t=a_t, alphas_cumprod_prev=a_prev, c_x=c_x, c_v=c_v, c_d=c_d,
        ddim_a=ddim_a, ddim_b=np.sqrt(a_prev) - np.sqrt(a_t) * ddim_a,
        m1=np.sqrt((1 - a_prev) / (1 - a_t)) * np.exp(-h),
        m2=np.expm1(-2 * h) * np.sqrt(a_prev),
        m3=np.where(second, 1 + 1 / (2 * r), 1.0),
        m4=np.where(second, 1 / (2 * r), 0.0),
        m_noise=np.sqrt(1 - a_prev) * np.sqrt(1 - np.exp(-2 * h)),
        second_order=second,
    )


def make_schedule(cfg: SchedulerConfig, num_steps: int) -> Schedule:
    """All per-step constants for ``num_steps`` steps (float64 on the host, stored float32)."""
    abar = alphas_cumprod(cfg)
    ts = timesteps(cfg, num_steps)
    final = 1.0 if cfg.set_alpha_to_one else float(abar[0])
    stride = cfg.num_train_timesteps // num_steps  # prev = t - stride, not the next list entry
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        c = step_constants(abar, ts, stride, final, cfg.prediction_type)
    bad = {k: np.nonzero(~np.isfinite(v) | ((v == 0) & (k == "c_d")))[0].tolist()
           for k, v in c.items() if v.dtype != bool}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise ValueError(f"scheduler with prediction_type={cfg.prediction_type!r}, rescale_betas_zero_snr="
                         f"{cfg.rescale_betas_zero_snr}, num_steps={num_steps} has non-finite multipliers or "
                         f"zero divisors (name: steps) {bad}; epsilon prediction divides by sqrt(abar_t), "
                         "so it needs rescale_betas_zero_snr=False")
    i32 = lambda a: jnp.asarray(np.asarray(a, np.int32))
    return Schedule(timesteps=i32(ts), prev_timesteps=i32(ts - stride), t_back=i32(np.r_[-1, ts[:-1]]),
                    second_order=jnp.asarray(c.pop("second_order")),
                    **{k: jnp.asarray(v.astype(np.float32)) for k, v in c.items()})


# ----------------------------------------------------------------------------- device: the steps

def predicted_x0(schedule: Schedule, i, model_output: jax.Array, x: jax.Array) -> jax.Array:
    return (schedule.c_x[i] * x - schedule.c_v[i] * model_output) / schedule.c_d[i]


def ddim_step(schedule: Schedule, i, model_output: jax.Array, x: jax.Array) -> jax.Array:
    """Deterministic CogVideoX DDIM step i: x_t -> x_prev, any shape (the reference ignores eta)."""
    x0 = predicted_x0(schedule, i, model_output, x)
    return schedule.ddim_a[i] * x + schedule.ddim_b[i] * x0


def dpm_step(schedule: Schedule, i, model_output: jax.Array, x: jax.Array, x0_old: jax.Array,
             noise1: jax.Array, noise2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CogVideoX DPM step i -> (x_prev, x0). ``x0_old`` is the previous step's x0 (ignored at i=0).

    The reference always draws ``noise1``; on second-order steps (not the first, not the last)
    it draws ``noise2`` too and uses that one. Pass both (``dpm_noise``); the step picks.
    """
    x0 = predicted_x0(schedule, i, model_output, x)
    second = schedule.second_order[i]
    d = jnp.where(second, schedule.m3[i] * x0 - schedule.m4[i] * x0_old, x0)
    noise = jnp.where(second, noise2, noise1)
    return schedule.m1[i] * x - schedule.m2[i] * d + schedule.m_noise[i] * noise, x0


def dpm_noise(key: jax.Array, i, shape) -> tuple[jax.Array, jax.Array]:
    """The two float32 N(0, I) draws of DPM step i, from ``fold_in(key, i)`` (traced i is fine)."""
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    return jax.random.normal(k1, shape, jnp.float32), jax.random.normal(k2, shape, jnp.float32)


def init_latents(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
    """Initial noise (init_noise_sigma is 1 for both samplers)."""
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------- guidance

def dynamic_guidance_scale(guidance_scale: float, t: int, num_steps: int) -> float:
    """The reference pipeline's cosine schedule on the raw timestep value t (999..), not the step
    index: (n - t) / n is very negative, so the scale oscillates, as the CogVideo authors intend."""
    return 1 + guidance_scale * (1 - math.cos(math.pi * ((num_steps - t) / num_steps) ** 5.0)) / 2


def cfg_combine(v_uncond: jax.Array, v_text: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: v_uncond + scale * (v_text - v_uncond)."""
    return v_uncond + scale * (v_text - v_uncond)
