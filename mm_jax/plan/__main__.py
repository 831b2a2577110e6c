"""python -m mm_jax.plan: per-device memory, FLOPs, ideal time and collectives of a workload on a
TPU slice or GPU node, compiled on this host without the hardware.

    python -m mm_jax.plan --target v5e-1 --workload sample
    python -m mm_jax.plan --target h100x8 --workload train-video --mesh data=2,fsdp=4 --batch 16 --json plan.json
    python -m mm_jax.plan --target v5p-32 --workload train-video --mesh fsdp=8,tensor=2 --mesh-dcn data=2
    python -m mm_jax.plan --table README.md            # the README's matrix (README_ROWS) into its table

Exit codes: 0 every phase compiled; 1 a phase failed to compile (it is reported, the others still
are); 2 bad input (unknown target, a mesh that does not match the device count, sizes the models
refuse, a compiler plugin that is not installed), with a message that names it.
"""
from __future__ import annotations

import os
import sys

# The CUDA plugin checks the driver when JAX starts its backends; this host has none and only
# compiles, so the check is skipped; libtpu's process lock likewise (``allow_compile_only_libtpu``).
# Both are read when the backends start, so they are set first.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
from mm_jax.plan.targets import allow_compile_only_libtpu  # noqa: E402  (JAX imported, no backend started)

allow_compile_only_libtpu()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, except for flags whose default depends on the workload (their help says it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser():
    from mm_jax.plan import WORKLOADS, phases, report, targets
    from mm_jax.models.block_runner import REMAT_POLICIES

    ap = argparse.ArgumentParser(prog="python -m mm_jax.plan", description=__doc__, formatter_class=_Formatter)
    ap.add_argument("--target", action="append", metavar="T",
                    help=f"the machine (repeatable with --table); one of: {', '.join(targets.TARGETS)}")
    ap.add_argument("--workload", action="append", metavar="W",
                    help=f"{' | '.join(WORKLOADS)} (repeatable with --table; default there: all)")
    ap.add_argument("--mesh", default=None, metavar="SPEC",
                    help="e.g. data=2,context=4 or fsdp=4,tensor=2; its product must be the target's device "
                         "count (default: the sampler's mesh for sample (CFG on data=2, then context; fsdp x "
                         "tensor below 15 GiB per device), every device on fsdp for training, as the trainer); "
                         "with --mesh-dcn the mesh within one slice")
    ap.add_argument("--mesh-dcn", default=None, metavar="SPEC",
                    help="multi-slice: the mesh's axes across TPU slices joined by the data-center network, e.g. "
                         "data=2 plans 2 slices of the target (the full mesh is --mesh times this, axis by axis), "
                         "as the training config's mesh_dcn")
    ap.add_argument("--frames", type=int, default=None, help="default: 49 (sample, train-video), 1 (train-image)")
    ap.add_argument("--height", type=int, default=None, help="default: 480")
    ap.add_argument("--width", type=int, default=None, help="default: 720")
    ap.add_argument("--batch", type=int, default=None,
                    help="global training batch (default: 64 train-image, 8 train-video); the sampler makes one "
                         "video at a time")
    ap.add_argument("--steps", type=int, default=50, help="sample: denoising steps per video")
    ap.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm"), help="sample: the step's scheduler")
    ap.add_argument("--identity", action=argparse.BooleanOptionalAction, default=True,
                    help="sample: the adapter in the DiT (Magic Mirror); --no-identity: plain CogVideoX")
    ap.add_argument("--model", default="magic-mirror", choices=("magic-mirror", "i2v", "consisid"),
                    help="the real models planned (without --checkpoint): CogVideoX-5B (+ the Magic Mirror adapter "
                         "unless --no-identity), CogVideoX-5B-I2V image to video, or the released ConsisID (on "
                         "5B-I2V, with its EVA-CLIP face tower) (these two: sample workload, no Magic Mirror identity)")
    ap.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=True,
                    help="sample: decode in spatial tiles (what sample_identity does on accelerators)")
    ap.add_argument("--remat", default=None, choices=tuple(REMAT_POLICIES),
                    help="train: remat policy of the DiT blocks (default: full, as configs/common.py)")
    ap.add_argument("--precomputed", default=None, choices=phases.PRECOMPUTED,
                    help="train: inputs the data holds instead of frozen encoders in the step: none (VAE, T5 and "
                         "CLIP run in the step; default), latents+text (data.precomputed=True: CLIP runs), all "
                         "(also the CLIP states)")
    ap.add_argument("--trainable", default=None, choices=("adapter", "adapter,dit"),
                    help="train: what trains (default: adapter)")
    ap.add_argument("--quantize", default=None, metavar="MODE",
                    help="sample: the DiT's and T5's linear layers in int8 (TPU, A100/A800), fp8 (H100; with the "
                         "DiT's self-attention on cuDNN's fp8 kernel), fp8-linears (attention bf16) or "
                         "int8-weights; their 8-bit matmuls and fp8 attention kernels counted at the chip's "
                         "int8/fp8 peak")
    ap.add_argument("--dtype", default=None, choices=("bfloat16", "float32"),
                    help="compute dtype (default: bfloat16, or the config's model.dtype)")
    ap.add_argument("--config", default=None, metavar="FILE[:PRESET]",
                    help="train: take the step's settings (batch, frames, size, remat, dtype, optimizer, adapter "
                         "sizes, data.precomputed) from a training config, overridable with --config.a.b=v; "
                         "the flags above override it")
    ap.add_argument("--checkpoint", default=None, metavar="DIR",
                    help="plan the models of a converted checkpoint folder (only config.json files are read; "
                         "default: the real CogVideoX-5B, T5-XXL and CLIP ViT-L/14 from mm_jax.presets)")
    ap.add_argument("--adapter", default=None, metavar="DIR",
                    help="an adapter folder (image_encoder, and a trained adapter's config); default: the design's "
                         "adapter for the DiT")
    ap.add_argument("--dit", action="append", default=[], metavar="FIELD=VALUE",
                    help="set a DiT config field for this plan, repeatable (e.g. remat_policy=dots; scan_layers=false "
                         "once the DiT has it); the value is parsed as the field's type")
    ap.add_argument("--phases", default=None, metavar="NAMES",
                    help="compile only these phases, comma-separated (e.g. denoise); with --table each "
                         "workload takes those it has (--phases denoise,train_step: the step that dominates each)")
    ap.add_argument("--hbm-fraction", type=float, default=report.DEFAULT_HBM_FRACTION,
                    help="share of HBM a phase may use to count as fitting (GPU: JAX preallocates 0.75 unless "
                         "XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise)")
    ap.add_argument("--json", default=None, metavar="FILE", help="write the plan (a list of plans with --table)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="the planner's compile cache: a phase compiled before (same program, devices, compiler) "
                         "is read from DIR/plan instead of compiled (default: $MM_JAX_COMPILE_CACHE or "
                         "~/.cache/mm_jax/xla; 'off' disables). JAX's own cache cannot read back programs "
                         "compiled for devices that are not attached, so the planner keeps what it reads off them")
    ap.add_argument("--table", nargs="?", const="README.md", default=None, metavar="README",
                    help="run the README's matrix (sampling on v5e-1, v6e-1, v5e-8, h100x1, a800-80x8; both "
                         "training stages on v5p-8, v5p-32, a800-80x8, h100x8), or every given --target x "
                         "--workload, and write the table between the README's plan:table markers")
    ap.add_argument("--list-targets", action="store_true", help="print the targets table and exit")
    return ap


