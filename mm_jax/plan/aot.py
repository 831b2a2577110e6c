"""Ahead-of-time compilation for a target without its hardware, and what the compiled program says.

    mesh = aot.make_mesh(target, "fsdp=2,tensor=2")
    with aot.counting_kernels():
        result = aot.compile(jitted_fn, args, mesh, cache_dir=None)   # a Compiled

``compile`` traces, lowers and compiles ``jitted_fn`` on ``args`` (``jax.ShapeDtypeStruct``s with
their shardings, modules with such leaves) for the mesh's compile-only devices and returns the
per-device memory plan, XLA's operation count, the attention-kernel FLOPs XLA cannot see, the
collectives of the compiled HLO, and the seconds it took.

``cache_dir``: the planner's compile cache (``mm_jax.plan.cache``): what a compile says (the memory
plan and the optimized HLO text) stored under a key of the lowered program, the compiler options,
the devices and the compiler's version; a later identical compile reads it back
(``Compiled.cache_hit``) instead of compiling. JAX's own persistent cache cannot do this here:
jax 0.10.2 writes executables compiled for compile-only devices but cannot read them back
("PjRtCompiler must be constructed with a Client to call DeserializeLoadedExecutable").

What each number is (all but the bytes read from the optimized, SPMD-partitioned HLO with
``mm_jax.plan.hlo``, where every instruction counts as often as its computation runs per step: a
``while`` body its trip count, nested loops multiplied. XLA's own ``cost_analysis()`` counts a loop
body once, so for the models' scanned layers it reads low by about the layer count):

* bytes (``compiled.memory_analysis()``, per device): arguments, outputs, temporaries, and the
  output bytes that alias a donated argument. **peak = arguments + outputs + temporaries - aliased**
  (a donated buffer is counted once). Generated code is reported apart and not in the peak.
* ``xla_flops``: the FLOPs of XLA's own matrix ops per device: 2 x multiply-adds of every ``dot``
  and ``convolution`` (also inside fusions; XLA:TPU writes most dots as convolutions) and every
  cuBLAS GEMM / cuDNN convolution custom call XLA:GPU made of one, convolutions counted as XLA's
  cost model does (window positions on padding or between dilated inputs skipped; where the
  compiler pads the input explicitly, e.g. XLA:GPU for a transposed convolution, the convolution
  computes on those zeros and they count). Elementwise
  ops, reductions and transcendentals are not counted (a few % of these models' FLOPs, and not
  matrix-unit work), nor are the attention kernels, which are custom calls XLA cannot see into.
* ``kernel_flops``: those kernels' FLOPs, per device: every splash (Mosaic ``tpu_custom_call``) or
  cuDNN (``__cudnn$fmha*``) custom call the compiled program runs, identified by the name of the
  ``jit`` wrapper ``counting_kernels`` puts around the call, which survives in the custom call's
  ``op_name`` metadata (``KernelCall.name``: the shapes the model passed to
  ``mm_jax.models.layers.attention``). 4·B·N·S·T·Dh per forward call (QK^T and PV), 2.5x that per
  backward (splash's backward is a ``dq`` and a ``dkv`` kernel: counted once; cuDNN's is one
  ``...Backward`` call); a remat recompute is a forward. S and T are the unpadded query and key
  lengths (splash pads them to its block and the head dim 64 to 128: that padding is not counted;
  a masked cuDNN fp8 call's extra value channel, Dh 64 -> 80, is: the model pads it itself),
  masked keys are counted (the kernel computes them). Divided over the devices that split q by the
  activation rule ``("batch", "seq", "act_heads")`` of ``mm_jax.parallel`` (what splash's
  ``shard_map`` uses); a call inside ``shard_map`` already holds one device's shard.
* collectives: every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute
  (``-start`` forms included, ``-done`` not), times how often it runs; bytes = the op's result size
  per device.
* ``quantized_flops``: the part of ``flops`` in matmuls whose operands are 8-bit
  (``quantized`` = "int8" for s8/u8, "fp8" for f8 types), and in the fp8 attention kernels
  (``QUANTIZED_KERNELS``: cuDNN's ``__cudnn$fmhaSoftmaxF8``, also ``quantized_kernel_flops``):
  ``--quantize`` runs them at the chip's int8 / fp8 peak (``targets.Target.quantized_peak``).
* ``uncounted``: what the numbers above miss: loops whose trip count could not be derived
  (counted once) and attention kernels with no mark (their FLOPs are not counted).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import jax
import numpy as np

from mm_jax.plan import hlo
from mm_jax.plan.targets import Target

KERNEL_IMPLS = ("splash", "cudnn", "cudnn-fp8")   # attention implementations that are custom calls to XLA
QUANTIZED_KERNELS = {"cudnn-fp8": "fp8"}           # those whose matmuls run at the chip's 8-bit peak
BACKWARD_FACTOR = 2.5                # a flash-attention backward costs ~2.5 forwards (dQ, dK, dV, recomputed P)
MARK = "mm_attention__"
EIGHT_BIT = ("s8", "u8", "f8e4m3fn", "f8e5m2")   # HLO element types of quantized matmul operands


class MeshError(ValueError):
    """A mesh that does not fit the target."""


def make_mesh(target: Target, spec: str | None = None, devices: list | None = None, workload: str = "sample",
              dcn: str | None = None):
    """A (data, fsdp, context, tensor) mesh over the target's compile-only devices, built by the
    run's own ``parallel.make_mesh`` (so plan and run place devices alike); ``spec`` like
    "data=1,fsdp=2,tensor=4". Default: the sampler's (``parallel.sampling_mesh_shape`` for the
    target's device count and HBM: CFG on data, then context) for ``sample``, the trainer's (every
    device on fsdp) for training. ``dcn`` ("data=2"): that many slices of the target joined by
    the data-center network (``targets.devices(target, slices)``), ``spec`` then the mesh within
    one slice, as the trainer's ``mesh_dcn`` and ``mesh``."""
    from mm_jax import parallel
    from mm_jax.plan import targets

    if spec:
        shape = parallel.parse_mesh_spec(spec)
    elif workload == "sample":
        shape = parallel.sampling_mesh_shape(target.devices, target.hbm_bytes)
    else:
        shape = parallel.default_mesh_shape(target.devices)
    n = math.prod(shape.values())
    if n != target.devices:
        full = ",".join(f"{a}={shape.get(a, 1)}" for a in parallel.MESH_AXES)
        where = " per slice" if dcn else ""
        raise MeshError(f"mesh {spec!r} ({full}) has {n} devices but target {target.name} has {target.devices}{where}")
    slices = math.prod(parallel.parse_mesh_spec(dcn).values()) if dcn else 1
    return parallel.make_mesh(shape, devices=devices or targets.devices(target, slices), dcn=dcn or None)


