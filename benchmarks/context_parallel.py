"""Multi-chip sampling at real size, compiled without the hardware: one CogVideoX-5B denoising step
(49x480x720, CFG batch 2, DDIM) on 1, 2, 4 and 8 chips with the CFG pair on ``data`` and the
sequence on ``context``, with and without the identity adapter.

    python benchmarks/context_parallel.py [--family v5e v6e h100] [--chips 1 2 4 8] [--identity both|on|off] \
        [--layout cfg|context] [--attention default|ulysses|ring] [--ring-score-mib 256] [--json out.json]

Each row is ``mm_jax.plan.plan`` of the sampler's own denoising step (the planner's ``denoise``
phase) on the first n chips of the family's topology. It prints, per device: the FLOPs (XLA's
matmuls + the attention kernels), the peak bytes and whether they fit, the all-to-all (Ulysses)
and collective-permute (ring) bytes per step, and the ideal seconds per video (50 steps at the
chip's bf16 peak; T5 and the VAE decode excluded) with the speed-up over one chip. Meshes: 1 chip
as is; n >= 2: data=2 (the CFG pair), context=n/2; the attention scheme is the DiT's default for
the mesh (Ulysses where the context size divides the heads). There is no PyTorch row: diffusers
has no context parallelism to compare with (xDiT's published figures are in the README).

GPU families need the CUDA plugin (``pip install -e ".[cuda12]"``); TPU families need libtpu.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# no GPU driver here: the CUDA plugin's start-up check is skipped, before any backend starts (as
# python -m mm_jax.plan does; targets.devices sets it too late once JAX has started its backends)
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

GIB = 1024 ** 3
STEPS = 50


def family_target(family: str, chips: int):
    """The family's target of ``chips`` devices (TPU slices 1x1, 1x2, 2x2, 2x4; GPU nodes 1x1xN)."""
    from mm_jax.plan import targets

    base = {"v5e": "v5e-8", "v6e": "v6e-8", "h100": "h100x8", "a800": "a800-80x8"}[family]
    t = targets.TARGETS[base]
    if t.is_gpu:
        return dataclasses.replace(t, name=f"{family}x{chips}", topology=f"1x1x{chips}", devices=chips)
    shape = {1: (1, 1), 2: (1, 2), 4: (2, 2), 8: (2, 4)}[chips]
    return dataclasses.replace(t, name=f"{family}-{chips}", topology=f"{family}:{shape[0]}x{shape[1]}", devices=chips,
                              hosts_bounds=(*shape, 1))


def mesh_for(chips: int, layout: str = "cfg") -> str:
    """"cfg": the CFG pair on data=2, the rest on context (the sampler's default); "context": every
    chip on context (data=1), the layout for a batch of one row or for comparing the schemes."""
    if chips == 1:
        return "data=1"
    return f"data=2,context={chips // 2}" if layout == "cfg" else f"data=1,context={chips}"


def measure(family: str, chips: int, identity: bool, layout: str = "cfg", attention: str = "default") -> dict:
    from mm_jax import plan as planner

    t = family_target(family, chips)
    models = planner.Models.real()
    if attention != "default":
        models = models.with_dit({"attention_parallelism": attention})
    t0 = time.perf_counter()
    p = planner.plan(t, "sample", mesh=mesh_for(chips, layout), models=models,
                     sample=planner.SampleSettings(identity=identity), only=("denoise",))
    ph = p.phases[0]
    row = {"family": family, "chips": chips, "mesh": p.mesh, "identity": identity, "attention": attention,
           "error": ph.error, "wall_seconds": time.perf_counter() - t0}
    c = ph.compiled
    if c is not None:
        coll = c.collectives
        row.update(flops=c.flops, xla_flops=c.xla_flops, kernel_flops=c.kernel_flops, peak_bytes=c.peak_bytes,
                   usable_bytes=p.usable_bytes, fits=p.fits(ph),
                   all_to_all_bytes=coll.get("all-to-all", {}).get("bytes", 0),
                   permute_bytes=coll.get("collective-permute", {}).get("bytes", 0),
                   ideal_video_seconds=STEPS * c.flops / t.peak_flops,
                   compile_seconds=c.lower_seconds + c.compile_seconds)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--family", nargs="+", default=["v5e", "v6e", "h100"], choices=("v5e", "v6e", "h100", "a800"))
    ap.add_argument("--chips", nargs="+", type=int, default=[1, 2, 4, 8], choices=(1, 2, 4, 8))
    ap.add_argument("--identity", choices=("both", "on", "off"), default="both")
    ap.add_argument("--layout", choices=("cfg", "context"), default="cfg",
                    help="cfg: the CFG pair on data=2, the rest on context; context: every chip on context")
    ap.add_argument("--attention", choices=("default", "ulysses", "ring"), default="default",
                    help="the DiT's attention_parallelism (default: Ulysses where the heads divide, else ring)")
    ap.add_argument("--ring-score-mib", type=float, default=None,
                    help="ring: float32 score bytes per query chunk (attention_parallel.RING_SCORE_BYTES; "
                         "default 256; a huge value: the whole block per step, as before chunking)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    if args.ring_score_mib is not None:
        from mm_jax.models import attention_parallel

        attention_parallel.RING_SCORE_BYTES = int(args.ring_score_mib * 2 ** 20)
    from mm_jax.plan import targets

    targets.allow_compile_only_libtpu()
    idents = {"both": (False, True), "on": (True,), "off": (False,)}[args.identity]
    rows = []
    for fam in args.family:
        for ident in idents:
            for n in sorted(args.chips):
                r = measure(fam, n, ident, args.layout, args.attention)
                rows.append(r)
                print(json.dumps(r), flush=True)
    print("\n| chips | mesh | attention | identity | TFLOP/device (1 chip / this) | peak GiB/device (usable) "
          "| all-to-all MiB/step | permute MiB/step | ideal s/video | speed-up vs 1 chip | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("flops") is None:
            print(f"| {r['family']} x{r['chips']} | {r['mesh']} | {r['attention']} | {r['identity']} | failed: "
                  f"{r['error'][:200]} | | | | | | |")
            continue
        one = next((o for o in rows if o["family"] == r["family"] and o["identity"] == r["identity"]
                    and o["chips"] == 1 and o.get("flops")), None)
        ratio = f"{one['flops'] / r['flops']:.2f}x" if one else ""
        speed = f"{one['ideal_video_seconds'] / r['ideal_video_seconds']:.2f}x" if one else ""
        print(f"| {r['family']} x{r['chips']} | {r['mesh']} | {r['attention']} | {'yes' if r['identity'] else 'no'} | "
              f"{r['flops'] / 1e12:.1f} ({ratio}) | {r['peak_bytes'] / GIB:.2f} {'✓' if r['fits'] else '✗'} "
              f"({r['usable_bytes'] / GIB:.2f}) | {r['all_to_all_bytes'] / 2 ** 20:.0f} | "
              f"{r['permute_bytes'] / 2 ** 20:.0f} | {r['ideal_video_seconds']:.1f} | {speed} | "
              f"{r['compile_seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
