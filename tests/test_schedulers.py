"""Our CogVideoX DDIM/DPM steps equal diffusers' at every step; guidance equals the pipeline's."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mm_jax import schedulers as sch
from tests.conftest import max_rel_err

SHAPE = (1, 3, 4, 6, 5)
TOL = 1e-6
# settings other than the 5B/2B ones, each a change the code handles
OTHER = {
    "epsilon_leading_offset": dict(prediction_type="epsilon", rescale_betas_zero_snr=False, snr_shift_scale=3.0,
                                   timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False),
    "linspace_shift2": dict(timestep_spacing="linspace", snr_shift_scale=2.0),
}


def _configs(manifests_dir):
    cfg5b = json.loads((manifests_dir / "cogvideox5b_scheduler_config.json").read_text())
    return {"5b": cfg5b, "2b": dict(cfg5b, snr_shift_scale=3.0), **{k: dict(cfg5b, **v) for k, v in OTHER.items()}}


def _torch_scheduler(kind, hf_cfg, n):
    from diffusers import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

    cls = CogVideoXDDIMScheduler if kind == "ddim" else CogVideoXDPMScheduler
    ref = cls.from_config({k: v for k, v in hf_cfg.items() if not k.startswith("_")})
    ref.set_timesteps(n)
    return ref


def _reference_run(monkeypatch, kind, hf_cfg, n, seed=0):
    """diffusers' loop on random v per step; returns x_T, per-step (v, noise1, noise2, x_prev) and timesteps.

    DPM's draws are recorded by wrapping the ``randn_tensor`` its module calls (1 on the first and
    last step, 2 on the others); an undrawn ``noise2`` is zeros.
    """
    import diffusers.schedulers.scheduling_dpm_cogvideox as dpm_mod

    drawn = []
    real_randn = dpm_mod.randn_tensor
    monkeypatch.setattr(dpm_mod, "randn_tensor", lambda *a, **k: drawn.append(real_randn(*a, **k)) or drawn[-1])
    ref = _torch_scheduler(kind, hf_cfg, n)
    g_data, g_sched = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    x = x_init = torch.randn(SHAPE, generator=g_data)
    old, steps = None, []
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(SHAPE, generator=g_data)
        drawn.clear()
        if kind == "ddim":
            x = ref.step(v, t, x, return_dict=False)[0]
        else:
            x, old = ref.step(v, old, t, ref.timesteps[i - 1] if i > 0 else None, x, generator=g_sched,
                              return_dict=False)
        noise = [d.numpy() for d in drawn] + [np.zeros(SHAPE, np.float32)] * (2 - len(drawn))
        steps.append(dict(v=v.numpy(), n1=noise[0], n2=noise[1], x=x.numpy(), draws=len(drawn)))
    return x_init.numpy(), steps, ref


def _our_steps(kind, schedule, x, steps):
    """Our jitted step applied along the reference's inputs, carrying our own state; yields x_prev."""
    step = jax.jit(sch.ddim_step if kind == "ddim" else sch.dpm_step)
    x, x0 = jnp.asarray(x), jnp.zeros(SHAPE)
    for i, s in enumerate(steps):
        if kind == "ddim":
            x = step(schedule, i, s["v"], x)
        else:
            x, x0 = step(schedule, i, s["v"], x, x0, s["n1"], s["n2"])
        yield x


def _worst_step_error(monkeypatch, manifests_dir, kind, which, n):
    hf_cfg = _configs(manifests_dir)[which]
    x_init, steps, ref = _reference_run(monkeypatch, kind, hf_cfg, n)
    schedule = sch.make_schedule(sch.SchedulerConfig.from_dict(hf_cfg, kind=kind), n)
    errs = []
    for i, (ours, s) in enumerate(zip(_our_steps(kind, schedule, x_init, steps), steps)):
        assert np.all(np.isfinite(np.asarray(ours))), i
        if kind == "dpm":
            assert s["draws"] == (2 if bool(schedule.second_order[i]) else 1), i
        errs.append(max_rel_err(ours, s["x"]))
    return max(errs)


@pytest.mark.parametrize("which", ["5b", "2b"])
@pytest.mark.parametrize("n", [50, 30])
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_every_step_matches_diffusers(manifests_dir, monkeypatch, kind, n, which):
    worst = _worst_step_error(monkeypatch, manifests_dir, kind, which, n)
    print(f"{kind} {which} n={n}: worst per-step max rel err {worst:.2e}")
    assert worst <= TOL, worst


