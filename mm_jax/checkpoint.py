"""mm_jax checkpoint folders: Orbax params per component, restored straight onto a mesh.

Layout of a converted (or trained) checkpoint folder::

    DIR/mm_jax_checkpoint.json        {"format": 2, "components": [...]}
    DIR/<component>/config.json       the architecture (diffusers/transformers field names)
    DIR/<component>/params/<group>/   Orbax checkpoints of flat {"a/b/kernel": array} dicts, one
                                      per group: a top-level module, one numbered list entry, or
                                      one stacked parameter (the layers of a stack, e.g. all 42
                                      ``transformer_blocks/attn1/to_q/kernel``), so writing and
                                      reading hold at most one group in host memory (the
                                      converter writes a large stack layer by layer: ``Stacked``)

Format 2 stores stacks of identical layers (``components.ComponentSpec.stacks``) as one array
with a leading layers axis, as the scanned networks hold them. Format 1 kept one group per
block; such folders are refused with a message to re-convert.
    DIR/tokenizer/, DIR/scheduler/    copied verbatim from the source pipeline

Restoring builds the network abstractly (``nnx.eval_shape``), derives each parameter's
``NamedSharding`` from its logical axes, and lets Orbax read every array directly into its shards:
no replicated host copy of the model is ever made.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mm_jax import components, parallel

INDEX_FILE = "mm_jax_checkpoint.json"
FORMAT_VERSION = 2


def flat_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _path_from_key(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("/"))


def abstract_model(name: str, cfg: Any, mesh: Mesh | None = None):
    """The component's network with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute).

    Built with no mesh in context (under a mesh, ``nnx.eval_shape`` would read the logical axis
    names as mesh axes). With ``mesh``, every leaf also carries the ``NamedSharding`` its logical
    axes give on that mesh (``parallel.state_shardings``, what ``load_component`` restores onto), so
    the module can be passed to ``jit(...).lower`` as an argument: the planner
    (``python -m mm_jax.plan``) compiles the real step functions this way."""
    spec = components.get(name)
    with parallel.no_mesh():
        abstract = nnx.eval_shape(lambda: spec.build(cfg, nnx.Rngs(0)))
    if mesh is None:
        return abstract
    graphdef, state = nnx.split(abstract)
    flat = []
    for path, var in nnx.to_flat_state(state):
        v = var.get_value()
        sds = jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(mesh, parallel.variable_spec(var, mesh)))
        flat.append((path, var.replace(sds)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def param_shapes(model) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{flat key: (shape, dtype)}`` of every parameter of a (possibly abstract) module."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        out[flat_key(path)] = (tuple(v.shape), v.dtype)
    return out


def _writable(folder) -> Any:
    """A folder to write into: a URL (``gs://...``) as an ``etils.epath`` path, a local one absolute."""
    text = os.fspath(folder)
    return epath.Path(text) if "://" in text else Path(text).absolute()


def write_index(ckpt_dir: Path, names: list[str]) -> None:
    (_writable(ckpt_dir) / INDEX_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "components": names}, indent=1))


def read_index(ckpt_dir: str | Path) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    idx = ckpt_dir / INDEX_FILE
    if not idx.exists():
        raise FileNotFoundError(f"{ckpt_dir} is not an mm_jax checkpoint folder (no {INDEX_FILE}); "
                                "make one with tools/convert_weights/from_torch.py")
    index = json.loads(idx.read_text())
    fmt = index.get("format", 1)
    if fmt != FORMAT_VERSION:
        raise ValueError(f"{ckpt_dir} is an mm_jax checkpoint of format {fmt}; this version reads format "
                         f"{FORMAT_VERSION} (stacked layers). Re-convert it with tools/convert_weights/from_torch.py "
                         f"(a trained adapter: re-export it by running training again on its workdir)")
    return index["components"]


def group_of(name: str, key: str) -> str:
    """The save group of component ``name``'s flat key: a stacked parameter is its own group
    (``transformer_blocks.attn1.to_q.kernel``); otherwise the path up to its first list index
    (``down_blocks.3``), else its top-level module (``patch_embed``)."""
    if components.stack_of(name, key):
        return key.replace("/", ".")
    parts = key.split("/")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0] if len(parts) > 1 else "_root"


