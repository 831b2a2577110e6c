"""Positional tables of the CogVideoX DiT, computed on the host from static sizes.

Pure functions of integers returning numpy arrays, so they are constants inside a jitted step.
Token order everywhere is frame-major, then row, then column: index = f*gh*gw + i*gw + j.
"""
from __future__ import annotations

import numpy as np


def resize_crop_region(grid_hw: tuple[int, int], base_w: int, base_h: int):
    """Where a (gh, gw) grid sits inside the base (bh, bw) grid, keeping aspect ratio.

    Returns ((top, left), (bottom, right)); Python ``round`` (half to even) as the reference.
    """
    h, w = grid_hw
    if h / w > base_h / base_w:
        rh, rw = base_h, int(round(base_h / h * w))
    else:
        rw, rh = base_w, int(round(base_w / w * h))
    top, left = int(round((base_h - rh) / 2.0)), int(round((base_w - rw) / 2.0))
    return (top, left), (top + rh, left + rw)


def _rope_axis(dim: int, pos: np.ndarray, theta: float = 10000.0):
    """cos/sin tables (n, dim) with each frequency repeated for the (2i, 2i+1) channel pair."""
    inv = (np.float32(1.0) / (np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32)[: dim // 2]
                                                    / np.float32(dim)))).astype(np.float32)
    ang = np.outer(pos.astype(np.float32), inv).astype(np.float32)
    return np.repeat(np.cos(ang), 2, axis=1), np.repeat(np.sin(ang), 2, axis=1)


def rope_3d(head_dim: int, frames: int, grid_h: int, grid_w: int, base_h: int, base_w: int):
    """CogVideoX 3D RoPE tables ("linspace" grid): (cos, sin), each (frames*grid_h*grid_w, head_dim) f32.

    The head dim splits into [t: hd/4 | h: 3hd/8 | w: 3hd/8]; positions stretch the grid over the
    crop region of the base grid (fractional when the aspect ratio differs from the base).
    """
    dim_t, dim_h = head_dim // 4, head_dim // 8 * 3
    dim_w = dim_h
    (top, left), (bottom, right) = resize_crop_region((grid_h, grid_w), base_w, base_h)
    pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
    pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
    ct, st = _rope_axis(dim_t, pos_t)
    ch, sh = _rope_axis(dim_h, pos_h)
    cw, sw = _rope_axis(dim_w, pos_w)

    def grid(t, h, w):
        full = np.concatenate([
            np.broadcast_to(t[:, None, None, :], (frames, grid_h, grid_w, dim_t)),
            np.broadcast_to(h[None, :, None, :], (frames, grid_h, grid_w, dim_h)),
            np.broadcast_to(w[None, None, :, :], (frames, grid_h, grid_w, dim_w)),
        ], axis=-1)
        return np.ascontiguousarray(full.reshape(frames * grid_h * grid_w, -1), dtype=np.float32)

    return grid(ct, ch, cw), grid(st, sh, sw)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(embed_dim: int, frames: int, grid_h: int, grid_w: int, spatial_scale: float,
              temporal_scale: float) -> np.ndarray:
    """CogVideoX-2B fixed 3D sin-cos table: (frames*grid_h*grid_w, embed_dim) f32.

    Channels: [temporal (D/4) | spatial (3D/4) = [w half | h half]]; positions divided by the
    interpolation scales.
    """
    dim_s, dim_t = 3 * embed_dim // 4, embed_dim // 4
    gh = np.arange(grid_h, dtype=np.float32) / np.float32(spatial_scale)
    gw = np.arange(grid_w, dtype=np.float32) / np.float32(spatial_scale)
    ww, hh = np.meshgrid(gw, gh, indexing="xy")  # (gh, gw) each
    spatial = np.concatenate([_sincos_1d(dim_s // 2, ww), _sincos_1d(dim_s // 2, hh)], axis=1)  # (gh*gw, dim_s)
    gt = np.arange(frames, dtype=np.float32) / np.float32(temporal_scale)
    temporal = _sincos_1d(dim_t, gt)  # (F, dim_t)
    table = np.concatenate([
        np.broadcast_to(temporal[:, None, :], (frames, grid_h * grid_w, dim_t)),
        np.broadcast_to(spatial[None], (frames, grid_h * grid_w, dim_s)),
    ], axis=-1)
    return table.reshape(frames * grid_h * grid_w, embed_dim).astype(np.float32)