@pytest.mark.parametrize("which", list(OTHER))
@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_other_settings_match_diffusers(manifests_dir, monkeypatch, kind, which):
    worst = _worst_step_error(monkeypatch, manifests_dir, kind, which, 30)
    print(f"{kind} {which} n=30: worst per-step max rel err {worst:.2e}")
    assert worst <= TOL, worst


@pytest.mark.parametrize("which", ["5b", "2b", *OTHER])
@pytest.mark.parametrize("n", [50, 30, 7, 1])
def test_timesteps_and_tables_match_diffusers(manifests_dir, which, n):
    hf_cfg = _configs(manifests_dir)[which]
    ref = _torch_scheduler("dpm", hf_cfg, n)
    s = sch.make_schedule(sch.SchedulerConfig.from_dict(hf_cfg, kind="dpm"), n)
    ts = ref.timesteps.numpy()
    np.testing.assert_array_equal(np.asarray(s.timesteps), ts)
    prev = ts - hf_cfg["num_train_timesteps"] // n  # the reference's step(), not the next list entry
    np.testing.assert_array_equal(np.asarray(s.prev_timesteps), prev)
    np.testing.assert_array_equal(np.asarray(s.t_back), np.r_[-1, ts[:-1]])
    abar = ref.alphas_cumprod.double().numpy()
    a_prev = np.where(prev >= 0, abar[np.maximum(prev, 0)], float(ref.final_alpha_cumprod))
    assert max_rel_err(s.alphas_cumprod_t, abar[ts]) <= TOL
    assert max_rel_err(s.alphas_cumprod_prev, a_prev) <= TOL


@pytest.mark.parametrize("n", [50, 30])
def test_dpm_multipliers_equal_the_references_at_the_infinite_edges(manifests_dir, n):
    """diffusers' own get_variables/get_mult on each step (t=999: abar=0; i=1: r=inf; last: prev<0)."""
    ref = _torch_scheduler("dpm", _configs(manifests_dir)["5b"], n)
    s = sch.make_schedule(sch.SchedulerConfig.from_dict(_configs(manifests_dir)["5b"], kind="dpm"), n)
    ts = ref.timesteps
    for i, t in enumerate(ts):
        prev = int(t) - 1000 // n
        a_t = ref.alphas_cumprod[t]
        a_prev = ref.alphas_cumprod[prev] if prev >= 0 else ref.final_alpha_cumprod
        a_back = ref.alphas_cumprod[ts[i - 1]] if i > 0 else None
        h, r, _, _ = ref.get_variables(a_t, a_prev, a_back)
        mult = ref.get_mult(h, r, a_t, a_prev, a_back)
        noise = (1 - a_prev) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        ours = [s.m1[i], s.m2[i], s.m_noise[i]] + ([s.m3[i], s.m4[i]] if s.second_order[i] else [])
        theirs = [mult[0], mult[1], noise] + (list(mult[2:]) if s.second_order[i] else [])
        np.testing.assert_allclose(np.float64(ours), np.float64(theirs), rtol=1e-6, atol=1e-7, err_msg=f"step {i}")
    assert float(s.m1[0]) == 0 and float(s.m3[1]) == 1 and float(s.m4[1]) == 0
    assert (float(s.m1[-1]), float(s.m2[-1]), float(s.m_noise[-1])) == (0.0, -1.0, 0.0)


@pytest.mark.parametrize("kind", ["ddim", "dpm"])
def test_fori_loop_compiles_once_and_ends_where_diffusers_does(manifests_dir, monkeypatch, kind):
    n = 30
    hf_cfg = _configs(manifests_dir)["5b"]
    x_init, steps, _ = _reference_run(monkeypatch, kind, hf_cfg, n)
    schedule = sch.make_schedule(sch.SchedulerConfig.from_dict(hf_cfg, kind=kind), n)
    vs, n1s, n2s = (jnp.asarray(np.stack([s[k] for s in steps])) for k in ("v", "n1", "n2"))
    traces = []

    @jax.jit
    def run(schedule, x, vs, n1s, n2s):
        traces.append(1)

        def body(i, carry):  # i is traced: every per-step constant is an array lookup
            x, x0 = carry
            if kind == "ddim":
                return sch.ddim_step(schedule, i, vs[i], x), x0
            return sch.dpm_step(schedule, i, vs[i], x, x0, n1s[i], n2s[i])

        return jax.lax.fori_loop(0, n, body, (x, jnp.zeros_like(x)))[0]

    out = run(schedule, jnp.asarray(x_init), vs, n1s, n2s)
    run(schedule, jnp.asarray(x_init) + 1, vs * 2, n1s, n2s)
    assert len(traces) == 1
    assert max_rel_err(out, steps[-1]["x"]) <= TOL


