"""The machines the planner compiles for, in one table, and their compile-only devices.

Each target is a TPU slice (a libtpu topology) or an NVIDIA node (a GPU target description for
the CUDA plugin). Figures, per chip / GPU:

* TPU: bf16 peak and HBM from the Cloud TPU system-architecture pages (checked 2026):
  v5e 197 TFLOP/s, 16 GB (docs.cloud.google.com/tpu/docs/v5e); v6e 918 TFLOP/s, 32 GB (.../v6e);
  v5p 459 TFLOP/s, 95 GB (.../v5p); v4 275 TFLOP/s, 32 GiB (.../v4); v2 45 TFLOP/s and 16 GiB per
  chip (the v2 page defers to Jouppi et al., "A Domain Specific Supercomputer for Training Deep
  Neural Networks", 2020; 180 TFLOP/s per 4-chip v2-8 as announced). A v2 chip's two
  TensorCores are two JAX devices of 8 GiB (no megacore): v2-8 = 8 devices, 2x2 chips, the Colab
  TPU runtime. The pages write GB for v5e,
  v6e and v5p and GiB for v4; the table counts all of them as GiB. Chips per name: a v5e/v6e
  name counts chips (v5e-8 = 8 chips, 2x4); a v4/v5p name counts TensorCores, two per chip, which
  JAX sees as one "megacore" device (v4-8 and v5p-8 = 4 chips, 2x2x1; v5p-32 = 16 chips, 2x2x4).
* GPU: dense bf16 tensor-core peak from NVIDIA's datasheets (H100 SXM 989 TFLOP/s, half the
  1,979 "with sparsity"; A100 80GB 312 TFLOP/s); the A800 is an A100 with NVLink cut to 400 GB/s,
  same compute and memory. Memory is the ``device_memory_size`` of the XLA target description
  shipped in ``gpu_specs/`` (from openxla/xla, see the files' headers).
* Quantized matmul peaks (``quantized_peaks``, dense, per chip; ``--quantize``): TPU int8 TOPS from
  the same Cloud TPU pages: v5e 394 (vs 197 bf16), v6e 1836 (vs 918), v5p 918 (vs 459); NVIDIA
  datasheets, dense (half the "with sparsity" figure): H100 SXM fp8 1979 and int8 1979 TOPS
  (vs 989 bf16), A100 / A800 80GB int8 624 TOPS (vs 312; no fp8 tensor cores). v2 and v4 list no
  int8 rate above bf16: none here, and a quantized plan for them is refused.

``host_offload``: whether the compile-only devices expose a host memory space (``pinned_host``),
which remat policies that offload activations need. libtpu's do; the CUDA plugin's compile-only
devices expose none, so offloading cannot be compiled for the GPU targets here.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

GIB = 1024 ** 3
SPECS = Path(__file__).resolve().parent / "gpu_specs"


@dataclasses.dataclass(frozen=True)
class Target:
    """One machine: ``devices`` JAX devices of ``hbm_bytes`` each, ``peak_flops`` bf16 FLOP/s each."""
    name: str
    platform: str          # "tpu" | "cuda"
    topology: str          # libtpu topology ("v5e:2x4") or the CUDA plugin's "1x1xN"
    devices: int
    hbm_bytes: int
    peak_flops: float
    host_offload: bool
    chip: str              # what the chip is called
    kind: str              # what JAX calls it (``Device.device_kind``)
    chip_config: str = "default"      # TPU: "megacore" joins a v4/v5p chip's two TensorCores
    gpu_spec: str = ""                # GPU: file in gpu_specs/
    hosts_bounds: tuple = (2, 2, 1)   # TPU: chips per host (a smaller slice gets its own shape)
    quantized_peaks: tuple = ()       # (("int8", OP/s), ("fp8", OP/s)) per device: dense 8-bit matmul peaks

    def quantized_peak(self, kind: str) -> float:
        """The ``kind`` ("int8" | "fp8") matmul peak per device; ValueError when the chip has none."""
        peaks = dict(self.quantized_peaks)
        if kind not in peaks:
            raise ValueError(f"target {self.name} ({self.chip}) has no {kind} matmul peak in the table; it has "
                             f"{', '.join(peaks) or 'none'} (--quantize int8-weights quantizes the weights only)")
        return peaks[kind]

    @property
    def is_gpu(self) -> bool:
        return self.platform == "cuda"

    @property
    def extra(self) -> str:
        """The pip extra that brings this target's compiler."""
        return "cuda12" if self.is_gpu else "tpu"


