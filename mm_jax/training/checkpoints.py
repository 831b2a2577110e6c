"""Training checkpoints with Orbax: adapter params, optimizer state and a JSON ``meta`` item
(step, seed, data-iterator state, config digest) per step folder, saved asynchronously every N
steps with the last K kept. A checkpoint is only ever written after its step's loss was checked
finite, so the latest one is always a good one. The directory may be a URL (``gs://bucket/run/
checkpoints``): Orbax writes URLs itself. On several processes every process calls every method
(Orbax writes each process's shards and coordinates the processes)."""
from __future__ import annotations

import base64
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


def _jsonable(state: Any) -> Any:
    """Grain iterator states are dicts of plain values, or bytes: bytes are base64 in JSON."""
    if isinstance(state, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(state)).decode()}
    return state


def _from_jsonable(state: Any) -> Any:
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        return base64.b64decode(state["__bytes__"])
    return state


class TrainCheckpoints:
    """``<workdir>/checkpoints/<step>/{params,opt_state,meta}``."""

    def __init__(self, directory: str | os.PathLike, *, keep: int, every: int, async_save: bool = True):
        if every < 1 or keep < 1:
            raise ValueError(f"checkpoint every={every} and keep={keep} must be >= 1")
        text = os.fspath(directory)
        self.directory = epath.Path(text if "://" in text else os.path.abspath(text))
        self.every = every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, final: bool = False) -> bool:
        return final or step % self.every == 0

    def save(self, step: int, params, opt_state, meta: dict) -> None:
        meta = dict(meta, data_state=_jsonable(meta.get("data_state")))
        self.manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                         opt_state=ocp.args.StandardSave(opt_state),
                                                         meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, step: int, params_target, opt_target) -> tuple[Any, Any, dict]:
        """Restore onto the targets' shardings (pytrees of arrays or ShapeDtypeStructs)."""
        abstract = lambda tree: jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params_target)),
            opt_state=ocp.args.StandardRestore(abstract(opt_target)),
            meta=ocp.args.JsonRestore()))
        meta = dict(out["meta"])
        meta["data_state"] = _from_jsonable(meta.get("data_state"))
        return out["params"], out["opt_state"], meta

    def restore_params(self, step: int, params_target):
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params_target))))
        return out["params"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
