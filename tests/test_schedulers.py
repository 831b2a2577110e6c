"""Our CogVideoX DDIM/DPM steps equal diffusers' at every step; guidance formulas equal the pipeline's."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mm_jax import schedulers as sch
from tests.conftest import max_rel_err

SHAPE = (1, 3, 4, 6, 5)


def _configs(shared_dir):
    cfg5b = json.loads((shared_dir / "manifests" / "cogvideox5b_scheduler_config.json").read_text())
    return {"5b": cfg5b, "2b": dict(cfg5b, snr_shift_scale=3.0)}


def _torch_scheduler(kind, hf_cfg):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    return cls.from_config({k: v for k, v in hf_cfg.items() if not k.startswith("_")})


@pytest.mark.parametrize("which", ["5b", "2b"])
@pytest.mark.parametrize("n", [50, 30])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_every_step_matches_diffusers(shared_dir, monkeypatch, kind, n, which):
    import diffusers.schedulers.scheduling_dpm_cogvideox as dpm_mod

    hf_cfg = _configs(shared_dir)[which]
    ref = _torch_scheduler(kind, hf_cfg)
    ref.set_timesteps(n)
    schedule = sch.make_schedule(sch.SchedulerConfig.from_dict(hf_cfg, kind=kind), n)
    np.testing.assert_array_equal(np.asarray(schedule.timesteps), ref.timesteps.numpy())

    drawn = []
    real_randn = dpm_mod.randn_tensor
    monkeypatch.setattr(dpm_mod, "randn_tensor", lambda *a, **k: drawn.append(real_randn(*a, **k)) or drawn[-1])
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(SHAPE, generator=g)
    x_j = jnp.asarray(x_t.numpy())
    old_t, old_j = None, jnp.zeros(SHAPE)
    step = jax.jit(sch.dpm_step) if kind == "dpm" else jax.jit(sch.ddim_step)
    worst = 0.0
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(SHAPE, generator=g)
        if kind == "ddim":
            x_t = ref.step(v, t, x_t, return_dict=False)[0]
            x_j = step(schedule, i, jnp.asarray(v.numpy()), x_j)
        else:
            drawn.clear()
            t_back = ref.timesteps[i - 1] if i > 0 else None
            x_t, old_t = ref.step(v, old_t, t, t_back, x_t, generator=g, return_dict=False)
            n1 = drawn[0].numpy()
            n2 = drawn[1].numpy() if len(drawn) > 1 else np.zeros(SHAPE, np.float32)
            assert len(drawn) == (2 if bool(schedule.second_order[i]) else 1)
            x_j, old_j = step(schedule, i, jnp.asarray(v.numpy()), x_j, old_j, n1, n2)
        assert np.all(np.isfinite(np.asarray(x_j)))
        worst = max(worst, max_rel_err(x_j, x_t.numpy()))
    assert worst <= 1e-6, worst


def test_loop_compiles_once_with_a_traced_step_index(shared_dir):
    schedule = sch.make_schedule(sch.SchedulerConfig.from_dict(_configs(shared_dir)["5b"]), 50)
    traces = []

    @jax.jit
    def run(x):
        traces.append(1)
        return jax.lax.fori_loop(0, 50, lambda i, x: sch.ddim_step(schedule, i, 0.1 * x, x), x)

    x = jnp.ones(SHAPE)
    y = run(x)
    ref = x
    for i in range(50):
        ref = sch.ddim_step(schedule, i, 0.1 * ref, ref)
    assert len(traces) == 1 and max_rel_err(y, ref) <= 1e-6


def test_dynamic_guidance_is_the_reference_formula_on_raw_timesteps(shared_dir):
    ts = sch.timesteps(sch.SchedulerConfig.from_dict(_configs(shared_dir)["5b"]), 50)
    ours = [sch.dynamic_guidance_scale(6.0, int(t), 50) for t in ts[:8]]
    # the formula as written in diffusers' CogVideoXPipeline.__call__ (t.item() is the timestep value)
    ref = [1 + 6.0 * ((1 - math.cos(math.pi * ((50 - t.item()) / 50) ** 5.0)) / 2) for t in torch.from_numpy(ts[:8])]
    np.testing.assert_allclose(ours, ref, rtol=1e-12)
    np.testing.assert_allclose(ours, [2.2915, 2.5435, 6.9744, 6.4204, 2.7881, 4.2719, 1.0376, 4.1704], atol=1e-4)


def test_bad_scheduler_settings_are_named():
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        sch.SchedulerConfig(prediction_type="sample").validate()
    with pytest.raises(ValueError, match="num_steps=0"):
        sch.make_schedule(sch.SchedulerConfig(), 0)