def mesh_spec(mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in dict(mesh.shape).items())


def dcn_spec(dcn: str | None) -> str:
    """The DCN axes as given, without size-1 axes ("" for one slice)."""
    from mm_jax import parallel

    return ",".join(f"{k}={v}" for k, v in parallel.parse_mesh_spec(dcn or "").items() if v > 1)


def replicated(mesh, shape, dtype) -> jax.ShapeDtypeStruct:
    """An abstract input placed whole on every device (what the sampler's host arrays become)."""
    from jax.sharding import NamedSharding, PartitionSpec

    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


# -- attention kernels ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelCall:
    """One attention call as the model made it: q (B, S, N, Dh), k/v (B, T, N, Dh)."""
    impl: str
    b: int
    s: int
    t: int
    n: int
    dh: int
    shards: int      # devices that split the call's work

    @property
    def forward_flops(self) -> float:
        """Per device, one forward: QK^T and PV, 2 multiply-adds each."""
        return 4.0 * self.b * self.n * self.s * self.t * self.dh / self.shards

    def name(self) -> str:
        """A Python identifier (the op_name metadata is matched as \\w+): "-" in the impl written "_"."""
        impl = self.impl.replace("-", "_")
        return f"{MARK}{impl}__{self.b}_{self.s}_{self.t}_{self.n}_{self.dh}__{self.shards}"

    @classmethod
    def parse(cls, name: str) -> "KernelCall":
        impl, dims, shards = name[len(MARK):].split("__")
        return cls(impl.replace("_", "-"), *map(int, dims.split("_")), int(shards))


