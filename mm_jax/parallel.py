"""Meshes and logical-axis sharding: the only module that knows mesh axis names.

Models annotate parameters (``nnx.with_partitioning(init, ("embed", "mlp"))``, through
``mm_jax.models.layers``) and activations (``constrain(x, ("batch", "seq", "embed"))``) with
*logical* names. ``LOGICAL_RULES`` below maps
those names to the physical mesh axes, once, for the whole project. A logical dimension that does
not divide evenly over its mesh axes is replicated instead, so every configuration (tiny test
models included) runs on every mesh; each such case is warned about once (``logical_to_spec``).

Other modules ask about a mesh through the functions below, named for the question
(``batch_shards``, ``context_size``, ``heads_shards``, ...), never by an axis name;
``current_mesh`` is the one reader of the mesh in context.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "context", "tensor")  # tensor innermost: its collectives are the most frequent

# logical name -> mesh axis (or tuple of axes, or None for replicated)
LOGICAL_RULES: Mapping[str, Any] = {
    # activations
    "batch": ("data", "fsdp"),
    "seq": "context",   # context parallelism: the sequence split (attention joins it, attention_parallel.py)
    "frames": None,
    "height": None,
    "width": None,
    "act_embed": "tensor",
    "act_heads": "tensor",
    "act_mlp": "tensor",
    # parameters
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv": None,
    "head_dim": None,
    "vocab": "tensor",
    "cond": None,
    "norm": None,
    "patch": None,
    "channels": None,
    "conv_in": None,
    "conv_out": "tensor",
    "rel_buckets": None,
    "layers": None,
}


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """``"data=1,fsdp=2,tensor=4"`` -> ``{"data": 1, "fsdp": 2, "tensor": 4}``."""
    shape: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if "=" not in part:
            raise ValueError(f"mesh spec {spec!r}: expected comma-separated axis=size, got {part!r}")
        name, size = (s.strip() for s in part.split("=", 1))
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; allowed: {', '.join(MESH_AXES)}")
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} needs a positive integer size, got {size!r}")
        shape[name] = int(size)
    return shape


def default_mesh_shape(num_devices: int) -> dict[str, int]:
    """All devices on the fsdp axis: params and batch sharded, no tensor-parallel collectives."""
    return {"data": 1, "fsdp": num_devices, "context": 1, "tensor": 1}


def unsplit_batch_note(batch: int, mesh_shape: Mapping[str, int]) -> str | None:
    """Why a global ``batch`` is not split over the mesh's batch axes (``LOGICAL_RULES["batch"]``),
    or None when it is. Such a batch is replicated (every device computes all of it): it runs, but
    its work does not shrink with the device count (stage 2's batch of 8 on v5p-32: fsdp=16 plans
    75.75 GiB and 16.4 s ideal per step per chip, fsdp=8,tensor=2 13.23 GiB and 1.49 s)."""
    shards = batch_shards(mesh_shape)
    if shards <= 1 or batch % shards == 0:
        return None
    return (f"global batch {batch} does not split over the {shards} batch shards (data x fsdp): every device "
            f"computes the whole batch; use a mesh whose data x fsdp divides {batch} and put the other devices on "
            f"tensor or context (e.g. fsdp={math.gcd(batch, shards)},tensor={shards // math.gcd(batch, shards)})")


# Below this much memory per device, the 5B DiT (10.4 GiB in bf16) does not fit replicated: such
# devices (TPU v2/v3 cores) shard the parameters instead of replicating them on data/context.
REPLICATED_DIT_MIN_BYTES = 15 * 1024 ** 3


def device_memory_bytes(device=None) -> int | None:
    """The memory one accelerator can hold (``memory_stats()["bytes_limit"]``), None when unknown (CPU)."""
    device = device or jax.devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # not every backend reports it
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def sampling_mesh_shape(num_devices: int, memory_bytes: int | None = None, rows: int = 2) -> dict[str, int]:
    """The default mesh for sampling on ``num_devices``: the CFG pair on ``data`` first (two
    independent halves, one small collective per step for the guidance combine), then the
    sequence over ``context``, as xDiT / ConsisID measured (CFG-parallel beats ring or Ulysses at 2
    GPUs; CFG x sequence beyond). An odd count, or ``rows`` = 1 (one video without CFG: a batch
    of one row that ``data`` cannot split), goes all to ``context``. Devices with less than
    ``REPLICATED_DIT_MIN_BYTES`` (``memory_bytes`` per device) shard the parameters instead:
    fsdp=2 x tensor (``python -m mm_jax.plan`` gives the figures)."""
    if memory_bytes is not None and memory_bytes < REPLICATED_DIT_MIN_BYTES and num_devices > 1:
        fsdp = 2 if num_devices % 2 == 0 else 1
        return {"data": 1, "fsdp": fsdp, "context": 1, "tensor": num_devices // fsdp}
    data = 2 if num_devices % 2 == 0 and rows >= 2 else 1
    return {"data": data, "fsdp": 1, "context": num_devices // data, "tensor": 1}


def _axis_sizes(shape: Mapping[str, int] | str, what: str) -> list[int]:
    """Sizes over ``MESH_AXES`` (missing axes 1) from a spec string or a mapping, axes checked."""
    if isinstance(shape, str):
        shape = parse_mesh_spec(shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"{what} {dict(shape)}: unknown axes {unknown}; allowed: {', '.join(MESH_AXES)}")
    bad = {a: s for a, s in shape.items() if not isinstance(s, (int, np.integer)) or s < 1}
    if bad:
        raise ValueError(f"{what} {dict(shape)}: axis sizes must be positive integers, got {bad}")
    return [int(shape.get(a, 1)) for a in MESH_AXES]


def _named(sizes: Sequence[int]) -> str:
    return ",".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))


def _slices(devices: Sequence[Any]) -> tuple[dict[int, list], str]:
    """The devices grouped by slice, and what was grouped by. A TPU slice is a ``slice_index``
    (slices are joined by the data-center network). CPU and GPU devices name one slice (index 0
    in a multi-process run; no index in a single process) unless their processes were given
    partition indices: there each process counts as a slice."""
    indexed = all(getattr(d, "slice_index", None) is not None for d in devices)
    tpu = devices[0].platform == "tpu"
    by = "slice_index" if indexed and (tpu or len({d.slice_index for d in devices}) > 1) else "process_index"
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(getattr(d, by), []).append(d)
    return groups, by


_SPLIT_WARNED: set = set()   # (device kind, mesh shape) already warned about


def _topology_order(build, sizes: list[int], devices: list, **kw) -> np.ndarray:
    """``build`` (``mesh_utils.create_device_mesh`` or ``create_hybrid_device_mesh``) over
    ``devices``. Its documented refusal, NotImplementedError for a TPU mesh whose axis sizes are not
    products of whole physical torus axes, is met by splitting physical axes (still by topology,
    what ``jax.make_mesh`` does on v5e), with a warning once per device kind and shape."""
    try:
        return build(sizes, devices=devices, **kw)
    except NotImplementedError:
        key = (devices[-1].device_kind, tuple(sizes))
        if key not in _SPLIT_WARNED:
            _SPLIT_WARNED.add(key)
            coords = [tuple(d.coords) for d in devices if hasattr(d, "coords")]
            torus = "x".join(str(max(c) - min(c) + 1) for c in zip(*coords)) if coords else "?"
            warnings.warn(f"mesh {_named(sizes)} on {len(devices)} x {key[0]} (chips {torus}): an axis size is not a "
                          f"product of whole physical torus axes, so mesh_utils splits a physical axis over several "
                          f"mesh axes (fewer links per collective); sizes that are products of the torus' axes avoid "
                          f"it", stacklevel=3)
        return build(sizes, devices=devices, allow_split_physical_axes=True, **kw)


def make_mesh(shape: Mapping[str, int] | str | None = None, devices: Sequence[Any] | None = None, *,
              dcn: Mapping[str, int] | str | None = None) -> Mesh:
    """A ``Mesh`` over ``MESH_AXES`` whose device order follows the chips.

    ``shape``: axis sizes, a mapping or a spec ("data=2,fsdp=4"); missing axes get size 1; the
    product must equal the device count; default: every device on fsdp.

    ``dcn``: the mesh axes across slices (same names and forms; config ``mesh_dcn``, planner
    ``--mesh-dcn``), for devices in several TPU slices joined by the data-center network. The
    mesh is then ``shape`` within each slice times ``dcn`` across slices, axis by axis: ``shape``
    "fsdp=8" with ``dcn`` "data=2" on 2 slices of 8 chips is data=2,fsdp=8, each ``data`` index one
    slice (``mesh_utils.create_hybrid_device_mesh``); ``shape`` defaults to every device of a
    slice on fsdp. A slice is a TPU ``device.slice_index``; CPU and GPU devices, which name no
    separate slices unless their processes were given partition indices, count each process as
    one. The product of ``dcn`` must equal the slice count; devices of several TPU slices without
    ``dcn`` are refused (one slice's torus cannot hold them).

    Device order: ``mesh_utils.create_device_mesh`` (what ``jax.make_mesh`` uses): on TPU the axes
    are laid onto the physical torus, the innermost (tensor) onto the most links; on GPU the
    devices sorted by id; on CPU (fake devices too) the plain order of ``devices``, which is also
    what a reshape gives, so nothing falls back or warns there. The one fallback: a TPU shape whose
    axis sizes are not products of whole torus axes (mesh_utils' NotImplementedError, e.g.
    fsdp=2,context=2,tensor=4 on v5p-32's 2x2x4 chips) splits a physical axis, with a warning
    once per device kind and shape. Any other mesh_utils error propagates.
    """
    devices = list(jax.devices() if devices is None else devices)
    groups, by = _slices(devices)
    if dcn is None:
        if by == "slice_index" and len(groups) > 1:
            raise ValueError(f"the {len(devices)} devices span {len(groups)} slices (device.slice_index): give the "
                             f"mesh's axes across slices, dcn / config mesh_dcn, e.g. \"data={len(groups)}\"")
        sizes = _axis_sizes(shape or default_mesh_shape(len(devices)), "mesh")
        if math.prod(sizes) != len(devices):
            raise ValueError(f"mesh {_named(sizes)} needs {math.prod(sizes)} devices but {len(devices)} are present")
        return Mesh(_topology_order(mesh_utils.create_device_mesh, sizes, devices), MESH_AXES)

    dcn_sizes = _axis_sizes(dcn, "DCN mesh (mesh_dcn)")
    slices = math.prod(dcn_sizes)
    unit = "slice(s) (device.slice_index)" if by == "slice_index" else \
        f"process(es) ({devices[0].platform} devices name no separate slices: each process counts as one)"
    if slices != len(groups):
        raise ValueError(f"DCN mesh (mesh_dcn) {_named(dcn_sizes)} spans {slices} slices but the {len(devices)} "
                         f"devices are in {len(groups)} {unit}")
    counts = sorted({len(g) for g in groups.values()})
    if len(counts) > 1:
        raise ValueError(f"DCN mesh (mesh_dcn) {_named(dcn_sizes)}: the {len(groups)} {unit} hold unequal device "
                         f"counts {counts}")
    per = counts[0]
    sizes = _axis_sizes(shape or default_mesh_shape(per), "mesh")
    if math.prod(sizes) != per:
        raise ValueError(f"mesh {_named(sizes)} (the axes within one slice when mesh_dcn is given) needs "
                         f"{math.prod(sizes)} devices per slice but each of the {slices} slices has {per}")
    arr = _topology_order(mesh_utils.create_hybrid_device_mesh, sizes, devices, dcn_mesh_shape=dcn_sizes,
                          process_is_granule=by == "process_index")
    return Mesh(arr, MESH_AXES)


def no_mesh():
    """A context with no mesh set (inside one that has one): for building or shape-evaluating
    models whose parameters carry logical names, which are not mesh axes."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def _mesh_axes_size(mesh_shape: Mapping[str, int], axes: Any) -> int:
    if axes is None:
        return 1
    if isinstance(axes, str):
        axes = (axes,)
    return math.prod(mesh_shape.get(a, 1) for a in axes)


# -- questions about a mesh (the only reads of axis names outside the rules) -----------------------

def current_mesh():
    """The mesh in context (``jax.set_mesh``, ``use_abstract_mesh``) as an ``AbstractMesh``, None
    when none is set: the one place the project reads it."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def mesh_shape(mesh: Any = None) -> dict[str, int]:
    """``mesh``'s (default: the current mesh's) axis sizes; {} without a mesh."""
    mesh = current_mesh() if mesh is None else mesh
    return {} if mesh is None else dict(mesh.shape)


def _shape_of(mesh: Any) -> Mapping[str, int]:
    return mesh if isinstance(mesh, Mapping) else mesh_shape(mesh)


def device_count(mesh: Any = None) -> int:
    """Devices of ``mesh`` (default: the current mesh; a mapping of axis sizes too); 1 without one."""
    return math.prod(_shape_of(mesh).values())


def batch_shards(mesh: Any = None) -> int:
    """How many ways the batch is split (the mesh axes of ``LOGICAL_RULES["batch"]``: data x fsdp)."""
    return _mesh_axes_size(_shape_of(mesh), LOGICAL_RULES["batch"])


def data_replicas(mesh: Any = None) -> int:
    """Devices that each hold whole parameter copies and run their own rows (the ``data`` axis):
    how many independent CFG pairs the sampler runs side by side."""
    return _shape_of(mesh).get("data", 1)


def context_axis() -> str:
    """The mesh axis a sequence splits over (``LOGICAL_RULES["seq"]``), for collectives inside ``shard_map``."""
    return LOGICAL_RULES["seq"]


def context_size(mesh: Any = None) -> int:
    """Devices the sequence splits over (the ``seq`` rule's axis) on ``mesh`` (default: current); 1 without one."""
    return _mesh_axes_size(_shape_of(mesh), LOGICAL_RULES["seq"])


def heads_shards(heads: int, mesh: Any = None) -> int:
    """How many ways ``heads`` attention heads are split on ``mesh`` (default: current): the
    ``act_heads`` rule's axes, 1 when they do not divide ``heads`` (replicated, with a warning)."""
    spec = logical_to_spec(("act_heads",), (heads,), _shape_of(mesh), what="attention heads")
    return spec_shards(spec[0], mesh)


def spec_shards(entry: Any, mesh: Any = None) -> int:
    """How many pieces one ``PartitionSpec`` entry (None, an axis or a tuple of axes) cuts its dimension into."""
    return _mesh_axes_size(_shape_of(mesh), entry)


def every_device_spec(mesh: Any = None) -> P:
    """A ``PartitionSpec`` that splits a leading dimension over every device of ``mesh`` (default: current)."""
    return P(tuple(_shape_of(mesh)))


_REPLICATED_WARNED: set = set()  # (logical name, size, mesh axes and sizes) already warned about


def _warn_replicated(what: str | None, name: str, size: int, axes: tuple, mesh_shape: Mapping[str, int]) -> None:
    sizes = ",".join(f"{a}={mesh_shape[a]}" for a in axes)
    key = (name, size, sizes)
    if key in _REPLICATED_WARNED:
        return
    _REPLICATED_WARNED.add(key)
    warnings.warn(f"{what or 'an array'}: logical axis {name!r} of size {size} does not divide over mesh axes "
                  f"{sizes} ({_mesh_axes_size(mesh_shape, axes)} shards): replicated on them instead (every device "
                  f"holds and computes all of it); warned once per axis, size and mesh", stacklevel=3)


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh_shape: Mapping[str, int] | None = None, *, what: str | None = None) -> P:
    """Map logical axis names to a ``PartitionSpec`` through ``LOGICAL_RULES``.

    With ``shape`` and ``mesh_shape`` given, a dimension whose mesh axes are already used by an
    earlier dimension is replicated on them, and one that does not divide evenly over its mesh
    axes is replicated with a warning (once per logical axis, size and mesh axes; ``what`` names the
    array in it), so every config runs on every mesh and says where it could not split.
    """
    if logical is None:
        return P()
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical):
        axes = LOGICAL_RULES.get(name) if name is not None else None
        if name is not None and name not in LOGICAL_RULES:
            raise KeyError(f"logical axis {name!r} has no rule in mm_jax.parallel.LOGICAL_RULES")
        if axes is not None:
            tup = (axes,) if isinstance(axes, str) else tuple(axes)
            if mesh_shape is not None:
                tup = tuple(a for a in tup if a in mesh_shape and a not in used)
                if shape is not None and shape[i] % max(_mesh_axes_size(mesh_shape, tup), 1):
                    _warn_replicated(what, name, int(shape[i]), tup, mesh_shape)
                    tup = ()
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        out.append(axes)
    return P(*out)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op when no mesh is set."""
    shape = mesh_shape()
    if device_count(shape) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, shape,
                                                               what=f"activation {tuple(logical)}"))


def variable_spec(var: Any, mesh: Mesh, name: str | None = None) -> P:
    """The mesh ``PartitionSpec`` of one NNX variable (abstract or concrete): its logical names
    (``nnx.get_partition_spec``, i.e. the ``out_sharding`` metadata; the older ``logical_axes``
    key is read too) mapped through ``LOGICAL_RULES``, dimensions that do not divide replicated
    (with a warning naming the parameter ``name``)."""
    from flax import nnx

    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    logical = tuple(nnx.spmd.get_var_pspec(var) or ()) if meta.get("out_sharding") else meta.get("logical_axes")
    shape = var.get_value().shape if hasattr(var, "get_value") else var.shape
    if logical is not None and len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match a parameter of shape {shape}")
    return logical_to_spec(logical, shape, dict(mesh.shape), what=f"parameter {name or ''} {tuple(shape)}")


def _path(p) -> str:
    return "/".join(map(str, p))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """``nnx.get_named_sharding`` with the project's rules: a pytree of ``NamedSharding`` matching an
    ``nnx.State`` (from ``nnx.state`` or ``nnx.eval_shape``). Unlike nnx's own, a dimension its mesh
    axes do not divide is replicated instead of failing (with a warning), so any config runs on any mesh."""
    from flax import nnx

    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(p, NamedSharding(mesh, variable_spec(v, mesh, _path(p)))) for p, v in flat])


def shard_module(module: Any, mesh: Mesh) -> Any:
    """Place an existing module's variables on ``mesh`` by their logical axes (in place)."""
    from flax import nnx

    state = nnx.state(module)
    flat = nnx.to_flat_state(state)
    placed = [(p, jax.device_put(v.get_value(), NamedSharding(mesh, variable_spec(v, mesh, _path(p)))))
              for p, v in flat]
    for (p, var), (_, value) in zip(flat, placed):
        var.set_value(value)
    nnx.update(module, nnx.from_flat_state(flat))
    return module
