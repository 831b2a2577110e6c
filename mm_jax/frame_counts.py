"""Which pixel frame counts the causal VAE encodes and decodes exactly.

A count T is valid when (a) it is ``1 + r (f - 1)`` for its ``f`` latent frames, r the VAE's
temporal compression (the causal convention: the first frame alone, then groups of r; the latent
shape and the face mask assume it), (b) encoding T frames gives f latent frames, and (c) decoding
f latent frames gives T frames back. (c) fails for half of the ``4k+1`` counts: the reference
decodes latent frames in batches of 2 with the remainder in the first batch, and each batch is
upsampled in time on its own (an odd batch keeps its first frame alone, an even one doubles every
frame), so an even latent count (5, 13, 21, ... pixel frames) decodes to ``4f`` frames, not
``4f - 3`` (``--frames 5`` would write 8). Those counts are refused wherever a frame count enters.

The counts are derived from the VAE's settings (temporal compression, encode/decode frame batches;
``mm_jax.models.vae.VAEConfig`` defaults unless given) and the batch split the VAE itself uses, not
listed by hand; ``tests/test_frame_counts.py`` checks them against the VAE's own output shapes.
"""
from __future__ import annotations

import math


def _defaults(ratio, encode_batch, decode_batch) -> tuple[int, int, int]:
    from mm_jax.models.vae import VAEConfig

    d = VAEConfig()
    return (int(ratio or d.temporal_compression_ratio), int(encode_batch or d.encode_frame_batch),
            int(decode_batch or d.decode_frame_batch))


def _levels(ratio: int) -> int:
    levels = int(round(math.log2(ratio)))
    if ratio < 1 or 2 ** levels != ratio:
        raise ValueError(f"temporal compression {ratio}: must be a power of 2")
    return levels


def _batches(n: int, batch: int) -> list[int]:
    from mm_jax.models.vae import frame_batches

    return [e - s for s, e in frame_batches(n, batch)]


def encoded_frames(frames: int, ratio: int | None = None, encode_batch: int | None = None) -> int:
    """Latent frames the encoder gives for ``frames`` pixel frames: per frame batch, each temporal
    level keeps an odd count's first frame and halves the rest (average of pairs)."""
    ratio, encode_batch, _ = _defaults(ratio, encode_batch, None)
    total = 0
    for n in _batches(frames, encode_batch):
        for _ in range(_levels(ratio)):
            n = 1 + (n - 1) // 2 if n % 2 else n // 2
        total += n
    return total


def decoded_frames(latents: int, ratio: int | None = None, decode_batch: int | None = None) -> int:
    """Pixel frames the decoder gives for ``latents`` latent frames: per frame batch, each temporal
    level doubles every frame of an even count, and all but the first of an odd count > 1."""
    ratio, _, decode_batch = _defaults(ratio, None, decode_batch)
    total = 0
    for n in _batches(latents, decode_batch):
        for _ in range(_levels(ratio)):
            n = 1 + 2 * (n - 1) if n % 2 else 2 * n
        total += n
    return total


def latent_frames(frames: int, ratio: int | None = None) -> int:
    """``(frames - 1) / r + 1``: the latent frames of a valid count."""
    ratio, _, _ = _defaults(ratio, None, None)
    return (frames - 1) // ratio + 1


def is_valid(frames: int, ratio: int | None = None, encode_batch: int | None = None,
             decode_batch: int | None = None) -> bool:
    ratio, encode_batch, decode_batch = _defaults(ratio, encode_batch, decode_batch)
    if frames < 1 or (frames - 1) % ratio:
        return False
    f = latent_frames(frames, ratio)
    return encoded_frames(frames, ratio, encode_batch) == f and decoded_frames(f, ratio, decode_batch) == frames


def valid_frame_counts(up_to: int = 49, ratio: int | None = None, encode_batch: int | None = None,
                       decode_batch: int | None = None) -> list[int]:
    """Every valid count from 1 to ``up_to`` (1, 9, 17, 25, 33, 41, 49 for CogVideoX's VAE)."""
    return [t for t in range(1, up_to + 1) if is_valid(t, ratio, encode_batch, decode_batch)]


def describe(up_to: int = 49, **vae) -> str:
    """"1, 9, 17, 25, 33, 41, 49, ..." for messages and help texts."""
    return ", ".join(map(str, valid_frame_counts(up_to, **vae))) + ", ..."


def check(frames: int, field: str = "frames", ratio: int | None = None, encode_batch: int | None = None,
          decode_batch: int | None = None) -> None:
    """Raise a ValueError naming ``field``, the value and the valid counts unless ``frames`` is one."""
    vae = dict(ratio=ratio, encode_batch=encode_batch, decode_batch=decode_batch)
    if is_valid(int(frames), **vae):
        return
    why = ""
    r = _defaults(ratio, None, None)[0]
    if frames >= 1 and (frames - 1) % r == 0:
        f = latent_frames(frames, r)
        why = f" (its {f} latent frames decode to {decoded_frames(f, r, decode_batch)} frames)"
    raise ValueError(f"{field}={frames}: not a frame count the VAE encodes and decodes exactly{why}; "
                     f"valid: {describe(max(49, int(frames) + 8), **vae)}")


def check_frames(stage: str, frames: int, temporal_ratio: int | None = None) -> None:
    """A training stage and its frame count (``data.stage``, ``data.frames``): 1 for the image
    stage, a count the VAE encodes and decodes exactly (``check``) for the video stage."""
    if stage not in ("image", "video"):
        raise ValueError(f"data.stage={stage!r}: must be 'image' or 'video'")
    if stage == "image" and frames != 1:
        raise ValueError(f"data.frames={frames}: the image stage trains on single frames (frames=1)")
    if stage == "video":
        check(frames, "data.frames", ratio=temporal_ratio)


def from_vae_config(vae_cfg) -> dict:
    """The keyword arguments of ``check`` / ``is_valid`` for a ``VAEConfig``."""
    return dict(ratio=vae_cfg.temporal_compression_ratio, encode_batch=vae_cfg.encode_frame_batch,
                decode_batch=vae_cfg.decode_frame_batch)