@contextlib.contextmanager
def counting_kernels():
    """While active, the custom-call attention kernels (``KERNEL_IMPLS``) that
    ``mm_jax.models.layers.attention`` calls run inside a ``jax.jit`` named after the call's shapes
    (``KernelCall.name``), through ``layers.wrapping_attention_kernels`` (context-local; the
    registry ``layers.ATTENTION_IMPLS`` is not changed): the same kernel and the same compiled
    program (XLA inlines the call), but the name stays in the ``op_name`` metadata of the kernel's
    custom calls in the optimized HLO (the call, its recomputation under remat, its transpose
    under autodiff), which ``kernel_counts`` reads. Counting the compiled program, not the traced
    jaxpr, matters: under ``scan`` and autodiff the jaxpr keeps copies of the forward call that
    XLA removes as dead code. Yields nothing."""
    from mm_jax import parallel
    from mm_jax.models import layers

    def wrap(impl, real):
        if impl not in KERNEL_IMPLS:
            return real

        def call(q, k, v, key_mask, kv_lengths, scale):
            mesh = parallel.current_mesh()
            shards = 1
            if mesh is not None:
                # inside shard_map (attention_parallel) q is already one device's shard: its
                # manual axes split nothing further
                manual = set(getattr(mesh, "manual_axes", ()) or ())
                sizes = parallel.mesh_shape(mesh)
                auto = {a: n for a, n in sizes.items() if a not in manual}
                for entry in parallel.logical_to_spec(("batch", "seq", "act_heads", None), q.shape, sizes):
                    shards *= parallel.spec_shards(entry, auto)
            b, s, n, dh = q.shape
            if impl == "cudnn-fp8" and (key_mask is not None or kv_lengths is not None):
                from mm_jax.models.fp8_attention import padded_head_dim

                dh = padded_head_dim(dh)  # a masked fp8 call computes with one more (padded) channel
            kc = KernelCall(impl, b, s, k.shape[1], n, dh, shards)
            fn = lambda q, k, v, key_mask, kv_lengths: real(q, k, v, key_mask, kv_lengths, scale)  # noqa: E731
            fn.__name__ = fn.__qualname__ = kc.name()
            return jax.jit(fn)(q, k, v, key_mask, kv_lengths)
        return call

    with layers.wrapping_attention_kernels(wrap):
        yield


def kernel_counts(module: hlo.Module) -> tuple[dict[tuple[KernelCall, str], int], list[str]]:
    """{(call, "forward" | "backward"): executions per run} of the marked attention kernels in the
    compiled program, and the kernels with no mark."""
    counts, unmarked = {}, []
    for (name, direction), n in module.kernel_calls(MARK).items():
        if name.startswith(MARK):
            key = (KernelCall.parse(name), direction)
            counts[key] = counts.get(key, 0) + n
        else:
            unmarked.append(f"{name} ({direction}) x{n}: FLOPs not counted")
    return counts, unmarked


def kernel_flops(counts: dict[tuple[KernelCall, str], int], quantized: str | None = None) -> float:
    """The kernels' FLOPs per run; ``quantized`` ("fp8"): only those of kernels in that type
    (``QUANTIZED_KERNELS``)."""
    return sum(c.forward_flops * (BACKWARD_FACTOR if d == "backward" else 1.0) * n for (c, d), n in counts.items()
               if quantized is None or QUANTIZED_KERNELS.get(c.impl) == quantized)


# -- collectives ------------------------------------------------------------------------------

