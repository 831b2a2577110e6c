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


# Weight decay by parameter role (the leaf's name, ``mm_jax.models.layers``' naming) [ours; the
# design's "AdamW, wd 1e-4" names no mask]: the weight matrices decay, i.e. linear and conv
# kernels and the learned tables (``embedding``, the perceivers' learned queries ``latents``, CLIP's
# ``class_embedding``); biases, norm scales/offsets and CLIP's logit temperature do not, whatever
# their rank (stacked layers make biases and norm scales 2-D, e.g. the CAN bias (21, 43008)).
DECAYED = ("kernel", "embedding", "latents", "class_embedding")
NOT_DECAYED = ("bias", "scale", "logit_scale")


def _role(path) -> str:
    """The parameter's name: the last string key of its path (``.value`` of nnx states skipped)."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    return names[-1] if names else ""


def decay_mask(params):
    """True where weight decay applies: by the parameter's role (``DECAYED`` / ``NOT_DECAYED``),
    not its rank. A parameter of another name is an error that names it (classify it here)."""

    def decays(path, _):
        role = _role(path)
        if role in DECAYED:
            return True
        if role in NOT_DECAYED:
            return False
        raise ValueError(f"parameter {jax.tree_util.keystr(path)}: no weight-decay role for the name {role!r}; "
                         f"decayed: {', '.join(DECAYED)}; not decayed: {', '.join(NOT_DECAYED)} "
                         f"(mm_jax/training/optim.py)")

    return jax.tree_util.tree_map_with_path(decays, params)


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
