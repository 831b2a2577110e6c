"""CogVideoX-5B-I2V's learned positional table (diffusers ``CogVideoXPatchEmbed.pos_embedding``).

The table ``(1, max_text_seq_length + F'*H'*W', D)`` is a persistent buffer of the checkpoint,
added to the whole joint sequence [text_proj(text), patches] before the blocks (text rows
included); RoPE still rotates the video queries and keys inside attention. It covers one size:
``sample_frames`` frames (F' = (sample_frames - 1) / temporal_compression_ratio + 1 latent frames)
of ``sample_height`` x ``sample_width`` latents and exactly ``max_text_seq_length`` text tokens.

At other sizes the reference behaves in three ways, made explicit here:

- another latent height/width: diffusers raises ``ValueError``; so do we (``check_size``);
- another text length: diffusers fails on a size mismatch; we raise ``ValueError``;
- another latent frame count: diffusers *silently* drops the learned table and adds a freshly
  computed 3D sin-cos table to the video rows (text rows get nothing). We do the same, for parity,
  but warn (``LearnedTableWarning``): the released I2V weights were trained with the learned
  table at 49 frames, so other frame counts are outside what the model saw.

Pure shape/numpy helpers plus one traced ``add``; no torch.
"""
from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from mm_jax.models.positional import sincos_3d


class LearnedTableWarning(UserWarning):
    """A frame count the learned table does not cover: the sin-cos table is used instead."""


def table_frames(cfg) -> int:
    """Latent frames the table covers."""
    return (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1


def table_shape(cfg) -> tuple[int, int, int]:
    """(1, max_text_seq_length + F'*H'*W', D) of the checkpoint's ``pos_embedding``."""
    p = cfg.patch_size
    n = table_frames(cfg) * (cfg.sample_height // p) * (cfg.sample_width // p)
    return 1, cfg.max_text_seq_length + n, cfg.inner_dim


def sincos_rows(cfg, frames: int, height: int, width: int) -> np.ndarray:
    """The 3D sin-cos table (F*H'*W', D) diffusers computes for the video rows (latent sizes in)."""
    p = cfg.patch_size
    return sincos_3d(cfg.inner_dim, frames, height // p, width // p, cfg.spatial_interpolation_scale,
                     cfg.temporal_interpolation_scale)


def initial_table(cfg) -> np.ndarray:
    """The table before a checkpoint overwrites it (diffusers' init): zeros on the text rows, the
    sin-cos table of the sample size on the video rows."""
    out = np.zeros(table_shape(cfg), np.float32)
    out[0, cfg.max_text_seq_length:] = sincos_rows(cfg, table_frames(cfg), cfg.sample_height, cfg.sample_width)
    return out


def check_size(cfg, frames: int, height: int, width: int, text_length: int | None = None) -> bool:
    """Whether the learned table applies to ``frames`` x ``height`` x ``width`` latents (True), or
    the sin-cos fallback for another frame count (False, with a ``LearnedTableWarning``). Raises
    ``ValueError`` for a latent height/width or a text length the table does not cover."""
    if (height, width) != (cfg.sample_height, cfg.sample_width):
        raise ValueError(f"latent height x width {height} x {width}: this transformer's learned positional table "
                         f"(use_learned_positional_embeddings) covers only {cfg.sample_height} x {cfg.sample_width} latents "
                         "(diffusers raises here too)")
    if text_length is not None and text_length != cfg.max_text_seq_length:
        raise ValueError(f"text length {text_length}: the learned positional table needs exactly "
                         f"max_text_seq_length={cfg.max_text_seq_length} text tokens")
    if frames != table_frames(cfg):
        warnings.warn(f"{frames} latent frames: the learned positional table covers {table_frames(cfg)} "
                      f"({cfg.sample_frames} frames); using the 3D sin-cos table instead, as diffusers does",
                      LearnedTableWarning, stacklevel=2)
        return False
    return True


def add(cfg, table, text, video, frames: int, height: int, width: int):
    """Text (B, L, D) and video tokens (B, N, D) with the positions added -> (text, video)."""
    if check_size(cfg, frames, height, width, text.shape[1]):
        t = table.astype(video.dtype)
        return text + t[:, :text.shape[1]], video + t[:, text.shape[1]:]
    return text, video + jnp.asarray(sincos_rows(cfg, frames, height, width), video.dtype)[None]
