"""A tiny ConsisID face folder, laid out and saved as published (``mm_jax.consisid_faces.LAYOUT``):
``make_face_folder(path) -> path``, for the face-encoder tests, the CLI tests and the notebook.

- ``detection_Resnet50_Final.pth``: RetinaFace-R50 at its real (fixed) architecture, random weights,
  its three 1x1 heads zeroed so that their outputs are their biases: the 256-px anchor of the
  stride-32 level scores 1 - 6e-6 (> ConsisID's 0.97) at every position, every other anchor ~6e-6,
  boxes are the priors and the 5 landmarks sit at ``LANDMARKS_PX`` around the anchor centre, so
  RetinaFace "finds" a face near the centre of any image (``detects=False``: none anywhere);
- ``parsing_bisenet.pth``: BiSeNet (19 classes) with random weights;
- ``EVA02_CLIP_L_336_psz14_s6B.pt``: a whole EVA-CLIP checkpoint's keys (vision tower under
  ``visual.`` with its rope tables, a text-tower stub, ``logit_scale``) of a tiny tower: 21 layers
  (the 5 hidden states need blocks 4..20), width 32, 2 heads, 42 px in patches of 14;
- ``models/antelopev2/{scrfd_10g_bnkps,glintr100}.onnx``: the stand-in SCRFD (a bright square is a
  face; box size follows brightness) and ArcFace models of ``mm_jax.demo.standin_faces``.

The .pth/.pt files are written with ``torch.save`` (the reader under test is torch-free).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

FACE_LOGIT = 12.0              # softmax([0, 12]) = 1 - 6.1e-6 face, > 0.97
EVA_TINY = dict(image_size=42, patch_size=14, width=32, layers=21, head_width=16, mlp_hidden=85, embed_dim=24)


def _landmarks_px() -> np.ndarray:
    from mm_jax.consisid_face import FFHQ_TEMPLATE

    return ((FFHQ_TEMPLATE - FFHQ_TEMPLATE.mean(0)) / 4).astype(np.float32)


# the 5 landmarks (eyes, nose, mouth corners) in pixels from the firing anchor's centre: the FFHQ template
# shrunk 4x about its mean, so the aligned crop is a 4x zoom of the image around the anchor
LANDMARKS_PX = _landmarks_px()


def facexlib_state_dict(name: str, seed: int = 0) -> dict:
    """A random facexlib state dict (torch tensors) for our module ``name``'s shapes, drawn in numpy
    (no JAX init: fast): He-normal conv kernels, small random biases and BatchNorm affines, BatchNorm
    statistics mean 0 / variance 1."""
    import torch
    from flax import nnx

    from mm_jax import face_weights as fw

    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: fw.build_facexlib(name))
    sd = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, (nnx.Param, nnx.BatchStat))):
        shape, leaf = tuple(var.get_value().shape), str(path[-1])
        if leaf == "kernel":   # ours (kh, kw, in, out) -> torch (out, in, kh, kw)
            a = rng.standard_normal((shape[3], shape[2], shape[0], shape[1])) * np.sqrt(2.0 / np.prod(shape[:3]))
        elif leaf == "var":
            a = np.ones(shape)
        elif leaf == "mean":
            a = np.zeros(shape)
        elif leaf == "scale":
            a = rng.uniform(0.5, 1.5, shape)
        else:
            a = rng.standard_normal(shape) * 0.1
        sd[fw.facexlib_key(name, path)] = torch.from_numpy(a.astype(np.float32))
    return sd


def retinaface_state_dict(detects: bool = True, seed: int = 0) -> dict:
    """facexlib's RetinaFace-R50 state dict (torch tensors): random body, the heads as described above."""
    import torch

    from mm_jax.models import retinaface as rf

    sd = facexlib_state_dict("retinaface", seed)
    level, anchor, size = 2, 0, rf.MIN_SIZES[2][0]
    for i in range(3):
        for head in ("ClassHead", "BboxHead", "LandmarkHead"):
            sd[f"{head}.{i}.conv1x1.weight"].zero_()
            sd[f"{head}.{i}.conv1x1.bias"].zero_()
        cls = sd[f"ClassHead.{i}.conv1x1.bias"].view(2, 2)   # (anchor, [background, face])
        cls[:, 1] = -FACE_LOGIT
        if detects and i == level:
            cls[anchor, 1] = FACE_LOGIT
    # landmark = centre + pre * 0.1 * anchor size (facexlib's decode_landm)
    pre = torch.from_numpy(LANDMARKS_PX.reshape(-1) / (rf.VARIANCES[0] * size))
    sd[f"LandmarkHead.{level}.conv1x1.bias"].view(2, 10)[anchor] = pre
    sd["body.bn1.num_batches_tracked"] = torch.tensor(0)   # as a trained file holds them
    return sd


def bisenet_state_dict(seed: int = 0) -> dict:
    return facexlib_state_dict("bisenet", seed)


def eva_state_dict(seed: int = 0, **sizes) -> dict:
    """A whole EVA-CLIP checkpoint (torch tensors) of the tiny tower, every tensor random."""
    import torch

    from mm_jax import face_weights as fw
    from mm_jax.models.eva_clip import EVAVisionConfig, rope_tables

    cfg = EVAVisionConfig(**dict(EVA_TINY, **sizes))
    rng = np.random.default_rng(seed)
    sd = {}
    for k, m in fw.eva_mapping(cfg).items():
        a = rng.standard_normal(m.torch_shape).astype(np.float32) * 0.2
        if k.endswith(("norm1.weight", "norm2.weight", "ln.weight", "norm.weight")):
            a += 1.0
        sd["visual." + k] = torch.from_numpy(a)
    cos, sin = rope_tables(cfg)
    for prefix in ["visual.rope."] + [f"visual.blocks.{i}.attn.rope." for i in range(cfg.layers)]:
        sd[prefix + "freqs_cos"], sd[prefix + "freqs_sin"] = torch.from_numpy(cos), torch.from_numpy(sin)
    sd["text.token_embedding.weight"] = torch.zeros(4, 8)
    sd["logit_scale"] = torch.tensor(4.6)
    return sd


def make_antelope(folder: Path) -> Path:
    from mm_jax.demo.standin_faces import make_detector, make_recognizer

    folder.mkdir(parents=True, exist_ok=True)
    make_detector(folder / "scrfd_10g_bnkps.onnx", box_gain=1.0)
    make_recognizer(folder / "glintr100.onnx")
    return folder


def make_face_folder(path, detects: bool = True, seed: int = 0) -> Path:
    """Write the tiny face folder at ``path`` (created) and return it."""
    import torch

    from mm_jax.consisid_faces import ANTELOPE, FILES

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    torch.save(retinaface_state_dict(detects, seed), path / FILES["retinaface"])
    torch.save(bisenet_state_dict(seed), path / FILES["bisenet"])
    torch.save(eva_state_dict(seed), path / FILES["eva_clip"])
    make_antelope(path / ANTELOPE)
    return path