KINDS = {"TPU v2": "TPU v2", "TPU v5e": "TPU v5 lite", "TPU v6e": "TPU v6 lite", "TPU v4": "TPU v4", "TPU v5p": "TPU v5",
         "H100 SXM 80GB": "NVIDIA H100 80GB HBM3", "A100 SXM 80GB": "NVIDIA A100-SXM4-80GB",
         "A800 SXM 80GB": "NVIDIA A800-SXM4-80GB"}


# dense 8-bit matmul peaks per chip in TOPS (sources in the module docstring)
QUANTIZED_TOPS = {"TPU v5e": {"int8": 394}, "TPU v6e": {"int8": 1836}, "TPU v5p": {"int8": 918},
                  "H100 SXM 80GB": {"fp8": 1979, "int8": 1979}, "A100 SXM 80GB": {"int8": 624},
                  "A800 SXM 80GB": {"int8": 624}}


def _peaks(chip):
    return tuple((k, v * 1e12) for k, v in QUANTIZED_TOPS.get(chip, {}).items())


def _tpu(name, topology, devices, hbm_gib, tflops, chip, chip_config="default", hosts_bounds=(2, 2, 1)):
    return Target(name, "tpu", topology, devices, int(hbm_gib * GIB), tflops * 1e12, True, chip, KINDS[chip],
                  chip_config, hosts_bounds=hosts_bounds, quantized_peaks=_peaks(chip))


def _gpu(name, devices, spec, mem_bytes, tflops, chip):
    return Target(name, "cuda", f"1x1x{devices}", devices, mem_bytes, tflops * 1e12, False, chip, KINDS[chip],
                  gpu_spec=spec, quantized_peaks=_peaks(chip))


H100_BYTES, A100_80_BYTES = 84942979072, 85100068864   # device_memory_size in gpu_specs/*.txtpb

TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v5e-1", "v5e:1x1", 1, 16, 197, "TPU v5e", hosts_bounds=(1, 1, 1)),
    _tpu("v5e-4", "v5e:2x2", 4, 16, 197, "TPU v5e"),
    _tpu("v5e-8", "v5e:2x4", 8, 16, 197, "TPU v5e", hosts_bounds=(2, 4, 1)),
    _tpu("v6e-1", "v6e:1x1", 1, 32, 918, "TPU v6e", hosts_bounds=(1, 1, 1)),
    _tpu("v6e-8", "v6e:2x4", 8, 32, 918, "TPU v6e", hosts_bounds=(2, 4, 1)),
    _tpu("v2-8", "v2:2x2", 8, 8, 22.5, "TPU v2"),
    _tpu("v4-8", "v4:2x2x1", 4, 32, 275, "TPU v4", "megacore"),
    _tpu("v5p-8", "v5p:2x2x1", 4, 95, 459, "TPU v5p", "megacore"),
    _tpu("v5p-32", "v5p:2x2x4", 16, 95, 459, "TPU v5p", "megacore"),
    _gpu("h100x1", 1, "h100_sxm.txtpb", H100_BYTES, 989, "H100 SXM 80GB"),
    _gpu("h100x8", 8, "h100_sxm.txtpb", H100_BYTES, 989, "H100 SXM 80GB"),
    _gpu("a100-80x8", 8, "a100_sxm_80.txtpb", A100_80_BYTES, 312, "A100 SXM 80GB"),
    _gpu("a800-80x8", 8, "a100_sxm_80.txtpb", A100_80_BYTES, 312, "A800 SXM 80GB"),
)}


def allow_compile_only_libtpu() -> None:
    """On a host without TPU chips, let several processes load libtpu at once to compile (the
    planner, a test run, a notebook kernel): libtpu otherwise takes /tmp/libtpu_lockfile and a
    second process fails with "Internal error when accessing libtpu multi-process lockfile". Left
    alone where TPU chips are attached (/dev/accel*, /dev/vfio), since the lock guards them there.
    Call before JAX starts its backends."""
    import glob

    if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def for_devices(devs) -> "Target | None":
    """The table's target for a list of attached devices (same chip kind and count), or None."""
    kind = devs[0].device_kind if devs else ""
    for t in TARGETS.values():
        if t.kind == kind and t.devices == len(devs):
            return t
    return None