def _settings(args, workload: str, cfg):
    from mm_jax.plan import SampleSettings, TrainSettings

    if workload == "sample":
        if args.batch not in (None, 1):
            raise ValueError(f"--batch {args.batch}: the sampler makes one video at a time (CFG doubles it to 2); "
                             "--batch applies to the train workloads")
        if cfg is not None:
            raise ValueError("--config applies to the train workloads")
        from mm_jax.models import quantize

        quantize.check(args.quantize, "--quantize")
        d = SampleSettings()
        return SampleSettings(frames=args.frames or d.frames, height=args.height or d.height,
                              width=args.width or d.width, steps=args.steps, scheduler=args.scheduler,
                              identity=args.identity and args.model == "magic-mirror", vae_tiling=args.vae_tiling,
                              dtype=args.dtype or d.dtype, quantize=args.quantize), None
    if args.quantize:
        raise ValueError(f"--quantize {args.quantize}: quantized sampling only (the sample workload)")
    stage = workload.split("-")[1]
    t = TrainSettings.from_config(cfg) if cfg is not None else TrainSettings.defaults(stage)
    if t.stage != stage:
        raise ValueError(f"--config is a {t.stage}-stage config (data.stage={t.stage!r}) but the workload is {workload}")
    over = {k: v for k, v in dict(batch=args.batch, frames=args.frames, height=args.height, width=args.width,
                                    remat=args.remat, precomputed=args.precomputed, dtype=args.dtype).items()
            if v is not None}
    if args.trainable:
        over["trainable"] = tuple(args.trainable.split(","))
    return None, dataclasses.replace(t, **over)


PHASES = {"sample": ("text_encoder", "vae_encode", "face", "denoise", "vae_decode"), "train-image": ("train_step",),
          "train-video": ("train_step",)}

