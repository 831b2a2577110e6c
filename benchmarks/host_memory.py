"""Peak host memory of converting and of sampling the random-weight CogVideoX-5B, before and after.

    python benchmarks/host_memory.py --work /tmp/big [--old 70e180f] [--layers N] [--keep]

Builds the random-weight copy of the published 5B pipeline folder once (``tests/random_checkpoint.py``:
real keys, shapes and dtypes from the manifests, bf16 shards with index files, T5's tied embedding
stored once; 21 GB of disk at full size, ``--layers N`` keeps N blocks of the DiT and of T5), then
runs, each as a child process whose resident memory (RSS, the process's own pages plus the file
pages it maps) is sampled every 50 ms and whose exact peak is the kernel's ``ru_maxrss``:

- convert: ``tools/convert_weights/from_torch.py --src SRC --dst DST``, with this tree's code and
  (``--old COMMIT``) with the code of that commit (``git archive`` into WORK/old_tree);
- sample: ``python -m mm_jax.sample --checkpoint DST --frames 9 --height 64 --width 64 --steps 2
  --dtype bfloat16 --prompt "a man walks"`` on each code's converted folder; the child marks when
  ``checkpoint.load_component`` starts and ends, so the table gives the peak of each phase (load
  text_encoder, encode, load transformer, denoise, load vae, decode).

A child whose RSS passes ``--cap-gib`` (default: the memory available at the start less 1 GiB) is
killed and reported as such, so a run that would exhaust the machine stops first. Prints a table
with the command, the machine (cores, memory available) and the load average around each run.
WORK is deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
SAMPLE_ARGS = ["--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--dtype", "bfloat16",
               "--prompt", "a man walks", "--quiet"]
# run inside the sampling child: marks each load_component on stderr, then runs the CLI
SAMPLE_DRIVER = """
import sys, time
from mm_jax import checkpoint
_load = checkpoint.load_component
def load_component(ckpt_dir, name, **kw):
    print(f"@phase load {name}", file=sys.stderr, flush=True)
    out = _load(ckpt_dir, name, **kw)
    print(f"@phase after {name}", file=sys.stderr, flush=True)
    return out
