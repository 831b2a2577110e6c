"""VAE decode: ours vs diffusers on the same weights, time and peak memory, one run.

CPU (default): decode of a 1x4x16x16x16 latent (4 latent frames, 16x16, 16 channels) with the real
5B VAE widths (random weights converted by our tool), fp32; peak host RSS of each side measured
in its own subprocess. GPU (--gpu): the full 13x60x90 latent in bf16 with tiling, time and peak
device memory, ours vs diffusers.

    python benchmarks/vae.py [--gpu]
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _reset_peak_rss() -> None:
    """Linux: restart the VmHWM high-water mark, so that loading weights does not count as decoding."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM"))


def _child(side: str, folder: str, gpu: bool, repeat: int):
    import numpy as np

    shape = (1, 13, 60, 90, 16) if gpu else (1, 4, 16, 16, 16)
    z = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    if side == "ours":
        import jax
        import jax.numpy as jnp

        from mm_jax import checkpoint

        kw = dict(dtype="bfloat16", param_dtype="bfloat16", use_tiling=True) if gpu else {}
        vae = checkpoint.load_component(Path(folder) / "ckpt", "vae", **kw)
        zj = jnp.asarray(z, jnp.bfloat16 if gpu else jnp.float32)
        from flax import nnx

        fn = nnx.jit(lambda m, v: m.decode(v))
        _reset_peak_rss()
        t0 = time.perf_counter()
        fn(vae, zj).block_until_ready()
        first = time.perf_counter() - t0
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn(vae, zj).block_until_ready()
            times.append(time.perf_counter() - t0)
        mem = jax.devices()[0].memory_stats().get("peak_bytes_in_use", 0) if gpu else 0
    else:
        import torch
        from diffusers import AutoencoderKLCogVideoX

        dev, dt = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
        vae = AutoencoderKLCogVideoX.from_pretrained(Path(folder) / "src", torch_dtype=dt).to(dev).eval()
        if gpu:
            vae.enable_tiling()
        zt = torch.from_numpy(z).permute(0, 4, 1, 2, 3).to(dev, dt)
        times, first = [], None
        _reset_peak_rss()
        for i in range(repeat + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                vae.decode(zt)
            if gpu:
                torch.cuda.synchronize()
            (times.append if i else (lambda t: None))(time.perf_counter() - t0)
            first = first or time.perf_counter() - t0
        mem = torch.cuda.max_memory_allocated() if gpu else 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"median": sorted(times)[len(times) // 2], "first": first, "rss": rss,
                      "decode_rss": _peak_rss(), "device_mem": mem}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child(args.child[0], args.child[1], args.gpu, args.repeat)
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from tools.convert_weights.from_torch import convert

    folder = Path(tempfile.mkdtemp())
    from mm_jax import presets

    cfg = presets.load("cogvideox_vae")  # the real VAE's config, shipped with the package
    torch.manual_seed(0)
    AutoencoderKLCogVideoX(**{k: v for k, v in cfg.items() if not k.startswith("_")}).save_pretrained(folder / "src")
    convert(folder / "src", folder / "ckpt")
    res = {}
    try:
        for side in ("ours", "diffusers"):
            cmd = [sys.executable, __file__, "--child", side, str(folder)] + (["--gpu"] if args.gpu else []) + \
                  ["--repeat", str(args.repeat)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(f"{side} failed")
            res[side] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # two copies of the 5B VAE weights
    o, d = res["ours"], res["diffusers"]
    what = "13x60x90 bf16 tiled" if args.gpu else "1x4x16x16x16 fp32"
    print(f"VAE decode of a {what} latent (5B widths)")
    gib = 2 ** 30
    for name, r, extra in (("ours", o, f" (first call incl. compile {o['first']:.1f} s)"), ("diffusers", d, "")):
        print(f"{name + ':':10} {r['median']:.2f} s{extra}, peak host RSS while decoding {r['decode_rss'] / gib:.2f} GiB "
              f"(whole process {r['rss'] / gib:.2f} GiB)"
              + (f", peak device {r['device_mem'] / gib:.2f} GiB" if args.gpu else ""))
    print(f"ratio ours/diffusers: time {o['median'] / d['median']:.3f}, host memory while decoding "
          f"{o['decode_rss'] / d['decode_rss']:.3f}" + (f", device memory {o['device_mem'] / d['device_mem']:.3f}"
                                                        if args.gpu else ""))


if __name__ == "__main__":
    main()
