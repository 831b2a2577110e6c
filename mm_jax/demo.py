"""A self-contained demo: build a tiny random CogVideoX checkpoint (no downloads, no torch) and
sample a short video from it through the real pipeline.

    python -m mm_jax.demo --out demo.mp4 [--workdir runs/demo] [--steps 4]

The weights are random, so the video is noise-like; the point is that every stage (tokenizer,
T5, compiled denoising loop, VAE decode, video writing) runs on a fresh machine in seconds.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mm_jax.testing.tiny_checkpoint import build_tiny_checkpoint

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="demo.mp4")
    ap.add_argument("--workdir", default="runs/demo", help="where the tiny checkpoint is written")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    from mm_jax import sample

    ckpt = build_tiny_checkpoint(Path(args.workdir) / "tiny_checkpoint")
    return sample.main(["--checkpoint", str(ckpt), "--prompt", "a man is walking on the beach at sunset",
                        "--frames", "9", "--height", "64", "--width", "64", "--steps", str(args.steps),
                        "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
