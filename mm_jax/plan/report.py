"""What a plan says, as text, as JSON (``--json``) and as the README's table (``--table``).

JSON (other scripts read it; the names below are kept)::

    {"target", "workload", "mesh", "mesh_dcn", "slices", "settings", "models", "unit", "ideal_seconds_per_unit",
     "phases": [{"name", "argument_bytes", "temp_bytes", "output_bytes", "alias_bytes", "peak_bytes",
                 "hbm_bytes", "usable_bytes", "fits", "margin_bytes", "flops", "xla_flops",
                 "kernel_flops", "quantized_flops", "quantized", "quantized_kernel_flops", "kernel_targets",
                 "ideal_seconds", "runs", "compile_seconds" (= "lower_seconds": trace +
                 lower, + "xla_compile_seconds"), "collectives", "kernels", "uncounted", "error"}]}

Phase names: ``text_encoder``, ``denoise``, ``vae_decode`` (workload ``sample``), ``train_step``
(``train-image``, ``train-video``). Bytes and FLOPs are per device; ``fits`` is
``peak_bytes <= usable_bytes`` with ``usable_bytes = hbm_bytes * hbm_fraction``; ``ideal_seconds``
is ``flops / peak bf16 FLOP/s`` of one run (the time at 100% MFU), the 8-bit matmuls of a quantized
plan (``quantized_flops``, with the fp8 attention kernels' ``quantized_kernel_flops``) at the chip's
int8 / fp8 peak instead; ``runs`` is how often the phase
runs per video or training step; a phase that failed to compile has ``error`` and null numbers.
``cache_hit``: the phase's compiled program was read from the planner's compile cache (then
``xla_compile_seconds`` is the read), false: compiled, null: no cache (``compile_cache``: its
folder, or null).
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from mm_jax.plan.aot import Compiled
from mm_jax.plan.targets import GIB, Target

DEFAULT_HBM_FRACTION = 0.95   # 5% of HBM kept back for the runtime and fragmentation


@dataclasses.dataclass
class PhaseResult:
    name: str
    runs: int
    what: str
    compiled: Compiled | None = None
    error: str | None = None


@dataclasses.dataclass
class Plan:
    target: Target
    workload: str
    mesh: str
    settings: dict
    models: str
    phases: list[PhaseResult]
    hbm_fraction: float = DEFAULT_HBM_FRACTION
    mesh_dcn: str = ""      # the mesh's axes across slices ("data=2"); "" for one slice
    compile_cache: str | None = None   # the planner's compile cache folder, None: off

    @property
    def target_name(self) -> str:
        """The target, "2 x v5e-8" for two slices of it."""
        return f"{self.slices} x {self.target.name}" if self.mesh_dcn else self.target.name

    @property
    def slices(self) -> int:
        return math.prod(int(kv.split("=")[1]) for kv in self.mesh_dcn.split(",") if kv)

    @property
    def usable_bytes(self) -> int:
        return int(self.target.hbm_bytes * self.hbm_fraction)

    @property
    def unit(self) -> str:
        return "video" if self.workload == "sample" else "training step"

    @property
    def ok(self) -> bool:
        return all(p.compiled is not None for p in self.phases)

    def ideal_seconds(self, p: PhaseResult) -> float | None:
        """flops at the bf16 peak, the quantized matmuls' at the chip's int8 / fp8 peak."""
        c = p.compiled
        if c is None:
            return None
        fast = self.target.quantized_peak(c.quantized) if c.quantized else self.target.peak_flops
        return (c.flops - c.quantized_flops) / self.target.peak_flops + c.quantized_flops / fast

    def ideal_seconds_per_unit(self) -> float | None:
        if not self.ok:
            return None
        return sum(self.ideal_seconds(p) * p.runs for p in self.phases)

    def fits(self, p: PhaseResult) -> bool | None:
        if p.compiled is None:
            return False if p.error and _out_of_memory(p.error) else None
        return p.compiled.peak_bytes <= self.usable_bytes

    # -- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        phases = []
        for p in self.phases:
            c = p.compiled
            d = {"name": p.name, "what": p.what, "runs": p.runs, "hbm_bytes": self.target.hbm_bytes,
                 "usable_bytes": self.usable_bytes, "fits": self.fits(p), "error": p.error}
            if c is None:
                d.update({k: None for k in ("argument_bytes", "temp_bytes", "output_bytes", "alias_bytes",
                                            "generated_code_bytes", "peak_bytes", "margin_bytes", "flops",
                                            "xla_flops", "kernel_flops", "quantized_flops", "quantized",
                                            "quantized_kernel_flops", "kernel_targets",
                                            "ideal_seconds", "compile_seconds",
                                            "lower_seconds", "xla_compile_seconds", "cache_hit", "collectives",
                                            "kernels", "uncounted")})
            else:
                d.update(argument_bytes=c.argument_bytes, temp_bytes=c.temp_bytes, output_bytes=c.output_bytes,
                         alias_bytes=c.alias_bytes, generated_code_bytes=c.generated_code_bytes,
                         peak_bytes=c.peak_bytes, margin_bytes=self.usable_bytes - c.peak_bytes, flops=c.flops,
                         xla_flops=c.xla_flops, kernel_flops=c.kernel_flops, quantized_flops=c.quantized_flops,
                         quantized=c.quantized, quantized_kernel_flops=c.quantized_kernel_flops,
                         kernel_targets=c.kernel_targets,
                         ideal_seconds=self.ideal_seconds(p),
                         compile_seconds=c.lower_seconds + c.compile_seconds, lower_seconds=c.lower_seconds,
                         xla_compile_seconds=c.compile_seconds, cache_hit=c.cache_hit,
                         collectives=c.collectives, kernels=c.kernels, uncounted=c.uncounted)
            phases.append(d)
        t = self.target
        return {"target": t.name, "workload": self.workload, "mesh": self.mesh, "mesh_dcn": self.mesh_dcn,
                "slices": self.slices, "settings": self.settings,
                "models": self.models, "device": {"chip": t.chip, "devices": t.devices, "hbm_bytes": t.hbm_bytes,
                                                  "peak_flops": t.peak_flops, "hbm_fraction": self.hbm_fraction},
                "unit": self.unit, "ideal_seconds_per_unit": self.ideal_seconds_per_unit(), "phases": phases,
                "compile_cache": self.compile_cache}

    # -- text ---------------------------------------------------------------------------------
    def text(self) -> str:
        t = self.target
        across = f" (across slices: {self.mesh_dcn})" if self.mesh_dcn else ""
        slices = f"{self.slices} slices of " if self.mesh_dcn else ""
        lines = [f"{self.workload} on {self.target_name}: {slices}{t.devices} x {t.chip} ({t.hbm_bytes / GIB:.2f} "
                 f"GiB HBM, {t.peak_flops / 1e12:.0f} TFLOP/s bf16 each), mesh {self.mesh}{across}",
                 "  " + ", ".join(f"{k} {v}" for k, v in self.settings.items() if not isinstance(v, dict)),
                 f"  models: {self.models}",
                 f"  per device; usable HBM = {self.hbm_fraction:.0%} of {t.hbm_bytes / GIB:.2f} = "
                 f"{self.usable_bytes / GIB:.2f} GiB; peak = args + out + temp - aliased (donated)", ""]
        head = (f"  {'phase':13s} {'args':>7s} {'temp':>7s} {'out':>7s} {'peak':>7s}  {'fits (margin)':18s} "
                f"{'TFLOP/dev = XLA + kernels':>27s} {'ideal s':>9s} {'runs':>5s} {'compile s':>9s} {'cache':>5s}")
        lines += [head, "  " + "-" * (len(head) - 2)]
        for p in self.phases:
            c = p.compiled
            if c is None:
                lines.append(f"  {p.name:13s} FAILED: {_first_line(p.error)}")
                continue
            g = lambda b: f"{b / GIB:7.2f}"  # noqa: E731
            margin = self.usable_bytes - c.peak_bytes
            fit = f"{'yes' if margin >= 0 else 'NO'} ({margin / GIB:+.2f} GiB)"
            fl = f"{c.flops / 1e12:.3f} = {c.xla_flops / 1e12:.3f} + {c.kernel_flops / 1e12:.3f}"
            lines.append(f"  {p.name:13s} {g(c.argument_bytes)} {g(c.temp_bytes)} {g(c.output_bytes)} "
                         f"{g(c.peak_bytes)}  {fit:18s} {fl:>27s} {self.ideal_seconds(p):9.4f} {p.runs:5d} "
                         f"{c.lower_seconds + c.compile_seconds:9.1f} {_cache_word(c.cache_hit):>5s}")
        lines.append("  (GiB per device; compile s = trace + lower + XLA compile on this host, or the read of a "
                     "cache hit; cache: " + (f"{self.compile_cache}/plan)" if self.compile_cache else "off)"))
        lines.append("")
        for p in self.phases:
            lines.append(f"  {p.name}: {p.what}")
            if p.compiled is not None:
                coll = p.compiled.collectives
                lines.append("    collectives: " + (", ".join(
                    f"{k} x{v['count']} ({v['bytes'] / GIB:.3f} GiB)" for k, v in sorted(coll.items())) or "none"))
                if p.compiled.kernels:
                    lines.append("    attention kernels (calls per run): " + ", ".join(
                        f"{k} x{n}" for k, n in sorted(p.compiled.kernels.items())) + " (custom calls: " + ", ".join(
                        f"{k} x{n}" for k, n in sorted(p.compiled.kernel_targets.items())) + ")")
                if p.compiled.quantized:
                    att = p.compiled.quantized_kernel_flops
                    att = f", {att / 1e12:.3f} of them in fp8 attention kernels" if att else ""
                    lines.append(f"    quantized matmuls: {p.compiled.quantized_flops / 1e12:.3f} TFLOP "
                                 f"({p.compiled.quantized}{att}) at "
                                 f"{self.target.quantized_peak(p.compiled.quantized) / 1e12:g}"
                                 f" TOPS, the rest at {self.target.peak_flops / 1e12:g} TFLOP/s bf16")
                for note in p.compiled.uncounted:
                    lines.append(f"    NOT COUNTED: {note}")
            else:
                lines.append(f"    error: {p.error}")
        total = self.ideal_seconds_per_unit()
        if total is not None:
            terms = " + ".join(f"{p.runs} x {self.ideal_seconds(p):.4f}" if p.runs > 1 else f"{self.ideal_seconds(p):.4f}"
                               for p in self.phases)
            lines += ["", f"  ideal time per {self.unit} at 100% of peak (the MFU ceiling): {terms} = {total:.2f} s; "
                          f"at 40% MFU {total / 0.4:.2f} s"]
        return "\n".join(lines)


def _cache_word(hit: bool | None) -> str:
    return "-" if hit is None else "hit" if hit else "miss"


def _first_line(msg: str | None) -> str:
    return (msg or "").strip().splitlines()[0][:160] if msg else ""


def _out_of_memory(msg: str) -> bool:
    return bool(re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory|Exceeded hbm capacity", msg))


# -- the README table -------------------------------------------------------------------------

TABLE_START, TABLE_END = "<!-- plan:table:start -->", "<!-- plan:table:end -->"


def markdown_table(plans: list[Plan]) -> str:
    """One row per compiled phase of each (target, workload): bytes per device (arguments +
    temporaries + outputs = peak, against usable HBM), TFLOP per device (XLA's count + the
    attention kernels'), the ideal seconds per run and per video / training step, compile seconds."""
    rows = ["| target | workload | mesh | phase | args + temp + out = peak GiB (usable) | TFLOP = XLA + kernels "
            "| ideal s per run (runs) | ideal s per video / step | compile s |",
            "|---|---|---|---|---|---|---|---|---|"]
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    for pl in plans:
        unit = pl.ideal_seconds_per_unit()
        for i, p in enumerate(pl.phases):
            c = p.compiled
            head = f"| {pl.target_name} | {pl.workload} | {pl.mesh} | {p.name} |"
            if c is None:
                why = "out of memory" if pl.fits(p) is False else "failed"
                rows.append(f"{head} ✗ {why}: {_first_line(p.error)[:100]} ({g(pl.usable_bytes)}) | | | | |")
                continue
            mark = "✓" if pl.fits(p) else "✗"
            runs = f" ({p.runs})" if p.runs > 1 else ""
            per_unit = f"{unit:.2f} per {pl.unit}" if unit is not None and i == 0 else ""
            rows.append(f"{head} {g(c.argument_bytes)} + {g(c.temp_bytes)} + {g(c.output_bytes)} = "
                        f"{g(c.peak_bytes)} {mark} ({g(pl.usable_bytes)}) | {c.flops / 1e12:.1f} = "
                        f"{c.xla_flops / 1e12:.1f} + {c.kernel_flops / 1e12:.1f} | {pl.ideal_seconds(p):.3f}{runs} | "
                        f"{per_unit} | {c.lower_seconds + c.compile_seconds:.0f} |")
    return "\n".join(rows)


def write_table(readme, table: str) -> None:
    """Replace what lies between the table markers of ``readme`` (a path) by ``table``."""
    from pathlib import Path

    path = Path(readme)
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path}: no {TABLE_START} ... {TABLE_END} markers to write the table between")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    path.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
