"""Compile seconds of the real-size steps, unrolled vs scanned DiT blocks, in one run.

    python benchmarks/compile.py [--sample-target v5e-1] [--train-target v5p-8] [--timeout 3600]

Compiles, with ``python -m mm_jax.plan`` (the sampler's and the trainer's own jitted functions,
CogVideoX-5B + the Magic Mirror adapter from ``mm_jax.presets``, no weights):

* the denoising step of sampling (49x480x720, CFG batch 2, identity on) for ``--sample-target``;
* the train-video step (global batch 8 of 49x480x720, remat full, AdamW on the adapter) for
  ``--train-target`` (default v5p-8: 4 chips of 95 GB, where the step fits, so the compiler does
  all its work; an out-of-memory compile stops early and would time less);

once with the blocks unrolled (``--dit scan_layers=false``) and once scanned (``true``), each in
its own process (compiling the 5B takes several GB; two at once do not fit a small host), one
after another. Seconds are trace + lower + XLA compile on this host, per the plan's JSON.

The DiT config field that chooses scanned blocks is ``scan_layers``; a DiT without that field has
only unrolled blocks, and the table then says so instead of a scanned number.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def has_scan_field() -> bool:
    import dataclasses

    from mm_jax.models.dit_config import DiTConfig

    return "scan_layers" in {f.name for f in dataclasses.fields(DiTConfig)}


def plan_once(target: str, workload: str, phase: str, scan: bool | None, timeout: int) -> dict:
    """One planner run in its own process -> {"seconds", "peak_gib", "error", "wall"}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        cmd = [sys.executable, "-m", "mm_jax.plan", "--target", target, "--workload", workload, "--phases", phase,
               "--json", str(out)]
        if scan is not None:
            cmd += ["--dit", f"scan_layers={'true' if scan else 'false'}"]
        t0 = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s", "wall": time.perf_counter() - t0}
        wall = time.perf_counter() - t0
        if not out.exists():
            return {"error": (r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout) else
                    f"exit {r.returncode}", "wall": wall}
        p = json.loads(out.read_text())["phases"][0]
        return {"seconds": p["compile_seconds"], "peak_gib": p["peak_bytes"] / 2 ** 30 if p["peak_bytes"] else None,
                "error": p["error"], "wall": wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--sample-target", default="v5e-1")
    ap.add_argument("--train-target", default="v5p-8")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per compile")
    ap.add_argument("--only", choices=("sample", "train"), default=None, help="one of the two steps")
    args = ap.parse_args(argv)
    scan = has_scan_field()
    modes = [False, True] if scan else [None]
    rows = []
    steps = [("sample", args.sample_target, "sample", "denoise"), ("train", args.train_target, "train-video",
                                                                  "train_step")]
    for key, target, workload, phase in steps:
        if args.only and args.only != key:
            continue
        for mode in modes:
            r = plan_once(target, workload, phase, mode, args.timeout)
            rows.append((f"{workload} {phase}", target, "unrolled" if not mode else "scanned", r))
            print(f"{workload} {phase} on {target}, {'unrolled' if not mode else 'scanned'}: {r}", flush=True)
    print("\n| step | target | blocks | compile s | peak GiB/device | wall s |\n|---|---|---|---|---|---|")
    for step, target, mode, r in rows:
        sec = f"{r['seconds']:.0f}" if r.get("seconds") else f"failed: {r['error']}"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") else ""
        print(f"| {step} | {target} | {mode} | {sec} | {peak} | {r['wall']:.0f} |")
    if not scan:
        print("\nThe DiT has no scan_layers field yet: its 42 blocks are unrolled, so only that was measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
