"""Ahead-of-time compilation for a target without its hardware, and what the compiled program says.

    mesh = aot.make_mesh(target, "fsdp=2,tensor=2")
    with aot.counting_kernels() as kernels:
        result = aot.compile(jitted_fn, args, mesh, kernels)

``compile`` traces, lowers and compiles ``jitted_fn`` on ``args`` (``jax.ShapeDtypeStruct``s with
their shardings, modules with such leaves) for the mesh's compile-only devices and returns the
per-device memory plan, XLA's operation count, the attention-kernel FLOPs XLA cannot see, the
collectives of the compiled HLO, and the seconds it took.

What each number is:

* bytes (``compiled.memory_analysis()``, per device): arguments, outputs, temporaries, and the
  output bytes that alias a donated argument. **peak = arguments + outputs + temporaries - aliased**
  (a donated buffer is counted once). Generated code is reported apart and not in the peak.
* ``xla_flops``: ``cost_analysis()["flops"]`` of the SPMD-partitioned module (per device). It does
  not count custom calls: the splash (Pallas/Mosaic) and cuDNN attention kernels.
* ``kernel_flops``: those kernels' FLOPs, per device, from the shapes the model passes to
  ``mm_jax.models.layers.attention`` (see ``counting_kernels``): 4·B·N·S·T·Dh per forward call
  (QK^T and PV), 2.5x that per backward call; S and T are the unpadded query and key lengths
  (splash pads them to its block and the head dim 64 to 128: that padding is not counted), masked
  keys are counted (the kernel computes them). Divided over the devices that split q by the
  activation rule ``("batch", "seq", "act_heads")`` of ``mm_jax.parallel`` (what splash's
  ``shard_map`` uses).
* collectives: every all-reduce, all-gather, reduce-scatter, all-to-all and collective-permute
  (``-start`` forms included, ``-done`` not) in the compiled HLO, times how often the computation
  holding it runs (while loops with a known trip count multiply); bytes = the op's result size per
  device.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any

import jax
import numpy as np

from mm_jax.plan.targets import Target

KERNEL_IMPLS = ("splash", "cudnn")   # attention implementations that are custom calls to XLA
BACKWARD_FACTOR = 2.5                # a flash-attention backward costs ~2.5 forwards (dQ, dK, dV, recomputed P)
MARK = "mm_attention__"


class MeshError(ValueError):
    """A mesh that does not fit the target."""


def make_mesh(target: Target, spec: str | None = None, devices: list | None = None, workload: str = "sample"):
    """A (data, fsdp, context, tensor) mesh over the target's compile-only devices; ``spec`` like
    "data=1,fsdp=2,tensor=4". Default: the sampler's (``parallel.sampling_mesh_shape`` for the
    target's device count and HBM: CFG on data, then context) for ``sample``, the trainer's (every
    device on fsdp) for training."""
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
        raise MeshError(f"mesh {spec!r} ({full}) has {n} devices but target {target.name} has {target.devices}")
    return parallel.make_mesh(shape, devices=devices or targets.devices(target))


def mesh_spec(mesh) -> str:
    return ",".join(f"{k}={v}" for k, v in dict(mesh.shape).items())


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
        return f"{MARK}{self.impl}__{self.b}_{self.s}_{self.t}_{self.n}_{self.dh}__{self.shards}"

    @classmethod
    def parse(cls, name: str) -> "KernelCall":
        impl, dims, shards = name[len(MARK):].split("__")
        return cls(impl, *map(int, dims.split("_")), int(shards))


@contextlib.contextmanager
def counting_kernels():
    """While active, the custom-call attention kernels of ``mm_jax.models.layers.ATTENTION_IMPLS``
    run inside a ``jax.jit`` named after the call's shapes (``KernelCall.name``): the same kernel
    and the same compiled program (XLA inlines the call), but each call, its recomputation under
    remat and its transpose under autodiff appear as a named equation in the traced jaxpr, which
    ``kernel_counts`` reads with multiplicities. Yields nothing; restores the registry on exit."""
    from mm_jax import parallel
    from mm_jax.models import layers

    saved = {k: layers.ATTENTION_IMPLS[k] for k in KERNEL_IMPLS if k in layers.ATTENTION_IMPLS}

    def wrap(impl, real):
        def call(q, k, v, key_mask, kv_lengths, scale):
            mesh = jax.sharding.get_abstract_mesh()
            shards = 1
            if mesh is not None and not mesh.empty:
                # inside shard_map (attention_parallel) q is already one device's shard: its
                # manual axes split nothing further
                manual = set(getattr(mesh, "manual_axes", ()) or ())
                spec = parallel.logical_to_spec(("batch", "seq", "act_heads", None), q.shape, dict(mesh.shape))
                for axes in spec:
                    for a in ((axes,) if isinstance(axes, str) else (axes or ())):
                        shards *= 1 if a in manual else dict(mesh.shape)[a]
            b, s, n, dh = q.shape
            kc = KernelCall(impl, b, s, k.shape[1], n, dh, shards)
            fn = lambda q, k, v, key_mask, kv_lengths: real(q, k, v, key_mask, kv_lengths, scale)  # noqa: E731
            fn.__name__ = fn.__qualname__ = kc.name()
            return jax.jit(fn)(q, k, v, key_mask, kv_lengths)
        return call

    try:
        for k, real in saved.items():
            layers.ATTENTION_IMPLS[k] = wrap(k, real)
        yield
    finally:
        layers.ATTENTION_IMPLS.update(saved)


def _subjaxprs(eqn):
    for p in eqn.params.values():
        for sub in (p if isinstance(p, (tuple, list)) else [p]):
            j = getattr(sub, "jaxpr", sub)
            if hasattr(j, "eqns"):
                yield j


def _kernel_names(jaxpr) -> set[str]:
    """Names of the kernels inside a jaxpr: Pallas calls' kernel names, other primitives' names."""
    names = set()
    for e in jaxpr.eqns:
        names.add(e.primitive.name)
        if e.params.get("name"):
            names.add(str(e.params["name"]))
        for sub in _subjaxprs(e):
            names |= _kernel_names(sub)
    return names


def _is_backward(jaxpr) -> bool:
    """Whether a marked call's body is a transpose: it runs the kernels' backward (splash's
    ``splash_mha_dq_*`` / ``splash_mha_dkv_*`` Pallas calls, cuDNN's ``*_bwd`` custom call), not
    their forward (``splash_mha_fwd_*``, ``*_fwd``)."""
    return any(re.search(r"_dq|dkv|bwd|backward", n) for n in _kernel_names(getattr(jaxpr, "jaxpr", jaxpr)))


def kernel_counts(jaxpr) -> dict[tuple[KernelCall, str], int]:
    """{(call, "forward" | "backward"): executions} of the marked attention calls in a traced
    jaxpr; a call inside ``scan`` counts ``length`` times (nested scans multiply)."""
    out: dict[tuple[KernelCall, str], int] = {}

    def walk(j, mult):
        for e in j.eqns:
            name = str(e.params.get("name", ""))
            if name.startswith(MARK):
                if e.outvars:  # partial evaluation leaves empty shells behind
                    body = e.params["jaxpr"]
                    key = (KernelCall.parse(name), "backward" if _is_backward(body) else "forward")
                    out[key] = out.get(key, 0) + mult
                continue
            m = mult * int(e.params["length"]) if e.primitive.name == "scan" else mult
            for sub in _subjaxprs(e):
                walk(sub, m)

    walk(getattr(jaxpr, "jaxpr", jaxpr), 1)
    return out


def kernel_flops(counts: dict[tuple[KernelCall, str], int]) -> float:
    return sum(c.forward_flops * (BACKWARD_FACTOR if d == "backward" else 1.0) * n for (c, d), n in counts.items())


# -- collectives ------------------------------------------------------------------------------

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([0-9,]*)\]")
_OP = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"\b(body|condition|to_apply|calls|branch_computations|called_computations)="
                    r"(\{[^}]*\}|%?[\w.\-]+)")


def _shape_bytes(text: str) -> int:
    return sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _SHAPE.findall(text))


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps, entry, cur = {}, "", None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
            if line.startswith("ENTRY"):
                entry = cur
        elif cur is not None:
            if line.startswith("}"):
                cur = None
            else:
                comps[cur].append(line)
    return comps, entry


def _multiplicities(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per execution of the entry computation."""
    mult: dict[str, int] = {}

    def visit(name, m, depth=0):
        if name not in comps or depth > 64:
            return
        mult[name] = mult.get(name, 0) + m
        for line in comps[name]:
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
            for kind, target in _CALLS.findall(line):
                for callee in re.findall(r"%?([\w.\-]+)", target):
                    visit(callee, m * (int(trip.group(1)) if (trip and kind == "body") else 1), depth + 1)

    visit(entry, 1)
    return mult


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{kind: {"count": executions, "bytes": result bytes per device summed over executions}} of the
    compiled (per-device) HLO text."""
    comps, entry = _computations(hlo)
    mult = _multiplicities(comps, entry) if entry else {}
    out: dict[str, dict[str, int]] = {}
    for name, lines in comps.items():
        m = mult.get(name, 0)
        if not m:
            continue
        for line in lines:
            op = _OP.match(line)
            if not op:
                continue
            shape, kind, start = op.group(1), op.group(2), op.group(3)
            if start and shape.startswith("(") and kind in ("all-gather", "collective-permute", "all-to-all"):
                # async form: (operands..., results..., [context]) -> the results are the second half
                parts = _SHAPE.findall(shape)
                parts = parts[len(parts) // 2:] if len(parts) >= 2 else parts
                nbytes = sum(_DTYPE_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in parts)
            else:
                nbytes = _shape_bytes(shape)
            d = out.setdefault(kind, {"count": 0, "bytes": 0})
            d["count"] += m
            d["bytes"] += m * nbytes
    return out


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

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

    @property
    def flops(self) -> float:
        return self.xla_flops + self.kernel_flops


def _xla_flops(compiled, platform: str) -> float:
    if platform in ("gpu", "cuda"):  # the CUDA plugin's executables report none; XLA's cost model still runs
        from jax._src.lib import _jax

        module = compiled._executable.xla_extension_executable().hlo_modules()[0]
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
    else:
        cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    flops = float((cost or {}).get("flops", 0.0))
    return max(flops, 0.0)  # a module of custom calls only reports -1


def compile(fn, args: tuple, mesh) -> Compiled:
    """Trace, lower and compile the jitted ``fn`` on abstract ``args`` under ``mesh`` (the mesh is
    also set while tracing, so the model's sharding constraints and kernels see the target).
    Call inside ``counting_kernels()`` to get ``kernel_flops``."""
    platform = np.asarray(mesh.devices).flat[0].platform
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        traced = fn.trace(*args)
        counts = kernel_counts(traced.jaxpr)
        lowered = traced.lower()
        t1 = time.perf_counter()
        compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    return Compiled(
        argument_bytes=int(mem.argument_size_in_bytes), output_bytes=int(mem.output_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes), temp_bytes=int(mem.temp_size_in_bytes),
        generated_code_bytes=int(mem.generated_code_size_in_bytes),
        xla_flops=_xla_flops(compiled, platform), kernel_flops=kernel_flops(counts),
        kernels={f"{c.impl} {d} B{c.b} S{c.s} T{c.t} N{c.n} Dh{c.dh} /{c.shards}": n for (c, d), n in counts.items()},
        collectives=collectives(compiled.as_text()), lower_seconds=t1 - t0, compile_seconds=t2 - t1)


def arg_bytes(tree: Any) -> int:
    """Per-device bytes of abstract arguments, from each leaf's shape, dtype and sharding."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total
