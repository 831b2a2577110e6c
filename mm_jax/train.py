"""Train the Magic Mirror adapter: ``python -m mm_jax.train --config configs/video.py[:preset] --workdir DIR``.

Stage 1 (``configs/image.py``) pre-trains on images, stage 2 (``configs/video.py``) fine-tunes on
clips starting from stage 1 (``--config.init_from=<stage-1 workdir>``). Any config field can be
overridden: ``--config.optimizer.lr=3e-5``. Re-running with the same ``--workdir`` resumes. The
loop lives in ``mm_jax.training.loop``; this file parses, calls it and prints.

A config's ``setup`` field may name a ``module:function`` that is called as ``fn(cfg, workdir)``
before training (the tiny/demo presets name ``mm_jax.demo.assets:prepare``, which builds their
random tiny models, stand-in faces and synthetic data in the workdir). It is imported by name here
so that the trainer never imports the demo's test assets.

Several processes (a pod, SLURM, ``python -m mm_jax.launch``) run the same command; they join
first (``mm_jax.distributed.initialize``). ``--workdir`` may be a URL (``gs://bucket/run``).

Exit codes (``mm_jax.exit_codes``): 0 done; 2 input refused before any work (a bad flag, config
field or value, missing data, a workdir the processes do not share; nothing is written); 1 a crash
once work started (its traceback above); 3 the loss diverged (the message names the last good
checkpoint); 75 preempted after saving a checkpoint (relaunch the same command to resume).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def setup_hook(name: str):
    """``"module:function"`` -> the function (a ValueError names the field when it cannot be found)."""
    module, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module), attr) if module and attr else None
    except ImportError as e:
        raise ValueError(f"setup={name!r}: cannot import {module!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"setup={name!r}: expected 'module:function' naming a function fn(cfg, workdir)")
    return fn


def run_setup(cfg, workdir, argv: list[str], setup_only: bool) -> None:
    """Run the config's setup hook. With several processes, process 0 first builds what the hook
    builds in a child process of its own (one JAX process on the CPU: the hook's Orbax writes of
    host-local arrays are refused inside a multi-process run, and the parent holds the
    accelerator), every process waits at a barrier, then each runs the hook, which finds its
    assets built and only fills in their paths. A child's refusal is re-raised as a ValueError."""
    import subprocess

    import jax

    hook = setup_hook(cfg.setup)
    if setup_only or jax.process_count() == 1:
        hook(cfg, workdir)
        return
    import orbax.checkpoint as ocp

    failed = None
    if jax.process_index() == 0:
        env = {k: v for k, v in os.environ.items()
               if k not in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")}
        env["JAX_PLATFORMS"] = "cpu"
        child = subprocess.run([sys.executable, "-m", "mm_jax.train", *argv, "--setup-only"], env=env,
                               stderr=subprocess.PIPE, text=True)
        if child.returncode:
            sys.stderr.write(child.stderr)
            failed = f"setup={cfg.setup!r} failed in process 0 (exit {child.returncode})"
    # every process passes the barrier, a failed setup too (its peers then refuse in their own hook)
    ocp.multihost.sync_global_processes("mm_jax_train_setup", timeout=6 * 3600,
                                        processes=set(range(jax.process_count())))
    if failed:
        raise ValueError(failed)
    hook(cfg, workdir)


def main(argv=None) -> int:
    from mm_jax import config as config_lib, distributed, exit_codes, profiling

    ap = argparse.ArgumentParser(prog="python -m mm_jax.train", description=__doc__.split("\n\n")[0],
                                 epilog="Overrides: --config.<field>=<value>, e.g. --config.train.steps=100 "
                                        "(the value is parsed as the field's type)", formatter_class=_Help)
    config_lib.add_arguments(ap)
    ap.add_argument("--workdir", required=True, help="checkpoints, logs and outputs (a folder every process sees, "
                                                     "or a URL such as gs://bucket/run); re-use it to resume")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    ap.add_argument("--profile", metavar="DIR", help="write a profiler trace of train.profile_steps steps to "
                                                     "DIR/process_K (mm_jax.profiling)")
    ap.add_argument("--setup-only", action="store_true", help=argparse.SUPPRESS)  # run_setup's child
    args, rest = ap.parse_known_args(argv)
    overrides = config_lib.split_overrides(ap, rest)
    if not args.setup_only:
        distributed.initialize()  # before anything starts a JAX backend
    from mm_jax.training import loop
    from mm_jax.training.preemption import Preempted

    workdir = loop.workdir_path(args.workdir)
    try:  # input checked before any work: refused with one line
        cfg = config_lib.load(args.config, overrides)
        loop.check(cfg)  # before the setup hook writes anything
        profiling.check_dir(args.profile)
        if cfg.setup:  # a hook refuses its own bad input before it writes (the demo's does)
            run_setup(cfg, workdir if loop.is_url(workdir) else Path(workdir),
                      sys.argv[1:] if argv is None else list(argv), args.setup_only)
        if args.setup_only:
            return exit_codes.OK
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    try:
        summary = loop.train(cfg, workdir, progress=not args.no_progress, profile=args.profile)
    except loop.Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    except loop.TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.DIVERGED
    except Preempted as e:
        print(str(e), file=sys.stderr)
        return exit_codes.PREEMPTED
    if distributed.is_main():
        print(json.dumps(summary, indent=2))
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
