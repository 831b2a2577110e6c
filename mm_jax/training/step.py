"""One training step, jitted over the mesh: conditions from the frozen encoders, the noised
latents, the adapter + DiT forward, the weighted v-prediction loss, AdamW on the adapter only.

Parameters and optimizer state are pure dicts sharded by the logical rules of ``mm_jax.parallel``;
the batch is sharded on its leading axis over ("data", "fsdp"). Randomness is
``fold_in(seed, step)``, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from mm_jax import parallel
from mm_jax.models.vae import encode_video
from mm_jax.training import loss as L
from mm_jax.training.models import TrainModels

BATCH_AXES = {  # logical names per batch field (leading axis sharded over the batch mesh axes)
    "pixels": ("batch", "frames", "height", "width", None),
    "latents": ("batch", "frames", "height", "width", None),
    "latents_std": ("batch", "frames", "height", "width", None),
    "face_mask": ("batch", "frames", "height", "width"),
    "input_ids": ("batch", "seq"),
    "text_embeddings": ("batch", "seq", None),
    "class_index": ("batch",),
    "e_id": ("batch", None),
    "ref_pixels": ("batch", "height", "width", None),
    "clip_hidden": ("batch", "seq", None),
    "has_id": ("batch",),
}


@dataclasses.dataclass
class TrainState:
    """Host-side handle of what the step updates: {module name: pure dict of sharded arrays}."""
    params: Any
    opt_state: Any
    param_shardings: Any
    opt_shardings: Any


TRAINABLE = ("adapter", "dit")  # what may train: the adapter (the design), the DiT too (tiny demos)


def split_modules(models: TrainModels, trainable=("adapter",)):
    """-> (graphdefs, trainable params {name: pure dict}, templates, non-param states, frozen states).

    Trainable modules are split into ``nnx.Param`` (what the optimizer sees) and the rest; frozen
    ones are passed whole to the step."""
    bad = sorted(set(trainable) - set(TRAINABLE))
    if bad or "adapter" not in trainable:
        raise ValueError(f"train.trainable={tuple(trainable)}: must include 'adapter' and only names from {TRAINABLE}")
    modules = dict(models.frozen_modules(), adapter=models.adapter)
    graphdefs, params, templates, rest, frozen = {}, {}, {}, {}, {}
    for name, module in modules.items():
        if name in trainable:
            graphdefs[name], templates[name], rest[name] = nnx.split(module, nnx.Param, ...)
            params[name] = templates[name]
        else:
            graphdefs[name], frozen[name] = nnx.split(module)
    return graphdefs, params, templates, rest, frozen


def _shardings(params: dict, tx: optax.GradientTransformation, mesh):
    """-> (param shardings, optimizer-state shardings, abstract float32 params, abstract optimizer
    state): moments sharded like their parameters, the step count replicated."""
    param_shardings = {k: nnx.to_pure_dict(parallel.state_shardings(v, mesh)) for k, v in params.items()}
    abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=s),
                                   {k: nnx.to_pure_dict(v) for k, v in params.items()}, param_shardings)
    replicated = NamedSharding(mesh, P())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    abstract_opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_opt,
                                opt_shardings)
    return param_shardings, opt_shardings, abstract_params, abstract_opt


def init_state(models: TrainModels, tx: optax.GradientTransformation, mesh, trainable=("adapter",)):
    """Trainable params (float32 master copy) and fresh optimizer state placed with their shardings."""
    graphdefs, params, templates, rest, frozen = split_modules(models, trainable)
    param_shardings, opt_shardings, _, _ = _shardings(params, tx, mesh)
    params = jax.device_put({k: jax.tree.map(lambda x: x.astype(jnp.float32), nnx.to_pure_dict(v))
                             for k, v in params.items()}, param_shardings)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    return TrainState(params, opt_state, param_shardings, opt_shardings), (graphdefs, templates, rest, frozen)


def abstract_state(models: TrainModels, tx: optax.GradientTransformation, mesh, trainable=("adapter",)):
    """``init_state`` without memory or compute, for abstract models whose leaves carry their
    shardings (``checkpoint.abstract_model(name, cfg, mesh)``): -> (TrainState whose params and
    optimizer state are ``ShapeDtypeStruct``s with their shardings, aux as ``init_state``'s, the
    frozen states abstract). ``make_train_step`` then builds the same jitted step, and
    ``step.lower(state.params, state.opt_state, aux[-1], batch, step)`` compiles it for any target
    without weights (``python -m mm_jax.plan``)."""
    graphdefs, params, templates, rest, frozen = split_modules(models, trainable)
    param_shardings, opt_shardings, abstract_params, abstract_opt = _shardings(params, tx, mesh)
    return (TrainState(abstract_params, abstract_opt, param_shardings, opt_shardings),
            (graphdefs, templates, rest, frozen))


def abstract_batch(shapes: dict[str, tuple[tuple[int, ...], Any]], mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """{field: (global shape, dtype)} -> {field: ShapeDtypeStruct} with the shardings ``put_batch`` gives."""
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(name, shape, mesh))
            for name, (shape, dtype) in shapes.items()}


def batch_sharding(name: str, shape, mesh) -> NamedSharding:
    axes = BATCH_AXES.get(name)
    if axes is None:
        raise ValueError(f"unexpected batch field {name!r}; known: {sorted(BATCH_AXES)}")
    return NamedSharding(mesh, parallel.logical_to_spec(axes[:len(shape)], shape, dict(mesh.shape)))


def process_rows(mesh, global_batch: int) -> tuple[int, int]:
    """``(start, stop)``: the rows of a global batch of ``global_batch`` that this process's devices
    hold under ``batch_sharding`` (every process loads exactly these; processes whose devices hold
    the same rows, as when the batch is replicated over an axis that spans processes, load the
    same ones). A ValueError when they are not one contiguous block (a mesh whose device order
    interleaves processes on the batch axes)."""
    sharding = batch_sharding("has_id", (global_batch,), mesh)
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                    for s in sharding.addressable_devices_indices_map((global_batch,)).values()})
    start, stop = spans[0]
    for a, b in spans[1:]:
        if a > stop:
            raise ValueError(f"process {jax.process_index()} holds rows {spans} of the global batch of {global_batch} "
                             f"on mesh {dict(mesh.shape)}: not one contiguous block, so it cannot load one slice "
                             f"of the batch; order the mesh's devices by process")
        stop = max(stop, b)
    return start, stop


def put_batch(batch: dict[str, np.ndarray], mesh, global_batch: int | None = None) -> dict[str, jax.Array]:
    """This process's rows of the global batch (``process_rows``) -> global arrays of leading size
    ``global_batch``, sharded on the batch axis. ``global_batch`` None: the batch is the whole
    global batch (one process)."""
    if global_batch is None:
        if jax.process_count() > 1:
            raise ValueError(f"put_batch on {jax.process_count()} processes needs global_batch (each holds only "
                             "its rows)")
        global_batch = len(next(iter(np.asarray(v) for k, v in batch.items() if k in BATCH_AXES)))
    out = {}
    for name, value in batch.items():
        if name not in BATCH_AXES:
            continue  # loader extras (ids, names) stay on the host
        value = np.asarray(value)
        global_shape = (global_batch,) + value.shape[1:]
        sharding = batch_sharding(name, global_shape, mesh)
        out[name] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def conditions(frozen_mods: dict, batch: dict, key: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Frozen encoders (skipped for fields the batch already holds: latents, text_embeddings,
    clip_hidden): -> (clean latents x0 (B, f, h, w, C) fp32, text (B, L, T), CLIP states (B, P, W))."""
    if "latents" in batch:  # precomputed: the posterior's mean (and std: then sampled here, as encoding would)
        x0 = batch["latents"].astype(jnp.float32)
        if "latents_std" in batch:
            x0 = x0 + batch["latents_std"].astype(jnp.float32) * jax.random.normal(key, x0.shape, jnp.float32)
    else:
        x0 = encode_video(frozen_mods["vae"], batch["pixels"].astype(jnp.float32), key)
    if "text_embeddings" in batch:
        text = batch["text_embeddings"].astype(dtype)
    else:
        text = frozen_mods["text_encoder"](batch["input_ids"]).astype(dtype)
    if "clip_hidden" in batch:
        clip_hidden = batch["clip_hidden"].astype(dtype)
    else:
        clip_hidden = frozen_mods["image_encoder"](batch["ref_pixels"].astype(dtype))
    return jax.lax.stop_gradient(x0), jax.lax.stop_gradient(text), jax.lax.stop_gradient(clip_hidden)


