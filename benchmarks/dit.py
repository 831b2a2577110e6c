"""DiT forward: ours vs diffusers on the same config and weights, one run, printed as a ratio.

CPU (default): 2 blocks at full 5B width, 226 text tokens, latent 13x16x30x44, fp32.
GPU (--gpu): the full 5B block stack at 49x480x720 (latent 13x60x90) in bf16, batch 1; our
time and achieved TFLOP/s vs --peak-tflops (H100 bf16 dense: 800), and diffusers in the same run.

    python benchmarks/dit.py [--gpu] [--layers N] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import dit_forward_flops, time_it
from mm_jax import checkpoint
from mm_jax.models.dit import CogVideoXTransformer3D, DiTConfig


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="real-size bf16 run on a GPU")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: 2 on CPU, 42 on GPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    ap.add_argument("--no-torch", action="store_true", help="skip diffusers (ours only)")
    args = ap.parse_args()
    import torch
    from diffusers import CogVideoXTransformer3DModel

    layers = args.layers or (42 if args.gpu else 2)
    if args.gpu:
        frames, h, w, dtype = 13, 60, 90, "bfloat16"
    else:
        frames, h, w, dtype = 13, 30, 44, "float32"
        torch.set_num_threads(__import__("os").cpu_count())
    text_len, b = 226, 1
    hf = dict(num_layers=layers, num_attention_heads=48, use_rotary_positional_embeddings=True)  # 5B widths
    cfg = DiTConfig(num_layers=layers, dtype=dtype, param_dtype=dtype)
    assert cfg.inner_dim == 3072
    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, frames, h, w, 16), dtype=np.float32)
    text = rng.standard_normal((b, text_len, 4096), dtype=np.float32)
    t = np.array([500] * b)

    tdev = "cuda" if args.gpu else "cpu"
    tdtype = torch.bfloat16 if args.gpu else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        ref = CogVideoXTransformer3DModel(**hf).eval()
        if not args.gpu:  # same weights on both sides through our converter
            ref.save_pretrained(Path(tmp) / "src")
            from tools.convert_weights.from_torch import convert

            convert(Path(tmp) / "src", Path(tmp) / "ckpt")
            ours = checkpoint.load_component(Path(tmp) / "ckpt", "transformer", dtype=dtype, param_dtype=dtype)
        else:
            ours = nnx.jit(lambda: CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0)))()
    fwd = nnx.jit(lambda m, x, c, t: m(x, c, t))
    xj, cj, tj = jnp.asarray(x, dtype), jnp.asarray(text, dtype), jnp.asarray(t)
    import time
    t0 = time.perf_counter()
    fwd(ours, xj, cj, tj).block_until_ready()
    compile_s = time.perf_counter() - t0
    ours_s = time_it(lambda: fwd(ours, xj, cj, tj), args.repeat, sync=lambda y: y.block_until_ready())
    flops = dit_forward_flops(cfg, b, frames, h, w, text_len)
    print(f"config: {layers} blocks, width {cfg.inner_dim}, latent {frames}x16x{h}x{w}, text {text_len}, {dtype}, "
          f"backend {jax.default_backend()}")
    print(f"ours:      {ours_s:8.3f} s/forward  (first call incl. compile {compile_s:.1f} s)  "
          f"{flops / ours_s / 1e12:.2f} TFLOP/s" + (f" = {100 * flops / ours_s / 1e12 / args.peak_tflops:.1f}% of {args.peak_tflops:.0f}" if args.gpu else ""))
    if args.no_torch:
        return
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    ref = ref.to(tdev, tdtype)
    crops = get_resize_crop_region_for_grid((h // 2, w // 2), 45, 30)
    rope = get_3d_rotary_pos_embed(64, crops, (h // 2, w // 2), frames, device=tdev)
    xt = torch.from_numpy(x).permute(0, 1, 4, 2, 3).to(tdev, tdtype)
    ct = torch.from_numpy(text).to(tdev, tdtype)
    tt = torch.from_numpy(t).to(tdev)

    def run_ref():
        with torch.no_grad():
            y = ref(hidden_states=xt, encoder_hidden_states=ct, timestep=tt, image_rotary_emb=rope, return_dict=False)[0]
        if args.gpu:
            torch.cuda.synchronize()
        return y

    y_ref = run_ref()
    ref_s = time_it(run_ref, args.repeat)
    print(f"diffusers: {ref_s:8.3f} s/forward  {flops / ref_s / 1e12:.2f} TFLOP/s")
    print(f"ratio ours/diffusers: {ours_s / ref_s:.3f}  (goal <= 1.0; lower is faster)")
    if not args.gpu:
        y = np.asarray(fwd(ours, xj, cj, tj))
        err = np.max(np.abs(y - y_ref.permute(0, 1, 3, 4, 2).numpy())) / np.max(np.abs(y_ref.numpy()))
        print(f"max rel err vs diffusers: {err:.2e}")


if __name__ == "__main__":
    main()
