"""A ConsisID identity: the three ``ConsisIDPipeline`` face arguments, and their ``.npz`` file.

``ConsisIDIdentity`` holds exactly what diffusers' ``ConsisIDPipeline.__call__`` takes besides
the prompt, under its names: ``image`` (the aligned colour face crop on white, uint8 (H, W, 3)),
``id_cond`` ((1, LFE_id_dim): the raw antelopev2 embedding ++ the L2-normalised EVA-CLIP vector,
1280 in the release) and ``id_vit_hidden`` ((LFE_num_scale, 1, tokens, LFE_vit_dim): the EVA-CLIP
hidden states stacked, (5, 1, 577, 1024) in the release). ``sample --model consisid --save-id`` writes
it, ``--id`` reads it back (``save`` / ``load``); ``check_fits`` matches it to a transformer's config.
Computing one from a photo is ``mm_jax.consisid_faces``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

KEYS = ("image", "id_cond", "id_vit_hidden")


@dataclasses.dataclass
class ConsisIDIdentity:
    image: np.ndarray          # uint8 (H, W, 3) RGB: the aligned colour face on white
    id_cond: np.ndarray        # float32 (1, LFE_id_dim)
    id_vit_hidden: np.ndarray  # float32 (LFE_num_scale, 1, tokens, LFE_vit_dim)
    source: str | None = None  # where it came from (a photo or an .npz), for the sidecar; not saved

    def __post_init__(self):
        self.image = np.asarray(self.image)
        self.id_cond = np.asarray(self.id_cond, np.float32)
        self.id_vit_hidden = np.asarray(self.id_vit_hidden, np.float32)
        check_arrays(self.image, self.id_cond, self.id_vit_hidden, what=self.source or "identity")


def check_arrays(image: np.ndarray, id_cond: np.ndarray, id_vit_hidden: np.ndarray, what: str = "identity") -> None:
    """The arrays' kinds and ranks (not the model's widths: ``check_fits``); ``ValueError`` naming the array."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what}: 'image' must be uint8 (H, W, 3) RGB; got {image.dtype} {image.shape}")
    if id_cond.ndim != 2 or id_cond.shape[0] != 1:
        raise ValueError(f"{what}: 'id_cond' must be (1, id_dim); got {id_cond.shape}")
    if id_vit_hidden.ndim != 4 or id_vit_hidden.shape[1] != 1:
        raise ValueError(f"{what}: 'id_vit_hidden' must be (num_scale, 1, tokens, vit_dim); got {id_vit_hidden.shape}")
    for name, a in (("id_cond", id_cond), ("id_vit_hidden", id_vit_hidden)):
        if not np.isfinite(a).all():
            raise ValueError(f"{what}: '{name}' holds NaN or inf")


def check_fits(ident: ConsisIDIdentity, cfg) -> None:
    """``ident`` against a ``ConsisIDConfig``: the id width, the number of EVA scales and their
    width; ``ValueError`` naming the first that differs."""
    pairs = [("id_cond width", ident.id_cond.shape[1], "LFE_id_dim", cfg.LFE_id_dim),
             ("id_vit_hidden scales", ident.id_vit_hidden.shape[0], "LFE_num_scale", cfg.LFE_num_scale),
             ("id_vit_hidden width", ident.id_vit_hidden.shape[3], "LFE_vit_dim", cfg.LFE_vit_dim)]
    for what, have, field, want in pairs:
        if have != want:
            raise ValueError(f"{ident.source or 'identity'}: {what} is {have}; the ConsisID transformer's {field} "
                             f"is {want}")


def save(path: str | Path, ident: ConsisIDIdentity) -> None:
    """Write ``image``, ``id_cond`` and ``id_vit_hidden`` (and nothing else) to ``path`` (.npz)."""
    np.savez(path, image=ident.image, id_cond=ident.id_cond, id_vit_hidden=ident.id_vit_hidden)


def load(path: str | Path) -> ConsisIDIdentity:
    """An identity file (``save``'s, or any .npz with the three diffusers-named arrays);
    ``ValueError`` naming the file and what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise ValueError(f"missing {missing} (it holds {sorted(f.files)})")
            arrays = {k: f[k] for k in KEYS}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"--id {path}: not a ConsisID identity file ({e}); it needs {list(KEYS)} as "
                         "sample --model consisid --save-id writes them") from None
    if not np.issubdtype(arrays["id_cond"].dtype, np.floating) or \
            not np.issubdtype(arrays["id_vit_hidden"].dtype, np.floating):
        raise ValueError(f"--id {path}: 'id_cond' and 'id_vit_hidden' must be floating point")
    return ConsisIDIdentity(**arrays, source=str(path))