@dataclass(frozen=True)
class Stacked:
    """A stacked parameter given layer by layer, for writers that stream from disk.

    ``layer(i)`` returns layer ``i`` (an array of ``shape[1:]``, cast to ``dtype``). ``save_params``
    writes a stack of more than ``STREAM_BYTES`` one layer at a time into chunks of one layer, so
    neither the stack nor a copy of it is ever held; a smaller one is assembled first and written
    like an array. Restored, both are the same ``shape`` array (the chunking is invisible)."""
    shape: tuple[int, ...]
    dtype: np.dtype
    layer: Callable[[int], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def size(self) -> int:  # Orbax refuses zero-size arrays by this
        return int(np.prod(self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def checked_layer(self, i: int) -> np.ndarray:
        arr = np.asarray(self.layer(i))
        if arr.shape != tuple(self.shape[1:]):
            raise ValueError(f"layer {i} of a stack of shape {list(self.shape)} has shape {list(arr.shape)}")
        return arr.astype(self.dtype, copy=False)

    def materialize(self) -> np.ndarray:
        out = np.empty(self.shape, self.dtype)
        for i in range(self.shape[0]):
            out[i] = self.checked_layer(i)
        return out


STREAM_BYTES = 64 * 2**20  # stacks larger than this are written layer by layer


class _LayerByLayerHandler(ocp.type_handlers.NumpyHandler):
    """Orbax's numpy writer, fed a ``Stacked`` one layer at a time.

    Orbax opens the array's TensorStore with the chunking that ``save_params`` asks for (one layer
    per chunk), so each ``write`` of a layer fills whole chunks and is encoded and stored before
    the next layer is read. Overrides ``NumpyHandler._open_and_write`` (orbax-checkpoint 0.12),
    the one place it writes a value; the rest (specs, metadata, OCDBT layout) is Orbax's own, so
    the folder restores like any other."""

    def __init__(self):
        super().__init__(deepcopy_host_arrays=False)  # save_params waits for each write

    async def _open_and_write(self, value, tspec, ts_context):
        if not isinstance(value, Stacked):
            return await super()._open_and_write(value, tspec, ts_context)
        t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
        for i in range(value.shape[0]):
            await t[i].write(value.checked_layer(i))


def _host_checkpointer() -> ocp.Checkpointer:
    """Orbax's pytree checkpointer for host values (numpy arrays and ``Stacked``), without the copy
    of every numpy array that Orbax's default handler makes in case the caller changes it during
    an asynchronous save (this one is synchronous); jax arrays keep Orbax's own handler."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)),
        (Stacked, _LayerByLayerHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))


def save_params(folder: Path, name: str, flat: Mapping[str, Any], progress: bool = False) -> None:
    """Orbax-save a flat ``{key: array-or-callable}`` dict into ``folder/params``, one group at a time.

    A value may be a zero-argument callable producing the array, so a caller streaming from disk
    materializes only the current group; it may produce (or be) a ``Stacked``, which is written one
    layer at a time. A group of host values (numpy arrays, ``Stacked``) is written synchronously
    without copies: host memory holds the group's plain arrays, or one layer of a stack, and what
    Orbax encodes of it. Groups holding jax arrays (a live module's, possibly spread over
    processes) go through Orbax's ``StandardCheckpointer``.
    """
    groups: dict[str, list[str]] = {}
    for k in flat:
        groups.setdefault(group_of(name, k), []).append(k)
    root = _writable(folder) / "params"
    root.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    host = None
    items = groups.items()
    if progress:
        from tqdm import tqdm

        items = tqdm(items, desc=f"writing {Path(folder).name}", unit="group")
    for g, keys in items:
        tree = {k: (flat[k]() if callable(flat[k]) else flat[k]) for k in keys}
        tree = {k: (v.materialize() if isinstance(v, Stacked) and v.nbytes <= STREAM_BYTES else v)
                for k, v in tree.items()}
        if all(isinstance(v, (np.ndarray, Stacked)) for v in tree.values()):
            host = host or _host_checkpointer()
            args = {k: ocp.SaveArgs(chunk_byte_size=v.nbytes // v.shape[0], shard_axes=(0,))
                    if isinstance(v, Stacked) else ocp.SaveArgs() for k, v in tree.items()}
            host.save(root / g, args=ocp.args.PyTreeSave(tree, save_args=args))
        else:
            ckptr.save(root / g, tree)
            ckptr.wait_until_finished()
        del tree


def save_component(ckpt_dir: str | Path, name: str, cfg: Any, flat: Mapping[str, Any], progress: bool = False) -> None:
    folder = _writable(ckpt_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    save_params(folder, name, flat, progress)


def save_module(ckpt_dir: str | Path, name: str, module: nnx.Module) -> None:
    """Save a live module as a component (its ``cfg`` attribute is the config)."""
    flat = {flat_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    save_component(ckpt_dir, name, module.cfg, flat)


def load_config(ckpt_dir: str | Path, name: str, **overrides) -> Any:
    path = Path(ckpt_dir) / name / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {ckpt_dir} has no component {name!r} ({path} missing)")
    return components.get(name).config_from_dict(json.loads(path.read_text()), **overrides)


def load_component(ckpt_dir: str | Path, name: str, *, mesh: Mesh | None = None, **overrides) -> nnx.Module:
    """Restore one component onto ``mesh`` (default: all local devices on the fsdp axis).

    ``overrides`` set runtime config fields, e.g. ``dtype="bfloat16", param_dtype="bfloat16"``;
    stored arrays are cast to ``param_dtype`` as they are read.

    Host memory: groups (one stacked parameter, or one module) are restored one after another,
    and Orbax reads a group into host buffers before it copies them onto the devices, so besides
    the restored arrays a restore holds one group on the host. On CPU, where device arrays are
    host memory, that is the component plus its largest group (measured on the random-weight 5B,
    ``benchmarks/host_memory.py``: T5-XXL 1.25x its 8.9 GiB, the DiT 1.30x its 10.4 GiB, whose
    largest groups are the 2.0 and 3.2 GB feed-forward stacks); on an accelerator, the largest
    group's part on this process's devices.
    """
    if (Path(ckpt_dir) / INDEX_FILE).exists():
        read_index(ckpt_dir)  # refuses an older format with a message to re-convert
    cfg = load_config(ckpt_dir, name, **overrides)
    mesh = mesh or parallel.make_mesh()
    abstract = abstract_model(name, cfg)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    params_target = {}
    for path, var in flat:
        if isinstance(var, nnx.Param):
            v = var.get_value()
            params_target[flat_key(path)] = jax.ShapeDtypeStruct(
                v.shape, v.dtype, sharding=NamedSharding(mesh, parallel.variable_spec(var, mesh)))
    params_dir = (Path(ckpt_dir) / name / "params").absolute()
    ckptr = ocp.StandardCheckpointer()
    groups: dict[str, dict[str, Any]] = {}
    for k, t in params_target.items():
        groups.setdefault(group_of(name, k), {})[k] = t
    stored_groups = {p.name for p in params_dir.iterdir()} if params_dir.is_dir() else set()
    problems = [f"missing group {g} ({len(ts)} params)" for g, ts in groups.items() if g not in stored_groups]
    problems += [f"unexpected group {g}" for g in sorted(stored_groups - set(groups))]
    stored = {}
    for g in groups:
        if g in stored_groups:
            meta = ckptr.metadata(params_dir / g)
            stored.update(dict(getattr(meta, "item_metadata", meta)))
    problems += [f"missing {k} (expected shape {list(t.shape)})" for k, t in params_target.items() if k not in stored]
    problems += [f"unexpected {k}" for k in sorted(set(stored) - set(params_target))]
    problems += [f"{k}: stored shape {list(stored[k].shape)}, the config expects {list(t.shape)}"
                 for k, t in params_target.items() if k in stored and tuple(stored[k].shape) != tuple(t.shape)]
    if problems:
        raise ValueError(f"checkpoint {params_dir} does not fit the {name} config ({len(problems)} problem(s)):\n  "
                         + "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else ""))
    restored = {}
    for g, targets in groups.items():
        restored.update(ckptr.restore(params_dir / g, targets))
    new_flat = []
    for path, var in flat:
        key = flat_key(path)
        if key in restored:
            var = var.replace(restored[key]) if hasattr(var, "replace") else var
        new_flat.append((path, var))
    state = nnx.from_flat_state(new_flat)
    return nnx.merge(graphdef, state)
