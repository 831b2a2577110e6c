"""FaceSim-Cur's face embedding: ConsisID's ``inference`` (``eval/get_facesim_fid.py``) on our IR-101.

Their pipeline per face: insightface ``norm_crop(img_bgr, kps, 224)`` -> RGB -> ``cv2.resize(face, (112,
112))`` (bilinear; for 224 -> 112 OpenCV takes its exact 2x2 area path) -> ``(x / 255 - 0.5) / 0.5`` ->
``IR_101`` -> ``e / ||e||``; FaceSim-Cur is then ``max(cos(e_ref, e_frame), 0)`` averaged over frames.
``resize_aligned`` is the resize step, ``embed`` the rest; the crop belongs to the face front end.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

EMBED_SIZE = 112


def resize_aligned(faces_rgb: np.ndarray) -> np.ndarray:
    """Aligned crops ``(B, H, W, 3)`` uint8 (224 in ConsisID) -> ``(B, 112, 112, 3)`` uint8 as their
    ``cv2.resize(img, (112, 112))`` (default bilinear) computes them."""
    import cv2

    faces_rgb = np.asarray(faces_rgb)
    if faces_rgb.ndim != 4 or faces_rgb.shape[-1] != 3 or faces_rgb.dtype != np.uint8:
        raise ValueError(f"faces {faces_rgb.shape} {faces_rgb.dtype}: expected (B, H, W, 3) uint8")
    return np.stack([cv2.resize(f, (EMBED_SIZE, EMBED_SIZE)) for f in faces_rgb])


@nnx.jit
def _forward(model: nnx.Module, pixels: jax.Array) -> jax.Array:
    e = model(pixels)
    return e / jnp.linalg.norm(e, axis=-1, keepdims=True)


def embed(model: nnx.Module, faces_rgb_uint8_112: np.ndarray) -> np.ndarray:
    """L2-normalised embeddings ``(B, embedding_size)`` float32 of aligned RGB faces
    ``(B, S, S, 3)`` uint8 (S = the model's ``input_size``, 112 for the release)."""
    faces = np.asarray(faces_rgb_uint8_112)
    s = model.config.input_size
    if faces.ndim != 4 or faces.shape[1:] != (s, s, 3) or faces.dtype != np.uint8:
        raise ValueError(f"faces {faces.shape} {faces.dtype}: expected (B, {s}, {s}, 3) uint8 "
                         f"(resize 224 crops with resize_aligned first)")
    pixels = (faces.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return np.asarray(_forward(model, jnp.asarray(pixels)))