checkpoint.load_component = load_component
from mm_jax import sample
sys.exit(sample.main(sys.argv[1:]))
"""
PHASE_NAMES = {("load", "text_encoder"): "load text_encoder", ("after", "text_encoder"): "encode prompts",
               ("load", "transformer"): "load transformer", ("after", "transformer"): "denoise",
               ("load", "vae"): "load vae", ("after", "vae"): "decode + write"}


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def rss_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass
class Run:
    label: str
    command: str
    rc: int = 0
    wall: float = 0.0
    peak: int = 0                       # ru_maxrss of the child (exact)
    phases: dict = field(default_factory=dict)   # phase -> peak sampled RSS in it
    killed_at_cap: bool = False
    load: tuple = ()
    available: int = 0
    tail: str = ""


def measure(label: str, cmd: list[str], *, cwd: Path, env: dict, cap: int, first_phase: str,
            markers: dict | None = None, log: Path | None = None) -> Run:
    """Run ``cmd``, sampling its RSS; stderr lines matching ``markers`` (regex -> phase or a callable
    on the match) start a new phase. Killed when the RSS passes ``cap``."""
    run = Run(label, " ".join(cmd if len(cmd) < 4 or cmd[1] != "-c" else [cmd[0], "<driver>", *cmd[3:]]),
              load=os.getloadavg(), available=mem_available())
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    phase = [first_phase]
    lines = []

    def read():
        for line in proc.stdout:
            lines.append(line)
            if log:
                with open(log, "a") as fh:
                    fh.write(line)
            for pat, name in (markers or {}).items():
                m = re.search(pat, line)
                if m:
                    phase[0] = name(m) if callable(name) else name

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while True:
        r = rss_of(proc.pid)
        run.phases[phase[0]] = max(run.phases.get(phase[0], 0), r)
        if r > cap and not run.killed_at_cap:
            run.killed_at_cap = True
            proc.send_signal(signal.SIGKILL)
        try:
            _, status, usage = os.wait4(proc.pid, os.WNOHANG)
        except ChildProcessError:
            break
        if _:
            run.rc = os.waitstatus_to_exitcode(status)
            run.peak = usage.ru_maxrss * 1024
            break
        time.sleep(0.05)
    run.wall = time.time() - t0
    reader.join(timeout=10)
    run.load = run.load + os.getloadavg()
    run.tail = "".join(lines[-15:])
    return run


def code_env(tree: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["PYTHONPATH"] = str(tree)  # ahead of the editable install's finder
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def convert_run(label, tree: Path, src: Path, dst: Path, cap: int, log: Path) -> Run:
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "tools/convert_weights/from_torch.py", "--src", str(src), "--dst", str(dst)]
    return measure(label, cmd, cwd=tree, env=code_env(tree), cap=cap, first_phase="check + plan", log=log,
                   markers={r"^(\w+): writing \d+ parameters": lambda m: f"write {m.group(1)}"})


def sample_run(label, tree: Path, ckpt: Path, out: Path, cap: int, log: Path) -> Run:
    cmd = [sys.executable, "-c", SAMPLE_DRIVER, "--checkpoint", str(ckpt), "--out", str(out), *SAMPLE_ARGS]
    return measure(label, cmd, cwd=tree, env=code_env(tree), cap=cap, first_phase="start", log=log,
                   markers={r"@phase (load|after) (\w+)": lambda m: PHASE_NAMES.get(m.groups(), " ".join(m.groups()))})


def table(runs: list[Run]) -> str:
    rows = ["| run | peak RSS GiB | wall s | exit | peak per phase (GiB, sampled every 50 ms) "
            "| load avg before -> after | available GiB at start |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        phases = ", ".join(f"{k} {v / GIB:.2f}" for k, v in r.phases.items())
        peak = f">= {r.peak / GIB:.2f} (killed at the cap)" if r.killed_at_cap else f"{r.peak / GIB:.2f}"
        after = r.load[3] if len(r.load) > 3 else float("nan")
        rows.append(f"| {r.label} | {peak} | {r.wall:.0f} | {r.rc} | {phases} | "
                    f"{r.load[0]:.1f} -> {after:.1f} | {r.available / GIB:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="folder for the source, the trees and the outputs")
    ap.add_argument("--old", default=None, help="also measure the code of this git commit (e.g. 70e180f)")
    ap.add_argument("--layers", type=int, default=None, help="keep N blocks of the DiT and of T5 (default: all)")
    ap.add_argument("--only", choices=("convert", "sample"), default=None)
    ap.add_argument("--cap-gib", type=float, default=None,
                    help="kill a child above this RSS (default: memory available at the start less 1 GiB)")
    ap.add_argument("--keep", action="store_true", help="keep WORK (the source folder is reused by the next run)")
    args = ap.parse_args(argv)
    work = args.work.absolute()
    work.mkdir(parents=True, exist_ok=True)
    cap = int(args.cap_gib * GIB) if args.cap_gib else mem_available() - GIB
    print(f"machine: {os.cpu_count()} cores, {mem_available() / GIB:.1f} GiB available, load {os.getloadavg()}; "
          f"cap {cap / GIB:.1f} GiB", flush=True)
    src = work / "src"
    if not (src / "model_index.json").exists():
        from tests.random_checkpoint import build_5b

        t0 = time.time()
        shutil.rmtree(src, ignore_errors=True)
        build_5b(work / "src.partial", layers=args.layers).rename(src)
        print(f"built {src} in {time.time() - t0:.0f} s", flush=True)
    trees = {"after": ROOT}
    if args.old:
        old = work / f"old_tree_{args.old}"
        if not old.exists():
            old.mkdir()
            archive = subprocess.run(["git", "archive", args.old], cwd=ROOT, capture_output=True, check=True).stdout
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        trees = {f"before ({args.old})": old, **trees}
    runs = []
    log = work / "children.log"
    try:
        for name, tree in trees.items():
            ckpt = work / f"ckpt_{'old' if tree != ROOT else 'new'}"
            if args.only in (None, "convert") or not (ckpt / "mm_jax_checkpoint.json").exists():
                runs.append(convert_run(f"convert, {name}", tree, src, ckpt, cap, log))
                print(table(runs[-1:]), flush=True)
                if runs[-1].rc != 0:
                    print(runs[-1].tail, flush=True)
                    continue
            if args.only in (None, "sample"):
                runs.append(sample_run(f"sample, {name}", tree, ckpt, work / f"x_{ckpt.name}.mp4", cap, log))
                print(table(runs[-1:]), flush=True)
                if runs[-1].rc != 0:
                    print(runs[-1].tail, flush=True)
    finally:
        print("\n" + table(runs))
        print("\ncommands:\n" + "\n".join(f"  {r.label}: {r.command}" for r in runs))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.rc == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