def make_loss_fn(models: TrainModels, aux, train_cfg) -> Callable:
    """-> ``loss(params, frozen, batch, step) -> (loss, metrics)``, pure: the step's objective
    with the step's own random draws (timesteps, noise, VAE sample, which samples get the face term)."""
    graphdefs, templates, rest, _ = aux
    abar = jnp.asarray(models.alphas_cumprod, jnp.float32)
    n_train = int(models.scheduler.num_train_timesteps)
    temporal = models.temporal_ratio
    dtype = jnp.dtype(models.dit.cfg.dtype)
    seed = int(train_cfg.seed)
    face_prob, face_lambda = float(train_cfg.face_loss_prob), float(train_cfg.face_loss_lambda)

    def loss_fn(params, frozen, batch, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        k_vae, k_t, k_eps, k_face = jax.random.split(key, 4)
        mods = {name: nnx.merge(graphdefs[name], frozen[name]) for name in frozen}
        x0, text, clip_hidden = conditions(mods, batch, k_vae, dtype)
        b = x0.shape[0]
        t = L.sample_timesteps(k_t, b, n_train)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = L.add_noise(x0, eps, abar[t]).astype(dtype)
        v = L.velocity(x0, eps, abar[t])
        mask = L.latent_face_mask(batch["face_mask"], x0.shape[1:4], temporal)
        use_face = jax.random.bernoulli(k_face, face_prob, (b,))
        weights = L.loss_weights(mask, use_face, face_lambda)
        has_id = batch["has_id"].astype(bool)
        class_index = batch["class_index"]
        fuse_on = has_id & (class_index >= 0)
        live = dict(mods, **{k: merge_params(graphdefs[k], templates[k], rest[k], p) for k, p in params.items()})
        adapter = live["adapter"]
        x_id, x_face = adapter.encode(clip_hidden, batch["e_id"])
        fused = adapter.fuse(text, x_id, jnp.maximum(class_index, 0))
        text_in = jnp.where(fuse_on[:, None, None], fused, text)
        v_hat = adapter.dit_forward(live["dit"], x_t, text_in, t, face_tokens=x_face, x_id=x_id, has_id=has_id)
        loss, _ = L.v_loss(v_hat, v, weights)
        return loss, {"timestep_mean": t.mean(), "face_term_fraction": use_face.mean()}

    return loss_fn


def make_train_step(models: TrainModels, tx: optax.GradientTransformation, state: TrainState, aux, train_cfg,
                    mesh) -> Callable:
    """-> ``step(params, opt_state, frozen, batch, step) -> (params, opt_state, metrics)``, jitted with
    the parameter/optimizer shardings fixed and their buffers donated."""
    loss_fn = make_loss_fn(models, aux, train_cfg)

    def step_fn(params, opt_state, frozen, batch, step):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, step)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))

    return jax.jit(step_fn, donate_argnums=(0, 1),
                   out_shardings=(state.param_shardings, state.opt_shardings, None))


def merge_params(graphdef, template, rest, pure: dict):
    """A module from a pure dict of parameters: a copy of the ``template`` State filled with ``pure``
    (works under tracing, where mutating the template itself would leak tracers)."""
    state = jax.tree.map(lambda v: v, template)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state, rest)
