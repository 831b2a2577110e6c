"""Compile seconds of the planner's slow TPU programs, ours and (optionally) a baseline git ref's.

    python benchmarks/compile_time.py                        # the three cases below, this checkout
    python benchmarks/compile_time.py --baseline 02cc323     # also that commit, each case right after ours
    python benchmarks/compile_time.py --case v5e-1:sample:denoise --case v5p-8:train-video:train_step

Each case is one ``python -m mm_jax.plan --target T --workload W --phases P --compile-cache off``
process (trace + lower + XLA compile of the real 5B program for the target, no hardware); the
figure is its JSON ``compile_seconds``. A baseline runs from a ``git worktree`` of the ref (kept in
``--worktree``) with ``PYTHONPATH`` pointing at it, one case of each side after the other, so both
see about the same host load; the table prints the 1-minute load average at the start of each
run, since other work on the machine inflates compile seconds (wall time: 10x at a load of 30 on 2
cores), and the planner process's CPU seconds (user + system, its whole run: start-up, tracing and
the compile), which contention inflates much less.
The issue's goals (issue 25): denoise <= 30 s, tiled decode <= 120 s, v5p-8 train-video <= 120 s.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ("v5e-1:sample:denoise", "v5e-1:sample:vae_decode", "v5p-8:train-video:train_step")
GOALS = {"denoise": 30, "vae_decode": 120, "train_step": 120}


def load() -> float:
    return os.getloadavg()[0]


def run_case(case: str, tree: Path, timeout: int) -> dict:
    """One planner process for ``case`` from the checkout ``tree``: its compile seconds, wall time
    and the load when it started."""
    target, workload, phase = case.split(":")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        env = dict(os.environ, PYTHONPATH=str(tree))
        start_load, t0 = load(), time.time()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        # older planners have no compile cache (nor the flag)
        off = ["--compile-cache", "off"] if "--compile-cache" in (tree / "mm_jax/plan/__main__.py").read_text() else []
        r = subprocess.run([sys.executable, "-m", "mm_jax.plan", "--target", target, "--workload", workload,
                            "--phases", phase, *off, "--json", str(out)],
                           cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.time() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        if r.returncode != 0 or not out.exists():
            return {"case": case, "error": r.stderr.strip().splitlines()[-1:] or [f"exit {r.returncode}"],
                    "load": start_load, "wall": wall, "cpu": cpu}
        p = json.loads(out.read_text())["phases"][0]
    return {"case": case, "compile_seconds": p["compile_seconds"], "xla_compile_seconds": p["xla_compile_seconds"],
            "peak_gib": p["peak_bytes"] / 2 ** 30, "load": start_load, "wall": wall, "cpu": cpu}


def worktree(ref: str, where: Path) -> Path:
    if not where.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(where), ref], cwd=ROOT, check=True,
                       capture_output=True)
    return where


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", metavar="TARGET:WORKLOAD:PHASE",
                    help=f"repeatable (default: {', '.join(CASES)})")
    ap.add_argument("--baseline", default=None, metavar="REF", help="also compile each case at this git ref")
    ap.add_argument("--worktree", default=None, metavar="DIR",
                    help="where the baseline's worktree goes (default: a temporary folder, removed after)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per planner process")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the rows")
    args = ap.parse_args(argv)
    cases = args.case or list(CASES)
    tmp = None
    if args.baseline:
        if args.worktree:
            base = worktree(args.baseline, Path(args.worktree))
        else:
            tmp = tempfile.mkdtemp()
            base = worktree(args.baseline, Path(tmp) / "base")
    rows = []
    try:
        for case in cases:
            sides = [("ours", ROOT)] + ([(args.baseline, base)] if args.baseline else [])
            for name, tree in sides:
                row = dict(run_case(case, tree, args.timeout), side=name)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    finally:
        if tmp:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, capture_output=True)
    print("| case | code | compile s | XLA compile s | process CPU s | peak GiB | goal s | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        goal = GOALS.get(r["case"].split(":")[2], "")
        if "error" in r:
            print(f"| {r['case']} | {r['side']} | failed: {r['error'][0][:80]} | | | | {goal} | {r['load']:.1f} |")
        else:
            print(f"| {r['case']} | {r['side']} | {r['compile_seconds']:.0f} | {r['xla_compile_seconds']:.0f} | "
                  f"{r['cpu']:.0f} | {r['peak_gib']:.2f} | {goal} | {r['load']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