class TargetError(ValueError):
    """An unknown target, or a target whose compiler is not installed (names the extra)."""


def get(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]


# fields of the shipped descriptions that the XLA inside jax 0.10.2's CUDA plugin does not know yet
# (its text-format parser refuses the whole description otherwise)
NEWER_FIELDS = ("collective_memory_granularity",)


def gpu_target_config(target: Target) -> str:
    """The GpuTargetConfig text for the CUDA plugin: the shipped description with the cuDNN and CUDA
    runtime versions set to the installed wheels' (the compiler picks kernels by them) and
    ``NEWER_FIELDS`` removed."""
    import importlib.metadata as md
    import re

    text = (SPECS / target.gpu_spec).read_text()
    for field in NEWER_FIELDS:
        text = re.sub(rf"^\s*{field}:.*\n", "", text, flags=re.M)
    cudnn = md.version("nvidia-cudnn-cu12").split(".")
    cuda = md.version("nvidia-cuda-runtime-cu12")
    text = re.sub(r"dnn_version_info \{[^}]*\}",
                  "dnn_version_info {\n  major: %s\n  minor: %s\n  patch: %s\n}" % tuple(cudnn[:3]), text)
    text = re.sub(r'runtime_version: "[^"]*"', f'runtime_version: "{cuda}"', text)
    return text


def devices(target: Target, slices: int = 1) -> list:
    """The target's compile-only devices (no hardware needed); ``slices`` > 1: that many copies of
    a TPU slice joined by the data-center network (libtpu's ``num_slices``; each device carries its
    ``slice_index``), as a multi-slice run sees them. Raises ``TargetError`` naming the extra to
    install when the compiler plugin is missing, or for GPU targets with ``slices`` > 1 (not
    describable here)."""
    from jax.experimental import topologies

    if slices < 1:
        raise TargetError(f"slices={slices}: must be at least 1")
    if target.is_gpu and slices > 1:
        raise TargetError(f"target {target.name}: multi-slice (DCN) plans are for TPU targets; a GPU node's "
                          f"compile-only devices cannot be given several nodes here")
    if target.is_gpu:
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here: skip cuInit checks
        if not cuda_plugin_installed():
            raise TargetError(f"target {target.name} needs the CUDA plugin: pip install -e \".[cuda12]\" "
                              f"(jax[cuda12], about 3.2 GB of wheels)")
        topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target),
                                            topology=target.topology)
    else:
        if not libtpu_installed():
            raise TargetError(f"target {target.name} needs libtpu: pip install -e \".[tpu]\" (or the test extra)")
        topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                            chip_config_name=target.chip_config,
                                            chips_per_host_bounds=list(target.hosts_bounds), num_slices=slices,
                                            wrap=[False, False, False])
    devs = list(topo.devices)
    if len(devs) != target.devices * slices:
        raise TargetError(f"target {target.name}: the compiler gave {len(devs)} devices for {slices} slice(s), the "
                          f"table says {target.devices} per slice")
    return devs


def libtpu_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("libtpu") is not None


def cuda_plugin_installed() -> bool:
    import importlib.util

    try:  # find_spec of a submodule raises when its package (jax_plugins, nvidia) is missing
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None and \
            importlib.util.find_spec("nvidia.cudnn") is not None
    except ModuleNotFoundError:
        return False


def table_markdown() -> str:
    """The targets as a markdown table (for the README)."""
    rows = ["| target | chips (JAX devices) | compiled as | HBM per device | bf16 peak per device | host offload |",
            "|---|---|---|---|---|---|"]
    for t in TARGETS.values():
        chips = f"{t.devices // 2} x {t.chip} ({t.devices} TensorCores)" if t.chip == "TPU v2" else \
            f"{t.devices} x {t.chip}"
        rows.append(f"| `{t.name}` | {chips} | `{t.topology}`{' (' + t.gpu_spec + ')' if t.is_gpu else ''}"
                    f" | {t.hbm_bytes / GIB:.2f} GiB | {t.peak_flops / 1e12:g} TFLOP/s | "
                    f"{'yes' if t.host_offload else 'no'} |")
    return "\n".join(rows)
