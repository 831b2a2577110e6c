"""Identity conditioning for sampling: the reference face's embeddings and the adapter's hook-up.

``compute`` runs the face front end (ArcFace e_id + CLIP crop) and the CLIP tower once per
reference image; ``save``/``load`` keep the result in an .npz so later runs skip both. ``prepare``
fuses the identity into the prompt embedding at the class word and builds the CFG batch of
section 4 of the design: [negative prompt, no face | fused prompt, face tokens, CAN on].
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import checkpoint


@dataclasses.dataclass
class Identity:
    e_id: np.ndarray          # (512,) L2-normalized ArcFace embedding
    clip_hidden: np.ndarray   # (P, clip_width) penultimate CLIP states of the face crop
    adapter_dir: Path         # mm_jax checkpoint folder holding the "adapter" component
    source: str = ""


def component_dir(name: str, *dirs) -> Path:
    """The first of ``dirs`` (mm_jax checkpoint folders) that holds component ``name``."""
    for d in dirs:
        if d is not None and (Path(d) / name / "config.json").exists():
            return Path(d)
    raise FileNotFoundError(f"no {name!r} component in {[str(d) for d in dirs if d is not None]}")


def compute(ref_image, face_models: str | Path, clip_ckpt: str | Path, adapter_dir: str | Path, *,
            mesh=None) -> Identity:
    """Detect/align/embed the largest face of ``ref_image`` and run the CLIP tower on its crop."""
    from mm_jax.face import FaceAnalyzer

    face = FaceAnalyzer(face_models).analyze(ref_image)
    clip = checkpoint.load_component(clip_ckpt, "image_encoder", mesh=mesh)
    hidden = np.asarray(clip(face.clip_crop[None]))[0]
    return Identity(face.embedding, hidden, Path(adapter_dir), str(ref_image))


def save(path: str | Path, ident: Identity) -> None:
    np.savez(path, e_id=ident.e_id, clip_hidden=ident.clip_hidden, source=np.array(ident.source))


def load(path: str | Path, adapter_dir: str | Path) -> Identity:
    try:
        with np.load(path) as f:
            return Identity(f["e_id"], f["clip_hidden"], Path(adapter_dir), str(f["source"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"--id {path}: not an identity file written by --save-id ({e})") from None


def check_fits(adapter_cfg, dit_cfg, clip_hidden: np.ndarray | None = None) -> None:
    """The adapter must match the backbone it is joined to; name the first field that does not."""
    pairs = [("dit_dim", adapter_cfg.dit_dim, "transformer inner dim", dit_cfg.inner_dim),
             ("text_dim", adapter_cfg.text_dim, "transformer text_embed_dim", dit_cfg.text_embed_dim),
             ("time_embed_dim", adapter_cfg.time_embed_dim, "transformer time_embed_dim", dit_cfg.time_embed_dim),
             ("num_dit_layers", adapter_cfg.num_dit_layers, "transformer num_layers", dit_cfg.num_layers)]
    if clip_hidden is not None:
        pairs.append(("clip_width", adapter_cfg.clip_width, "CLIP hidden size", clip_hidden.shape[-1]))
    for name, a, what, b in pairs:
        if a != b:
            raise ValueError(f"adapter does not fit the backbone: adapter {name}={a} but the {what} is {b} "
                             f"(e.g. parameter can.0.kernel expects shape ({adapter_cfg.time_embed_dim}, "
                             f"{14 * adapter_cfg.dit_dim}), the backbone needs ({dit_cfg.time_embed_dim}, "
                             f"{14 * dit_cfg.inner_dim}))")


def identity_model_fn(dit, x, text, t, extras):
    from mm_jax.models.id_adapter import identity_forward

    adapter, x_id, x_face, has_id = extras
    return identity_forward(dit, adapter, x, text, t, x_id=x_id, x_face=x_face, has_id=has_id)


def prepare(ident: Identity, dit, text: jax.Array, settings, ckpt_dir, mesh, dtype: str, cfg_on: bool):
    """-> (text batch, extras for the compiled loop, model_fn)."""
    from mm_jax import text as text_lib
    from mm_jax.text import find_class_token

    adapter = checkpoint.load_component(ident.adapter_dir, "adapter", mesh=mesh, dtype=dtype, param_dtype=dtype)
    check_fits(adapter.cfg, dit.cfg, ident.clip_hidden)
    tok = text_lib.load_tokenizer(Path(ckpt_dir) / "tokenizer")
    ids = text_lib.tokenize(tok, [settings.prompt], max_length=settings.max_sequence_length)[0]
    idx = find_class_token(tok, settings.prompt, ids, adapter.cfg.class_words)
    n = adapter.cfg.num_id_tokens
    if n > 1 and np.any(ids[-(n - 1):] != tok.pad_token_id):
        warnings.warn(f"the prompt fills the last {n - 1} text positions; the identity fusion drops them", stacklevel=2)
    x_id, x_face = adapter.encode(jnp.asarray(ident.clip_hidden[None], dtype), jnp.asarray(ident.e_id[None], dtype))
    fused = adapter.fuse(text[-1:], x_id, jnp.array([idx]))
    if cfg_on:
        text = jnp.concatenate([text[:1], fused], axis=0)
        x_id, x_face = jnp.concatenate([x_id, x_id]), jnp.concatenate([x_face, x_face])
        has_id = jnp.array([False, True])
    else:
        text, has_id = fused, None
    return text, (adapter, x_id, x_face, has_id), identity_model_fn
