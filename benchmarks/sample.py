"""End-to-end sampling: ours vs diffusers' CogVideoXPipeline in one run, printed as a ratio.

CPU (default): the tiny random pipeline of the tests (9 frames 64x64, 4 DDIM steps, CFG 6); compile
time reported separately. GPU (--gpu, needs a converted real checkpoint --checkpoint and the
diffusers folder --diffusers): 5B at 49x480x720, 50 DDIM steps with CFG, bf16, vs the FLOP floor.

    python benchmarks/sample.py [--repeat 5]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import dit_forward_flops, time_it


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--checkpoint", help="(GPU) converted mm_jax checkpoint of CogVideoX-5b")
    ap.add_argument("--diffusers", help="(GPU) the diffusers CogVideoX-5b folder")
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    args = ap.parse_args()
    import jax
    import torch

    from mm_jax import checkpoint, pipeline

    if args.gpu:
        settings = pipeline.SampleSettings(prompt="a man walking on a beach", steps=50)
        ckpt, ref_dir = Path(args.checkpoint), args.diffusers
        dtype = "bfloat16"
    else:
        from tests.tiny_pipeline import make_pipeline
        from tools.convert_weights.from_torch import convert

        tmp = Path(tempfile.mkdtemp())
        make_pipeline(tmp / "src")
        ckpt = convert(tmp / "src", tmp / "ckpt")
        ref_dir = tmp / "src"
        settings = pipeline.SampleSettings(prompt="a man is walking on the beach", frames=9, height=64, width=64,
                                           steps=4)
        dtype = "float32"
    dit_cfg = checkpoint.load_config(ckpt, "transformer")
    lat = np.random.default_rng(0).standard_normal(settings.latent_shape(dit_cfg.in_channels), dtype=np.float32)

    emb = pipeline.prompt_embeddings(ckpt, ["", settings.prompt], dtype=dtype)
    dit = checkpoint.load_component(ckpt, "transformer", dtype=dtype, param_dtype=dtype)
    vae = checkpoint.load_component(ckpt, "vae")
    run = lambda: pipeline.generate(ckpt, settings, latents=lat, dtype=dtype, progress=False,
                                    text_embeddings=emb, transformer=dit, vae=vae)
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    ours = time_it(run, args.repeat)

    from diffusers import CogVideoXPipeline

    dev, tdt = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    pipe = CogVideoXPipeline.from_pretrained(ref_dir, torch_dtype=tdt).to(dev)
    pipe.set_progress_bar_config(disable=True)
    lat_t = torch.from_numpy(lat).permute(0, 1, 4, 2, 3).to(dev, tdt)

    def run_ref():
        with torch.no_grad():
            out = pipe(prompt=settings.prompt, num_frames=settings.frames, height=settings.height, width=settings.width,
                       num_inference_steps=settings.steps, guidance_scale=settings.guidance, latents=lat_t.clone(),
                       output_type="np").frames
        if args.gpu:
            torch.cuda.synchronize()
        return out

    run_ref()
    ref = time_it(run_ref, args.repeat)
    print(f"backend {jax.default_backend()}, {settings.frames}x{settings.height}x{settings.width}, {settings.steps} steps, "
          f"CFG {settings.guidance}, {dtype}")
    print(f"ours (denoise + decode; T5 excluded, models loaded once): {ours:.3f} s/call  "
          f"(first call incl. compile {first:.1f} s)")
    print(f"diffusers (incl. its T5):             {ref:.3f} s/call")
    print(f"ratio ours/diffusers: {ours / ref:.3f}")
    if args.gpu:
        floor = 2 * settings.steps * dit_forward_flops(dit_cfg, 1, settings.latent_shape(16)[1], settings.height // 8,
                                                       settings.width // 8, 226) / (args.peak_tflops * 1e12)
        print(f"FLOP floor at {args.peak_tflops:.0f} TFLOP/s: {floor:.1f} s; ours/floor {ours / floor:.2f}")


if __name__ == "__main__":
    main()
