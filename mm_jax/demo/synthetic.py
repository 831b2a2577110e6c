"""A synthetic demo source: short clips (mp4) and images (png) of "people" that the stand-in face
models (``mm_jax.demo.standin_faces``) detect, with captions that contain a class word.

A person is a bright square face (what the stand-in detector fires on) with an identity-coloured
ring, above a coloured body; it drifts a few pixels over the clip on a dark textured background.
Identities differ by ring colour/width and body colour, so the stand-in recognizer separates them
somewhat. Written in the builder's input format: media files + ``captions.jsonl``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mm_jax.text import CLASS_WORDS

# the captions' subjects: a subset of the one class-word list (so every caption has one)
WORDS = ("man", "woman", "person", "boy", "girl")
assert set(WORDS) <= set(CLASS_WORDS)
ACTIONS = ("is walking on the beach at sunset", "plays the guitar in a small room", "rides a bicycle through the city",
           "laughs while eating ice cream", "is smiling at the camera", "reads a book by the window")


def _identity(k: int) -> dict:
    rng = np.random.default_rng(1000 + k)
    return {"ring": rng.integers(0, 160, 3), "ring_w": 1 + k % 2, "body": rng.integers(40, 200, 3),
            "word": WORDS[k % len(WORDS)]}


def _frame(h: int, w: int, centre: tuple[float, float], ident: dict, face: int, bg: np.ndarray) -> np.ndarray:
    img = bg.copy()
    r, c = int(round(centre[0])), int(round(centre[1]))
    half, ring = face // 2, ident["ring_w"]
    body_top = min(h, r + half + ring + 1)
    img[body_top:min(h, body_top + 2 * face), max(0, c - face):min(w, c + face)] = ident["body"]
    img[max(0, r - half - ring):r + half + ring + 1, max(0, c - half - ring):c + half + ring + 1] = ident["ring"]
    img[max(0, r - half):r + half + 1, max(0, c - half):c + half + 1] = 255
    return img


def make_demo_source(folder: str | Path, *, num_clips: int = 24, num_images: int = 0, frames: int = 9,
                     height: int = 64, width: int = 64, num_identities: int = 4, seed: int = 0) -> Path:
    """Write ``num_clips`` mp4 clips and ``num_images`` png images + ``captions.jsonl``; returns ``folder``."""
    import imageio.v3 as iio

    if height < 32 or width < 32:
        raise ValueError(f"synthetic frames must be at least 32x32, got {height}x{width}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    face = max(5, (min(height, width) // 10) | 1)
    lines = []
    for i in range(num_clips + num_images):
        k = int(rng.integers(num_identities))
        ident = _identity(k)
        bg = (rng.random((height, width, 3)) * 50).astype(np.uint8)
        start = np.array([rng.uniform(0.3, 0.45) * height, rng.uniform(0.3, 0.7) * width])
        drift = rng.uniform(-1.0, 1.0, 2)
        n = frames if i < num_clips else 1
        video = np.stack([_frame(height, width, tuple(start + t * drift), ident, face, bg) for t in range(n)])
        caption = f"a {ident['word']} {ACTIONS[int(rng.integers(len(ACTIONS)))]}"
        if i < num_clips:
            name = f"clip_{i:04d}.mp4"
            iio.imwrite(folder / name, video, fps=8, codec="libx264", plugin="pyav")
        else:
            name = f"image_{i:04d}.png"
            iio.imwrite(folder / name, video[0])
        lines.append(json.dumps({"file": name, "caption": caption, "identity": k}))
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder
