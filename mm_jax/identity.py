"""Identity conditioning for sampling: the reference face's embeddings and the adapter's hook-up.

``compute`` runs the face front end (ArcFace e_id + CLIP crop) and the CLIP tower once per
reference image; ``save``/``load`` keep the result in an .npz so later runs skip both. ``prepare``
fuses the identity into the prompt embedding at the class word and builds the CFG batch of
section 4 of the design: [negative prompt, no face | fused prompt, face tokens, CAN on].
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import checkpoint
from mm_jax.gather import to_host


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


class Embedder:
    """The face front end and the CLIP tower, loaded once for many reference photos:
    ``Embedder(face_models, clip_ckpt, adapter_dir)(image) -> Identity`` (raises ``NoFaceError``
    naming the image when it holds no face).

    ``analyze(image)`` is the face step alone (detect, align, ArcFace; the host's CPU): a CLI runs it
    for every reference while it checks its input, before any model is placed. ``embed(face)`` runs
    the CLIP tower, loaded on ``mesh`` at its first call. On several processes every process calls
    ``embed`` (the tower runs over the global mesh) and gets the whole result."""

    def __init__(self, face_models: str | Path, clip_ckpt: str | Path, adapter_dir: str | Path, *, mesh=None):
        from mm_jax.face import FaceAnalyzer

        self.clip_ckpt, self.mesh, self.clip = Path(clip_ckpt), mesh, None
        # the reference crop at the tower's own input size (its config; nothing is loaded)
        image_size = checkpoint.load_config(self.clip_ckpt, "image_encoder").image_size
        self.faces = FaceAnalyzer(face_models, clip_size=image_size)
        self.adapter_dir = Path(adapter_dir)

    @property
    def clip_width(self) -> int:
        """The width of the CLIP states ``embed`` returns (from the tower's config: nothing is loaded)."""
        return checkpoint.load_config(self.clip_ckpt, "image_encoder").hidden_size

    def analyze(self, ref_image):
        """The largest face of ``ref_image`` (``mm_jax.face.FaceResult``); ``NoFaceError`` when none."""
        return self.faces.analyze(ref_image)

    def embed(self, face, source: str = "") -> Identity:
        """The ``Identity`` of an analyzed ``face``: its ArcFace embedding and the CLIP tower's states."""
        if self.clip is None:
            self.clip = checkpoint.load_component(self.clip_ckpt, "image_encoder", mesh=self.mesh)
        hidden = to_host(self.clip(face.clip_crop[None]))[0]
        return Identity(face.embedding, hidden, self.adapter_dir, source)

    def __call__(self, ref_image) -> Identity:
        return self.embed(self.analyze(ref_image), str(ref_image))


def compute(ref_image, face_models: str | Path, clip_ckpt: str | Path, adapter_dir: str | Path, *,
            mesh=None) -> Identity:
    """Detect/align/embed the largest face of ``ref_image`` and run the CLIP tower on its crop."""
    return Embedder(face_models, clip_ckpt, adapter_dir, mesh=mesh)(ref_image)


def save(path: str | Path, ident: Identity) -> None:
    np.savez(path, e_id=ident.e_id, clip_hidden=ident.clip_hidden, source=np.array(ident.source))


def load(path: str | Path, adapter_dir: str | Path) -> Identity:
    try:
        with np.load(path) as f:
            return Identity(f["e_id"], f["clip_hidden"], Path(adapter_dir), str(f["source"]))
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"--id {path}: not an identity file written by --save-id ({e})") from None


def check_fits(adapter_cfg, dit_cfg, clip_width: int | None = None) -> None:
    """The adapter must match the backbone it is joined to (and ``clip_width``, the width of the
    CLIP states it reads, when given); name the first field that does not."""
    pairs = [("dit_dim", adapter_cfg.dit_dim, "transformer inner dim", dit_cfg.inner_dim),
             ("text_dim", adapter_cfg.text_dim, "transformer text_embed_dim", dit_cfg.text_embed_dim),
             ("time_embed_dim", adapter_cfg.time_embed_dim, "transformer time_embed_dim", dit_cfg.time_embed_dim),
             ("num_dit_layers", adapter_cfg.num_dit_layers, "transformer num_layers", dit_cfg.num_layers)]
    if clip_width is not None:
        pairs.append(("clip_width", adapter_cfg.clip_width, "CLIP hidden size", clip_width))
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


def class_index(tokenizer, prompt: str, adapter_cfg, max_length: int) -> int:
    """Where the identity is fused into ``prompt``: the first token of its first class word (a
    ValueError listing the words when it has none); warns when the fusion drops real tokens."""
    from mm_jax import text as text_lib

    ids = text_lib.tokenize(tokenizer, [prompt], max_length=max_length)[0]
    idx = text_lib.find_class_token(tokenizer, prompt, ids, adapter_cfg.class_words)
    text_lib.check_dropped_tokens(ids, adapter_cfg.num_id_tokens, tokenizer.pad_token_id or 0)
    return idx


def load_adapter(idents: list[Identity], dit_cfg, *, mesh, dtype: str):
    """The one adapter all ``idents`` name (loaded once for every batch of a run), checked against
    the backbone and each identity's CLIP width."""
    folders = {str(i.adapter_dir) for i in idents}
    if len(folders) != 1:
        raise ValueError(f"identity videos of one run need one adapter; got {sorted(folders)}")
    adapter = checkpoint.load_component(idents[0].adapter_dir, "adapter", mesh=mesh, dtype=dtype, param_dtype=dtype)
    for ident in idents:
        check_fits(adapter.cfg, dit_cfg, ident.clip_hidden.shape[-1])
    return adapter


def prepare(idents: list[Identity], adapter, tokenizer, text: jax.Array, prompts: list[str], dtype: str,
            cfg_on: bool, max_length: int = 226):
    """The batch for V videos with identities -> (text batch, extras for the compiled step, model_fn).

    ``adapter`` from ``load_adapter``, ``tokenizer`` the backbone's (both loaded once per run).
    ``text``: (2V, L, T) [negative_1..V, positive_1..V] with CFG, else (V, L, T); ``prompts``: the
    V positive prompts. CFG batch (design s.4): [negatives without faces | fused prompts with faces]."""
    idx = jnp.asarray([class_index(tokenizer, p, adapter.cfg, max_length) for p in prompts])
    v = len(idents)
    clip = jnp.asarray(np.stack([i.clip_hidden for i in idents]), dtype)
    e_id = jnp.asarray(np.stack([i.e_id for i in idents]), dtype)
    x_id, x_face = adapter.encode(clip, e_id)
    fused = adapter.fuse(text[-v:], x_id, idx)
    if cfg_on:
        text = jnp.concatenate([text[:v], fused], axis=0)
        x_id, x_face = jnp.concatenate([x_id, x_id]), jnp.concatenate([x_face, x_face])
        has_id = jnp.asarray([False] * v + [True] * v)
    else:
        text, has_id = fused, None
    return text, (adapter, x_id, x_face, has_id), identity_model_fn
