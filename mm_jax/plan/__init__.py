"""Plan a workload at real size on a machine this host does not have: compile the functions the
sampler and the trainer run, for a TPU topology or an NVIDIA GPU node, from abstract shapes with
their shardings (no weights, no accelerator), and read each device's memory plan, operation count
and collectives off the compiled program.

    from mm_jax import plan
    p = plan.plan("v5e-1", "sample")                      # CogVideoX-5B + adapter, 49x480x720
    print(p.text()); p.to_json()
    plan.plan("h100x8", "train-video", mesh="fsdp=8", train=plan.TrainSettings(batch=16))

CLI: ``python -m mm_jax.plan --target v5e-1 --workload sample`` (``--help``). Modules:
``targets`` (the machines), ``phases`` (what is compiled, from which library function),
``aot`` (compiling and reading the compiled program), ``report`` (text, JSON, README table).
"""
from __future__ import annotations

from mm_jax.plan.phases import Models, SampleSettings, TrainSettings
from mm_jax.plan.report import DEFAULT_HBM_FRACTION, Plan, PhaseResult
from mm_jax.plan.targets import TARGETS, Target, TargetError

WORKLOADS = ("sample", "train-image", "train-video")

__all__ = ["plan", "Plan", "PhaseResult", "Models", "SampleSettings", "TrainSettings", "TARGETS", "Target",
           "TargetError", "WORKLOADS"]


def phases_for(workload: str, models: Models, platform: str, sample: SampleSettings | None = None,
               train: TrainSettings | None = None, kind: str | None = None):
    """The phases of ``workload`` (checked settings; nothing compiled yet) for ``platform`` and
    device ``kind`` (which picks the attention kernel: TPU v2/v3 cannot run splash)."""
    from mm_jax.plan import phases

    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    if workload == "sample":
        from mm_jax.plan import consisid, i2v

        if consisid.is_consisid(models):  # ConsisID: the I2V backbone with face tokens
            return consisid.sample_phases(models, sample or SampleSettings(identity=False), platform, kind)
        if i2v.is_i2v(models):  # image to video: the transformer takes 2 x the VAE's latent channels
            return i2v.sample_phases(models, sample or SampleSettings(identity=False), platform, kind)
        return phases.sample_phases(models, sample or SampleSettings(), platform, kind)
    train = train or TrainSettings.defaults(workload.split("-")[1])
    return phases.train_phases(models, train, platform, kind)


def settings_of(workload: str, sample: SampleSettings | None, train: TrainSettings | None) -> dict:
    import dataclasses

    if workload == "sample":
        s = sample or SampleSettings()
        return {"frames": s.frames, "height": s.height, "width": s.width, "steps": s.steps, "scheduler": s.scheduler,
                "cfg_batch": 2 if s.guidance > 1 else 1, "identity": s.identity, "vae_tiling": s.vae_tiling,
                "dtype": s.dtype, "quantize": s.quantize}
    t = train or TrainSettings.defaults(workload.split("-")[1])
    d = dataclasses.asdict(t)
    d.pop("adapter_overrides")
    d["trainable"] = list(t.trainable)
    return d


def plan(target: str | Target, workload: str, *, mesh: str | None = None, mesh_dcn: str | None = None,
         models: Models | None = None,
         sample: SampleSettings | None = None, train: TrainSettings | None = None,
         hbm_fraction: float = DEFAULT_HBM_FRACTION, only: tuple[str, ...] | None = None,
         devices: list | None = None, log=None, compile_cache: str | None = None) -> Plan:
    """Compile every phase of ``workload`` (or the ``only`` ones) for ``target`` on ``mesh``
    ("data=..,fsdp=..,context=..,tensor=.."; default: the sampler's mesh for ``sample``, every
    device on fsdp for training). ``mesh_dcn`` ("data=2"): plan a multi-slice run, that many
    slices of the target joined by the data-center network, ``mesh`` then within each slice (as
    the trainer's ``mesh_dcn`` and ``mesh``). ``devices``: compile for these
    attached devices (e.g. ``jax.devices()`` on the TPU itself) instead of the target's
    compile-only ones. Bad input (target, mesh, sizes, a missing compiler plugin) raises a
    ValueError naming it before anything compiles; a phase that fails to compile is reported in
    its ``PhaseResult.error``, the others still compile. ``log(text)`` hears of each phase as it
    compiles (a 5B phase takes minutes). ``compile_cache``: a folder for the planner's compile
    cache (``mm_jax.plan.cache``): a phase compiled before with the same program, devices and
    compiler is read from it (``Compiled.cache_hit``); None: compile every phase."""
    import os

    from mm_jax import parallel
    from mm_jax.plan import aot, targets

    t = targets.get(target) if isinstance(target, str) else target
    if not 0 < hbm_fraction <= 1:
        raise ValueError(f"hbm_fraction={hbm_fraction}: must lie in (0, 1]")
    models = models or Models.real()
    from mm_jax.models import quantize

    kind = quantize.matmul_type(sample.quantize if workload == "sample" and sample else None)
    if kind:
        t.quantized_peak(kind)  # a chip without that peak: refused before anything compiles
    todo = phases_for(workload, models, t.platform, sample, train, t.kind)
    if only:
        unknown = sorted(set(only) - {p.name for p in todo})
        if unknown:
            raise ValueError(f"phases {unknown} are not phases of {workload}; its phases: "
                             f"{', '.join(p.name for p in todo)}")
        todo = [p for p in todo if p.name in only]
    m = aot.make_mesh(t, mesh, devices, workload, dcn=mesh_dcn)
    batch = None if workload == "sample" else (train or TrainSettings.defaults(workload.split("-")[1])).batch
    unsplit = None if batch is None else parallel.unsplit_batch_note(batch, dict(m.shape))
    results = []
    with aot.counting_kernels():
        for ph in todo:
            what = ph.what + (f"; WARNING: {unsplit}" if unsplit else "")
            if log:
                log(f"{t.name} {workload}: compiling {ph.name} ({what})")
            try:
                fn, args = ph.build(m)
                results.append(PhaseResult(ph.name, ph.runs, what, aot.compile(fn, args, m, compile_cache)))
            except Exception as e:  # noqa: BLE001 - a phase's compile error is a result, reported by name
                if os.environ.get("MM_JAX_PLAN_RAISE"):  # debugging: the whole traceback
                    raise
                results.append(PhaseResult(ph.name, ph.runs, what, error=f"{type(e).__name__}: {e}"))
            if log:
                c = results[-1].compiled
                how = "read from the compile cache" if c and c.cache_hit else "compiled"
                log(f"  {ph.name}: " + (f"peak {c.peak_bytes / 2 ** 30:.2f} GiB/device, {how} in "
                                        f"{c.lower_seconds + c.compile_seconds:.0f} s" if c else "failed"))
    return Plan(t, workload, aot.mesh_spec(m), settings_of(workload, sample, train), models.source, results,
                hbm_fraction, mesh_dcn=aot.dcn_spec(mesh_dcn), compile_cache=compile_cache)
