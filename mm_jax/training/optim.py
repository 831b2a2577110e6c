"""The optimizer: AdamW with linear warmup and global-norm clipping (magic_mirror_reference.md 5)."""
from __future__ import annotations

import jax
import optax


def learning_rate(cfg) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.lr`` over ``cfg.warmup_steps``, then constant."""
    if cfg.warmup_steps <= 0:
        return optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps),
                                 optax.constant_schedule(cfg.lr)], [cfg.warmup_steps])


def decay_mask(params):
    """Weight decay on matrices only [ours]: biases, norms' scales and 1-D tables are not decayed."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg) -> optax.GradientTransformation:
    """``cfg``: lr, b1, b2, eps, weight_decay, warmup_steps, grad_clip (<= 0 disables clipping)."""
    for name in ("lr", "b1", "b2", "eps", "weight_decay", "warmup_steps", "grad_clip"):
        if name not in cfg:
            raise ValueError(f"optimizer config lacks {name!r}")
    if cfg.lr <= 0:
        raise ValueError(f"optimizer.lr={cfg.lr}: must be positive")
    adamw = optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    if cfg.grad_clip and cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
    return adamw