# the README's matrix (--table without --target/--workload): the runtimes users sample on, and the
# slices and nodes the two training stages run on; (target, workload, mesh), None = the default mesh.
# On v5p-32 the default (fsdp=16) cannot split stage 2's batch of 8, so each chip computes the whole
# batch (75.75 GiB, 16.4 s ideal per step); the row after it splits it (13.23 GiB, 1.49 s).
README_ROWS = tuple((t, "sample", None) for t in ("v5e-1", "v6e-1", "v5e-8", "h100x1", "a800-80x8")) + (
    ("v5p-8", "train-image", None), ("v5p-8", "train-video", None),
    ("v5p-32", "train-image", None), ("v5p-32", "train-video", None), ("v5p-32", "train-video", "fsdp=8,tensor=2"),
    ("a800-80x8", "train-image", None), ("a800-80x8", "train-video", None),
    ("h100x8", "train-image", None), ("h100x8", "train-video", None))


def _plans(args, cfg, models, progress: bool):
    """The plans asked for; with --table a row that cannot be planned (a missing compiler plugin, a
    mesh that does not fit that target) is reported in the table and the matrix goes on."""
    from mm_jax.plan import WORKLOADS, TARGETS, PhaseResult, Plan, plan

    if args.table and not args.target and not args.workload:
        combos = list(README_ROWS)
    else:
        targets = args.target or (list(TARGETS) if args.table else [])
        workloads = args.workload or (list(WORKLOADS) if args.table else [])
        combos = [(t, w, None) for t in targets for w in workloads]
    if progress:
        from tqdm.auto import tqdm

        combos = tqdm(combos, desc="planning", unit="plan")
    for t, w, row_mesh in combos:
        if progress:
            combos.set_postfix_str(f"{t} {w}")
        sample, train = _settings(args, w, cfg)
        only = tuple(args.phases.split(",")) if args.phases else None
        if only and args.table:  # a matrix of workloads: each takes the given phases it has
            mine = {p for p in only if p in PHASES[w]}
            only = tuple(mine) if mine else only
        try:
            yield plan(t, w, mesh=row_mesh or args.mesh, mesh_dcn=args.mesh_dcn, models=models, sample=sample,
                       train=train, hbm_fraction=args.hbm_fraction, only=only, compile_cache=args.compile_cache,
                       log=None if progress else (lambda text: print(text, file=sys.stderr, flush=True)))
        except ValueError as e:
            if not args.table:
                raise
            yield Plan(TARGETS[t], w, row_mesh or args.mesh or "default", {}, models.source,
                       [PhaseResult("(not planned)", 1, "", error=f"{type(e).__name__}: {e}")], args.hbm_fraction,
                       mesh_dcn=args.mesh_dcn)


def main(argv=None) -> int:
    from mm_jax import config as config_lib

    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    overrides = config_lib.split_overrides(ap, rest)
    from mm_jax import compile_cache
    from mm_jax.plan import Models, WORKLOADS, aot, report, targets

    if args.list_targets:
        print(targets.table_markdown())
        return 0
    if not args.table and (not args.target or not args.workload):
        ap.error("--target and --workload are required (or --table, or --list-targets)")
    if not args.table and (len(args.target) > 1 or len(args.workload) > 1):
        ap.error("one --target and one --workload per plan (several only with --table)")
    if overrides and not args.config:
        ap.error("--config.* overrides need --config FILE[:PRESET]")
    try:
        for t in args.target or ():
            targets.get(t)
        for w in args.workload or ():
            if w not in WORKLOADS:
                raise ValueError(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
        args.mesh_dcn = aot.dcn_spec(args.mesh_dcn)  # checked here: a bad spec exits 2 before anything compiles
        args.compile_cache = compile_cache.resolve(args.compile_cache)
        cfg = config_lib.load(args.config, overrides) if args.config else None
        if args.model != "magic-mirror" and args.checkpoint:
            real = {"i2v": "CogVideoX-5B-I2V", "consisid": "ConsisID"}[args.model]
            raise ValueError(f"--model {args.model} plans the real {real}; a --checkpoint is planned as its configs "
                             "say (an I2V checkpoint is recognised by itself)")
        if args.checkpoint:
            models = Models.from_checkpoint(args.checkpoint, args.adapter)
        elif args.model in ("i2v", "consisid"):
            from mm_jax.plan import consisid, i2v

            models = (i2v if args.model == "i2v" else consisid).real_models()
        else:
            models = Models.real()
        if args.dit:
            models = models.with_dit(dict(kv.partition("=")[::2] for kv in args.dit))
        if args.table and not os.path.exists(args.table):
            raise ValueError(f"--table {args.table}: no such file")
        plans = []
        for p in _plans(args, cfg, models, progress=bool(args.table)):
            plans.append(p)
            print(p.text() + "\n", flush=True)
            if args.table:  # row by row: an interrupted matrix keeps what it measured
                report.write_table(args.table, report.markdown_table(plans))
    except (ValueError, FileNotFoundError) as e:  # TargetError, MeshError, ConfigError are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        data = [p.to_json() for p in plans] if args.table else plans[0].to_json()
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    if args.table:
        report.write_table(args.table, report.markdown_table(plans))
        print(f"wrote the table of {len(plans)} plans into {args.table}")
    return 0 if all(p.ok for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
