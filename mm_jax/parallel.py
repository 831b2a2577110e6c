"""Meshes and logical-axis sharding: the only module that knows mesh axis names.

Models annotate parameters (``nnx.with_partitioning(init, ("embed", "mlp"))``, through
``mm_jax.models.layers``) and activations (``constrain(x, ("batch", "seq", "embed"))``) with
*logical* names. ``LOGICAL_RULES`` below maps
those names to the physical mesh axes, once, for the whole project. A logical dimension that does
not divide evenly over its mesh axes is replicated instead, so every configuration (tiny test
models included) runs on every mesh.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
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
    shards = _mesh_axes_size(mesh_shape, LOGICAL_RULES["batch"])
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


def make_mesh(shape: Mapping[str, int] | str | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` over ``MESH_AXES``. Missing axes get size 1; the product must equal the device count."""
    devices = list(jax.devices() if devices is None else devices)
    if isinstance(shape, str):
        shape = parse_mesh_spec(shape)
    shape = dict(default_mesh_shape(len(devices)) if not shape else shape)
    sizes = [shape.get(a, 1) for a in MESH_AXES]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but {len(devices)} are present"
        )
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # unusual topologies (fake CPU devices): plain reshape
        arr = np.asarray(devices).reshape(sizes)
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


def logical_to_spec(logical: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh_shape: Mapping[str, int] | None = None) -> P:
    """Map logical axis names to a ``PartitionSpec`` through ``LOGICAL_RULES``.

    With ``shape`` and ``mesh_shape`` given, a dimension that does not divide evenly over its mesh
    axes, or whose mesh axes are already used by an earlier dimension, is replicated.
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
                    tup = ()
            used.update(tup)
            axes = None if not tup else (tup[0] if len(tup) == 1 else tup)
        out.append(axes)
    return P(*out)


def _current_mesh_shape() -> dict[str, int] | None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return None
    return dict(mesh.shape)


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op when no mesh is set."""
    mesh_shape = _current_mesh_shape()
    if mesh_shape is None or math.prod(mesh_shape.values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, x.shape, mesh_shape))


def variable_spec(var: Any, mesh: Mesh) -> P:
    """The mesh ``PartitionSpec`` of one NNX variable (abstract or concrete): its logical names
    (``nnx.get_partition_spec``, i.e. the ``out_sharding`` metadata; the older ``logical_axes``
    key is read too) mapped through ``LOGICAL_RULES``, dimensions that do not divide replicated."""
    from flax import nnx

    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    logical = tuple(nnx.spmd.get_var_pspec(var) or ()) if meta.get("out_sharding") else meta.get("logical_axes")
    shape = var.get_value().shape if hasattr(var, "get_value") else var.shape
    if logical is not None and len(logical) != len(shape):
        raise ValueError(f"logical axes {logical} do not match a parameter of shape {shape}")
    return logical_to_spec(logical, shape, dict(mesh.shape))


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """``nnx.get_named_sharding`` with the project's rules: a pytree of ``NamedSharding`` matching an
    ``nnx.State`` (from ``nnx.state`` or ``nnx.eval_shape``). Unlike nnx's own, a dimension its mesh
    axes do not divide is replicated instead of failing, so any config runs on any mesh."""
    from flax import nnx

    flat = nnx.to_flat_state(state)
    return nnx.from_flat_state([(p, NamedSharding(mesh, variable_spec(v, mesh))) for p, v in flat])


def shard_module(module: Any, mesh: Mesh) -> Any:
    """Place an existing module's variables on ``mesh`` by their logical axes (in place)."""
    from flax import nnx

    state = nnx.state(module)
    flat = nnx.to_flat_state(state)
    placed = [(p, jax.device_put(v.get_value(), NamedSharding(mesh, variable_spec(v, mesh)))) for p, v in flat]
    for (p, var), (_, value) in zip(flat, placed):
        var.set_value(value)
    nnx.update(module, nnx.from_flat_state(flat))
    return module
