"""Dataset building: the Beam DirectRunner (TFDS builder) against today's multiprocessing builder.

Both build the same synthetic source (``--clips`` clips of ``--frames`` frames at 64x64, stand-in
face models) into records, each in a fresh subprocess, at each worker count in ``--workers``
(0: in-process; N: N worker processes, ``mm_jax.data.build --workers N`` and DirectRunner
``multi_processing`` with N workers). Printed: wall time, examples/s, the ratio DirectRunner /
today's, and the peak memory of the whole process tree (RSS summed over the processes, sampled
every 0.1 s), with the machine's load average before and after.

    python benchmarks/data_build.py [--clips 200] [--frames 9] [--workers 0 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUILD = {
    "today": "from mm_jax.data.build import build_dataset\n"
             "if __name__ == '__main__':  # its pool spawns processes that import this file\n"
             "    s = build_dataset({src!r}, {out!r}, {pack!r}, workers={workers}, progress=False)\n"
             "    print('RECORDS', s['records'])\n",
    "beam": "from mm_jax.data.prepare import prepare\n"
            "if __name__ == '__main__':\n"
            "    s = prepare('mm_faces_manifest', {src!r}, {out!r}, {pack!r}, workers={workers}, progress=False)\n"
            "    print('RECORDS', sum(s['records'].values()))\n",
}


def run(kind: str, src: Path, out: Path, pack: Path, workers: int) -> tuple[float, int, float]:
    """-> (seconds, records, peak RSS of the process tree in GiB)."""
    import psutil

    script = out.parent / f"{out.name}.py"
    script.write_text(BUILD[kind].format(src=str(src), out=str(out), pack=str(pack), workers=workers))
    log = out.parent / f"{out.name}.log"  # a file, not a pipe: Beam's workers log a lot (a full pipe blocks them)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, str(script)], stdout=f, stderr=subprocess.STDOUT,
                                cwd=Path(__file__).resolve().parents[1])
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root] + root.children(recursive=True)
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.1)
    seconds = time.perf_counter() - t0
    stdout = log.read_text()
    if proc.returncode:
        raise RuntimeError(f"{kind} build with {workers} workers failed (exit {proc.returncode}): {stdout[-2000:]}")
    records = int(next(line.split()[1] for line in stdout.splitlines() if line.startswith("RECORDS")))
    return seconds, records, peak / 2 ** 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--clips", type=int, default=200, help="synthetic clips in the source")
    ap.add_argument("--frames", type=int, default=9, help="frames per clip")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to measure")
    args = ap.parse_args(argv)

    from mm_jax.demo.synthetic import make_demo_source
    from mm_jax.demo.assets import standin_faces

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = make_demo_source(tmp / "src", num_clips=args.clips, frames=args.frames, seed=0)
        pack = standin_faces(tmp)
        print(f"{args.clips} synthetic clips x {args.frames} frames at 64x64, stand-in face models; "
              f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} before")
        print(f"{'workers':>7} | {'builder':<28} | {'time s':>7} | {'examples/s':>10} | {'peak RSS GiB':>12} | ratio")
        for w in args.workers:
            t_today, n_today, m_today = run("today", src, tmp / f"today{w}", pack, w)
            t_beam, n_beam, m_beam = run("beam", src, tmp / f"beam{w}", pack, w)
            if n_today != n_beam:
                raise RuntimeError(f"the builders disagree: {n_today} vs {n_beam} records")
            mode = "in_memory" if w <= 1 else f"multi_processing x{w}"
            print(f"{w:>7} | {'mm_jax.data.build':<28} | {t_today:7.1f} | {n_today / t_today:10.2f} | "
                  f"{m_today:12.2f} |")
            print(f"{w:>7} | {'DirectRunner ' + mode:<28} | {t_beam:7.1f} | {n_beam / t_beam:10.2f} | "
                  f"{m_beam:12.2f} | {(n_beam / t_beam) / (n_today / t_today):.2f}x examples/s, "
                  f"{m_beam / m_today:.2f}x memory")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
