"""Quantized vs bf16 sampling at real size, from the planner (no weights, no accelerator).

    python benchmarks/quantize.py [--targets v5e-1:int8,h100x1:fp8,...] [--phases text_encoder,denoise]

For each ``target:mode`` (default: v5e-1 and v6e-1 int8, h100x1 fp8-linears and fp8 (fp8 linear layers,
then also cuDNN's fp8 attention), a800-80x8 int8), runs
``python -m mm_jax.plan --workload sample`` (CogVideoX-5B + the adapter unless --no-identity, 49x480x720,
CFG batch 2, 50 DDIM steps) twice, bf16 and ``--quantize mode``, each in its own process (the CUDA targets need
the cuda12 extra), and prints per phase: peak GiB per device, ideal seconds per run (the 8-bit
matmuls and fp8 attention kernels at the chip's int8 / fp8 peak, the rest at bf16), the speed-up,
and the DiT's weight bytes. The VAE decode is not quantized (same numbers both ways); add it with
``--phases text_encoder,denoise,vae_decode`` (its TPU compile takes about 25 minutes here).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT = "v5e-1:int8,v6e-1:int8,h100x1:fp8-linears,h100x1:fp8,a800-80x8:int8"


def plan(target: str, mode: str | None, phases: str, timeout: int, identity: bool = True) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "mm_jax.plan", "--target", target, "--workload", "sample", "--phases", phases,
               "--json", str(out), "--identity" if identity else "--no-identity"]
        cmd += ["--quantize", mode] if mode else []
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if not out.exists():
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=DEFAULT, help=f"target:mode,... (default {DEFAULT})")
    ap.add_argument("--phases", default="text_encoder,denoise")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per plan")
    ap.add_argument("--identity", action=argparse.BooleanOptionalAction, default=True,
                    help="the Magic Mirror adapter in the DiT (its CFG batch hides the identity tokens from the "
                         "negative row: key lengths); --no-identity: plain CogVideoX")
    args = ap.parse_args(argv)
    print("| target | mode | phase | peak GiB/device (bf16 -> quantized) | ideal s per run (bf16 -> quantized) | "
          "speed-up | DiT weights GB |")
    print("|---|---|---|---|---|---|---|")
    for item in args.targets.split(","):
        target, mode = item.split(":")
        base, quant = (plan(target, m, args.phases, args.timeout, args.identity) for m in (None, mode))
        for pb, pq in zip(base["phases"], quant["phases"]):
            if pb["peak_bytes"] is None or pq["peak_bytes"] is None:
                print(f"| {target} | {mode} | {pb['name']} | failed: {pb['error'] or pq['error']} | | | |")
                continue
            gb = lambda p: (re.search(r"DiT weights ([\d.]+) GB", p["what"]) or [None, ""])[1]  # noqa: E731
            weights = f"{gb(pb)} -> {gb(pq)}" if gb(pb) else ""
            print(f"| {target} | {mode} | {pb['name']} | {pb['peak_bytes'] / 2 ** 30:.2f} -> "
                  f"{pq['peak_bytes'] / 2 ** 30:.2f} | {pb['ideal_seconds']:.4f} -> {pq['ideal_seconds']:.4f} | "
                  f"{pb['ideal_seconds'] / pq['ideal_seconds']:.2f}x | {weights} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