def collectives(text: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": executions, "bytes": result bytes per device summed over executions}} of the
    compiled (per-device) HLO text (``hlo.Module.collectives``)."""
    return hlo.Module(text).collectives()


# -- compile ----------------------------------------------------------------------------------

@dataclasses.dataclass
class Compiled:
    """What one compile says, per device."""
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int
    xla_flops: float
    kernel_flops: float
    kernels: dict
    collectives: dict
    lower_seconds: float
    compile_seconds: float
    uncounted: list = dataclasses.field(default_factory=list)
    quantized_flops: float = 0.0
    quantized: str | None = None     # "int8" | "fp8": the type of those matmuls
    quantized_kernel_flops: float = 0.0   # the part of quantized_flops in fp8 attention kernels (cudnn-fp8)
    kernel_targets: dict = dataclasses.field(default_factory=dict)   # {kernel custom-call target: executions}
    cache_hit: bool | None = None    # read from the planner's compile cache (None: no cache)

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def flops(self) -> float:
        return self.xla_flops + self.kernel_flops


def compiler_options(mesh) -> dict:
    """XLA options for compiling without the hardware. GPU: gemms go to cuBLAS, not Triton: with no
    device to autotune on, XLA:GPU's Triton tile search fails on some real-size dots ("Couldn't
    find output tile sizes that satisfy hlo: ... bf16[1808,4096] dot", the frozen T5 in the
    train-image step on a800-80x8 and h100x8); on the device, autotuning chooses either."""
    platform = np.asarray(mesh.devices).flat[0].platform
    return {"xla_gpu_enable_triton_gemm": False} if platform in ("gpu", "cuda") else {}


def compile(fn, args: tuple, mesh, cache_dir: str | None = None) -> Compiled:
    """Trace, lower and compile the jitted ``fn`` on abstract ``args`` under ``mesh`` (the mesh is
    also set while tracing, so the model's sharding constraints and kernels see the target).
    Call inside ``counting_kernels()`` to get ``kernel_flops``. ``cache_dir``: read what an
    identical earlier compile said from the planner's compile cache there (``cache.py``), else
    compile and store it; None: always compile, store nothing."""
    from mm_jax.plan import cache

    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = fn.trace(*args).lower()
        t1 = time.perf_counter()
        options = compiler_options(mesh)
        k = cache.key(lowered, mesh, options) if cache_dir else None
        stored = cache.load(cache_dir, k) if k else None
        if stored is None:
            compiled = lowered.compile(compiler_options=options)
            mem, text = compiled.memory_analysis(), compiled.as_text()
            if k:
                cache.save(cache_dir, k, mem, text, time.perf_counter() - t1)
            mem = {f: int(getattr(mem, f)) for f in cache.MEMORY_FIELDS}
        else:
            mem, text, _ = stored
    t2 = time.perf_counter()
    module = hlo.Module(text)
    counts, unmarked = kernel_counts(module)
    by_type = module.flops_by_type()
    eight_bit = {t: f for t, f in by_type.items() if t in EIGHT_BIT}
    fp8_kernels = kernel_flops(counts, "fp8")
    if fp8_kernels:
        eight_bit["f8 attention kernels"] = fp8_kernels
    return Compiled(
        argument_bytes=mem["argument_size_in_bytes"], output_bytes=mem["output_size_in_bytes"],
        alias_bytes=mem["alias_size_in_bytes"], temp_bytes=mem["temp_size_in_bytes"],
        generated_code_bytes=mem["generated_code_size_in_bytes"],
        xla_flops=module.flops(), kernel_flops=kernel_flops(counts),
        kernels={f"{c.impl} {d} B{c.b} S{c.s} T{c.t} N{c.n} Dh{c.dh} /{c.shards}": n for (c, d), n in counts.items()},
        collectives=module.collectives(), lower_seconds=t1 - t0, compile_seconds=t2 - t1,
        uncounted=[f"loop {w}: trip count unknown, counted once" for w in module.unknown_loops] + unmarked,
        quantized_flops=sum(eight_bit.values()),
        quantized=("fp8" if any(t.startswith("f8") for t in eight_bit) else "int8") if eight_bit else None,
        quantized_kernel_flops=fp8_kernels, kernel_targets=module.kernel_targets(),
        cache_hit=stored is not None if k else None)
