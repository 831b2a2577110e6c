"""mm_jax checkpoint folders: Orbax params per component, restored straight onto a mesh.

Layout of a converted (or trained) checkpoint folder::

    DIR/mm_jax_checkpoint.json        {"format": 1, "components": [...]}
    DIR/<component>/config.json       the architecture (diffusers/transformers field names)
    DIR/<component>/params/           Orbax checkpoint of a flat {"a/b/0/kernel": array} dict
    DIR/tokenizer/, DIR/scheduler/    copied verbatim from the source pipeline

Restoring builds the network abstractly (``nnx.eval_shape``), derives each parameter's
``NamedSharding`` from its logical axes, and lets Orbax read every array directly into its shards:
no replicated host copy of the model is ever made.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from mm_jax import components, parallel

INDEX_FILE = "mm_jax_checkpoint.json"
FORMAT_VERSION = 1


def flat_key(path: tuple) -> str:
    return "/".join(str(p) for p in path)


def _path_from_key(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("/"))


def abstract_model(name: str, cfg: Any):
    """The component's network with ``jax.ShapeDtypeStruct`` leaves (no memory, no compute)."""
    spec = components.get(name)
    return nnx.eval_shape(lambda: spec.build(cfg, nnx.Rngs(0)))


def param_shapes(model) -> dict[str, tuple[tuple[int, ...], Any]]:
    """``{flat key: (shape, dtype)}`` of every parameter of a (possibly abstract) module."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        out[flat_key(path)] = (tuple(v.shape), v.dtype)
    return out


def write_index(ckpt_dir: Path, names: list[str]) -> None:
    (Path(ckpt_dir) / INDEX_FILE).write_text(json.dumps({"format": FORMAT_VERSION, "components": names}, indent=1))


def read_index(ckpt_dir: str | Path) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    idx = ckpt_dir / INDEX_FILE
    if not idx.exists():
        raise FileNotFoundError(f"{ckpt_dir} is not an mm_jax checkpoint folder (no {INDEX_FILE}); "
                                "make one with tools/convert_weights/from_torch.py")
    return json.loads(idx.read_text())["components"]


def save_params(folder: Path, flat: Mapping[str, np.ndarray | jax.Array]) -> None:
    """Orbax-save a flat ``{key: array}`` dict into ``folder/params`` (blocking)."""
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(Path(folder).absolute() / "params", dict(flat))
    ckptr.wait_until_finished()


def save_component(ckpt_dir: str | Path, name: str, cfg: Any, flat: Mapping[str, Any]) -> None:
    folder = Path(ckpt_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1, default=str))
    save_params(folder, flat)


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
    """
    cfg = load_config(ckpt_dir, name, **overrides)
    mesh = mesh or parallel.make_mesh()
    with jax.set_mesh(mesh):
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
    meta = ocp.StandardCheckpointer().metadata(params_dir)
    stored = getattr(meta, "item_metadata", meta)
    stored_keys = set(stored.keys()) if hasattr(stored, "keys") else set(params_target)
    missing = sorted(set(params_target) - stored_keys)
    extra = sorted(stored_keys - set(params_target))
    if missing or extra:
        raise ValueError(f"checkpoint {params_dir} does not fit the {name} config: "
                         f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
                         f"unexpected {extra[:10]}{'...' if len(extra) > 10 else ''}")
    for k, t in params_target.items():
        s = stored[k]
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(f"checkpoint {params_dir}: parameter {k} has shape {tuple(s.shape)}, "
                             f"the config expects {tuple(t.shape)}")
    restored = ocp.StandardCheckpointer().restore(params_dir, params_target)
    new_flat = []
    for path, var in flat:
        key = flat_key(path)
        if key in restored:
            var = var.replace(restored[key]) if hasattr(var, "replace") else var
        new_flat.append((path, var))
    state = nnx.from_flat_state(new_flat)
    return nnx.merge(graphdef, state)