def test_dpm_noise_is_per_step_deterministic_and_traceable():
    key = jax.random.key(0)
    a1, a2 = sch.dpm_noise(key, 3, (2, 5))
    b1, b2 = jax.jit(sch.dpm_noise, static_argnums=2)(key, jnp.int32(3), (2, 5))
    c1, _ = sch.dpm_noise(key, 4, (2, 5))
    np.testing.assert_array_equal(a1, b1)
    np.testing.assert_array_equal(a2, b2)
    assert a1.dtype == jnp.float32 and not np.allclose(a1, a2) and not np.allclose(a1, c1)


def test_init_latents_is_standard_normal_in_the_requested_dtype():
    x = sch.init_latents(jax.random.key(1), (4, 64, 64), jnp.bfloat16)
    assert x.dtype == jnp.bfloat16 and x.shape == (4, 64, 64)
    xf = np.asarray(x, np.float32)
    assert abs(xf.mean()) < 0.02 and abs(xf.std() - 1) < 0.02


def test_dynamic_cfg_and_combine_equal_the_diffusers_pipeline(manifests_dir):
    """Run diffusers' CogVideoXPipeline (1-layer DiT, latents out) with use_dynamic_cfg: record the
    scale it sets at each step and the guided v it hands to the scheduler."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    dit = CogVideoXTransformer3DModel(num_attention_heads=1, attention_head_dim=16, in_channels=4, out_channels=4,
                                      num_layers=1, text_embed_dim=16, time_embed_dim=8, sample_width=2,
                                      sample_height=2, sample_frames=5, max_text_seq_length=3,
                                      use_rotary_positional_embeddings=False).eval()
    hf_cfg = _configs(manifests_dir)["5b"]
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=dit,
                             scheduler=CogVideoXDDIMScheduler.from_config(hf_cfg))
    pipe.set_progress_bar_config(disable=True)
    dit_out, guided, scales = [], [], []
    dit.register_forward_hook(lambda m, a, o: dit_out.append(o[0].float().numpy()))
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda v, *a, **k: guided.append(v.numpy()) or step(v, *a, **k)
    pipe(prompt_embeds=torch.randn(1, 3, 16), negative_prompt_embeds=torch.randn(1, 3, 16), num_frames=5,
         height=16, width=16, num_inference_steps=50, guidance_scale=6.0, use_dynamic_cfg=True,
         output_type="latent", callback_on_step_end=lambda p, i, t, kw: scales.append(p.guidance_scale) or {})

    ts = sch.make_schedule(sch.SchedulerConfig.from_dict(hf_cfg), 50).timesteps
    ours = [sch.dynamic_guidance_scale(6.0, int(t), 50) for t in ts]
    np.testing.assert_allclose(ours, scales, rtol=1e-12)
    np.testing.assert_allclose(ours[:8], [2.2915, 2.5435, 6.9744, 6.4204, 2.7881, 4.2719, 1.0376, 4.1704], atol=1e-4)
    for g, out, ref in zip(ours, dit_out, guided):
        assert max_rel_err(sch.cfg_combine(out[:1], out[1:], g), ref) <= TOL


def test_bad_scheduler_settings_are_named(manifests_dir):
    cfg5b = _configs(manifests_dir)["5b"]
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        sch.SchedulerConfig.from_dict(dict(cfg5b, prediction_type="sample"))
    with pytest.raises(ValueError, match="_class_name='DDIMScheduler'"):
        sch.SchedulerConfig.from_dict(dict(cfg5b, _class_name="DDIMScheduler"))
    with pytest.raises(ValueError, match="beta_schedule='linear'"):  # float32 in the reference, see validate()
        sch.SchedulerConfig.from_dict(dict(cfg5b, beta_schedule="linear"))
    with pytest.raises(ValueError, match="trained_betas"):
        sch.SchedulerConfig.from_dict(dict(cfg5b, trained_betas=[0.1] * 1000))
    with pytest.raises(ValueError, match="num_steps=0"):
        sch.make_schedule(sch.SchedulerConfig(), 0)
    with pytest.raises(ValueError, match="zero divisors"):  # epsilon divides by sqrt(abar[999]) = 0
        sch.make_schedule(sch.SchedulerConfig(prediction_type="epsilon"), 50)
    assert sch.SchedulerConfig.from_dict(cfg5b).kind == "ddim"
    assert sch.SchedulerConfig.from_dict(dict(cfg5b, _class_name="CogVideoXDPMScheduler")).kind == "dpm"
