"""The training objective against the diffusers reference (cogvideox_reference.md 6.4) and the
face-weighting helpers against hand-computed values."""
import jax.numpy as jnp
import numpy as np
import torch

from mm_jax import schedulers as sch
from mm_jax.demo.tiny_checkpoint import SCHEDULER
from mm_jax.training import loss as L


def test_v_loss_equals_the_reference_x0_form_with_diffusers_noise_and_velocity():
    from diffusers import CogVideoXDDIMScheduler

    ref = CogVideoXDDIMScheduler.from_config({k: v for k, v in SCHEDULER.items() if k != "_class_name"})
    abar = sch.alphas_cumprod(sch.SchedulerConfig.from_dict(SCHEDULER))
    rng = np.random.default_rng(0)
    x0, eps, v_hat = (rng.standard_normal((3, 2, 4, 4, 4)).astype(np.float32) for _ in range(3))
    t = np.array([0, 500, 999])
    tx0, teps, tt = torch.from_numpy(x0), torch.from_numpy(eps), torch.from_numpy(t)
    x_t_ref = ref.add_noise(tx0, teps, tt).numpy()
    v_ref = ref.get_velocity(tx0, teps, tt).numpy()
    # the reference loss: x0_hat from the prediction, weighted by 1 / (1 - abar_t), mean per sample, then batch
    a = ref.alphas_cumprod[tt].reshape(-1, 1, 1, 1, 1).double()
    x0_hat = a.sqrt() * torch.from_numpy(x_t_ref).double() - (1 - a).sqrt() * torch.from_numpy(v_hat).double()
    loss_ref = ((x0_hat - tx0.double()) ** 2 / (1 - a)).reshape(3, -1).mean(1).mean().item()

    at = jnp.asarray(abar[t], jnp.float32)
    assert np.abs(np.asarray(L.add_noise(x0, eps, at)) - x_t_ref).max() <= 1e-5 * np.abs(x_t_ref).max()
    v = L.velocity(x0, eps, at)
    assert np.abs(np.asarray(v) - v_ref).max() <= 1e-5 * np.abs(v_ref).max()
    loss, per_sample = L.v_loss(v_hat, v)
    assert abs(float(loss) - loss_ref) <= 1e-5 * loss_ref
    assert per_sample.shape == (3,)


def test_face_mask_pools_the_causal_frame_groups_and_8x8_cells():
    mask = np.zeros((1, 9, 32, 32), np.float32)
    mask[0, 5, 8:10, 20:22] = 1  # frame 5 belongs to latent frame 2 (frames 5..8); pixels in cell (1, 2)
    mask[0, 0, 0, 0] = 1         # frame 0 is latent frame 0 alone
    got = np.asarray(L.latent_face_mask(jnp.asarray(mask), (3, 4, 4), temporal_ratio=4))
    want = np.zeros((1, 3, 4, 4), np.float32)
    want[0, 2, 1, 2] = 1
    want[0, 0, 0, 0] = 1
    np.testing.assert_array_equal(got, want)


def test_face_weight_is_one_plus_lambda_only_on_chosen_samples():
    m = jnp.ones((2, 1, 2, 2))
    w = np.asarray(L.loss_weights(m, jnp.array([True, False]), 1.0))
    assert w.shape == (2, 1, 2, 2, 1)
    np.testing.assert_array_equal(w[0], 2.0)
    np.testing.assert_array_equal(w[1], 1.0)
    v_hat, v = jnp.ones((2, 1, 2, 2, 1)), jnp.zeros((2, 1, 2, 2, 1))
    _, per_sample = L.v_loss(v_hat, v, jnp.asarray(w))
    np.testing.assert_allclose(np.asarray(per_sample), [2.0, 1.0])


def test_timesteps_cover_the_training_range():
    import jax

    t = np.asarray(L.sample_timesteps(jax.random.key(0), 20000, 1000))
    assert t.min() == 0 and t.max() == 999 and abs(t.mean() - 499.5) < 10
