"""A self-contained demo: build a tiny random CogVideoX checkpoint (no downloads, no torch) and
sample a short video from it through the real pipeline.

    python -m mm_jax.demo --out demo.mp4 [--workdir runs/demo] [--steps 4] [--frames 9]

The weights are random, so the video is noise-like; the point is that every stage (tokenizer,
T5, compiled denoising loop, VAE decode, video writing) runs on a fresh machine in seconds. Bad
values exit with code 2 before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROMPT = "a man is walking on the beach at sunset"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="demo.mp4", help="output: .mp4, .gif, .npy or a folder for PNGs")
    ap.add_argument("--workdir", default="runs/demo", help="where the tiny checkpoint is written")
    ap.add_argument("--steps", type=int, default=4, help="denoising steps")
    ap.add_argument("--frames", type=int, default=9, help="pixel frames (python -m mm_jax.sample --help lists the valid counts)")
    args = ap.parse_args(argv)
    from mm_jax import pipeline, sample, video_io

    try:  # everything the sampler would refuse, refused before the checkpoint is built
        video_io.output_kind(args.out)
        pipeline.SampleSettings(prompt=PROMPT, frames=args.frames, height=64, width=64, steps=args.steps).validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mm_jax.demo.tiny_checkpoint import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(Path(args.workdir) / "tiny_checkpoint")
    return sample.main(["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", str(args.frames), "--height", "64",
                        "--width", "64", "--steps", str(args.steps), "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
