"""The training objective, as pure functions (cogvideox_reference.md 6.4; magic_mirror_reference.md 5).

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0.
The reference loss mean((x0_hat - x0)^2 / (1 - abar_t)) with x0_hat = sqrt(abar_t) x_t -
sqrt(1 - abar_t) v_hat equals the plain v-prediction MSE (x0_hat - x0 = -sqrt(1 - abar_t)(v_hat - v)),
so that is what is computed, with an optional per-element weight 1 + lambda * M_face.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def add_noise(x0: jax.Array, eps: jax.Array, abar_t: jax.Array) -> jax.Array:
    """x0, eps (B, ...), abar_t (B,) -> x_t (B, ...), in x0's dtype (arithmetic in fp32)."""
    a = abar_t.astype(jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.sqrt(a) * x0.astype(jnp.float32) + jnp.sqrt(1.0 - a) * eps.astype(jnp.float32)).astype(x0.dtype)


def velocity(x0: jax.Array, eps: jax.Array, abar_t: jax.Array) -> jax.Array:
    """The v-prediction target sqrt(abar_t) eps - sqrt(1 - abar_t) x0 (fp32)."""
    a = abar_t.astype(jnp.float32).reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.sqrt(a) * eps.astype(jnp.float32) - jnp.sqrt(1.0 - a) * x0.astype(jnp.float32)


def latent_face_mask(mask: jax.Array, latent_shape: tuple[int, int, int], temporal_ratio: int) -> jax.Array:
    """Pixel face mask (B, F, H, W) -> latent grid (B, f, h, w) by max-pooling.

    The causal VAE maps frame 0 to latent frame 0 and frames 4k-3..4k to latent frame k (ratio 4),
    so a latent frame is face wherever any of its frames is; spatially each latent cell covers an
    (H/h) x (W/w) pixel patch. F must be 1 + ratio * (f - 1).
    """
    b, F, H, W = mask.shape
    f, h, w = latent_shape
    if F != 1 + temporal_ratio * (f - 1):
        raise ValueError(f"face mask has {F} frames but {f} latent frames need {1 + temporal_ratio * (f - 1)}")
    if H % h or W % w:
        raise ValueError(f"face mask {H}x{W} is not a multiple of the latent grid {h}x{w}")
    m = mask.astype(jnp.float32).reshape(b, F, h, H // h, w, W // w).max(axis=(3, 5))  # (B, F, h, w)
    first = m[:, :1]
    if f == 1:
        return first
    rest = m[:, 1:].reshape(b, f - 1, temporal_ratio, h, w).max(axis=2)
    return jnp.concatenate([first, rest], axis=1)


def loss_weights(face_mask: jax.Array, use_face_term: jax.Array, face_lambda: float) -> jax.Array:
    """Per-element weight (B, f, h, w, 1): 1 + lambda * M_face where ``use_face_term`` (B,) else 1."""
    w = 1.0 + face_lambda * face_mask * use_face_term.astype(jnp.float32)[:, None, None, None]
    return w[..., None]


def v_loss(v_hat: jax.Array, v: jax.Array, weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Weighted v-prediction MSE: mean over the batch of the per-sample mean of w * (v_hat - v)^2.

    Returns (scalar loss, per-sample losses (B,)), fp32.
    """
    err = jnp.square(v_hat.astype(jnp.float32) - v.astype(jnp.float32))
    if weights is not None:
        err = err * weights
    per_sample = err.reshape(err.shape[0], -1).mean(axis=1)
    return per_sample.mean(), per_sample


def sample_timesteps(key: jax.Array, batch: int, num_train_timesteps: int) -> jax.Array:
    """t ~ uniform integers in [0, num_train_timesteps), (B,) int32."""
    return jax.random.randint(key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
