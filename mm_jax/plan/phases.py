"""The phases the planner compiles: each is (the library's own jitted function, abstract arguments).

    sample:       text_encoder  ``mm_jax.text.encode_ids(t5, ids)``                     once per video
                  denoise       ``mm_jax.denoising.denoise_step_fn(kind, cfg, model_fn)`` ``steps`` per video
                                (``identity.identity_model_fn`` + the adapter's extras, or the plain DiT)
                  vae_decode    ``mm_jax.pipeline.decode_fn()(vae, latents)``            once per video
    train-image / train-video:
                  train_step    ``mm_jax.training.step.make_train_step(...)`` over ``abstract_state``  once per step

Arguments are ``jax.ShapeDtypeStruct``s with the shardings the sampler and the trainer give them:
modules from ``checkpoint.abstract_model(name, cfg, mesh)`` (parameters sharded by their logical
axes), the batch by ``training.step.batch_sharding``, the sampler's small host inputs replicated.
No weights are read. Shapes that the models produce (text embeddings, identity tokens, CLIP
states) are taken from ``jax.eval_shape`` of the models themselves, not written down here.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import presets, sample_settings
from mm_jax.models.layers import default_attention_impl

_RECIPE = presets.load("magic_mirror_training")  # the paper's stages, as configs/image.py and video.py read them
_VIDEO = _RECIPE["stages"]["video"]

@dataclasses.dataclass(frozen=True)
class Models:
    """The configs of the networks to plan (no weights): the real ones from ``mm_jax.presets``, or
    those of converted checkpoint folders. ``adapter``: a trained adapter's config, or None for the
    design's adapter for this DiT (``training.models.adapter_config``)."""
    transformer: Any
    vae: Any
    text_encoder: Any
    image_encoder: Any
    scheduler: dict
    adapter: Any = None
    source: str = "presets"

    @classmethod
    def real(cls) -> "Models":
        """CogVideoX-5B (DiT, VAE, T5-XXL encoder, scheduler) and the CLIP ViT-L/14 vision tower."""
        from mm_jax import components, presets

        cfg = lambda comp, name: components.get(comp).config_from_dict(presets.load(name))  # noqa: E731
        return cls(cfg("transformer", "cogvideox5b_transformer"), cfg("vae", "cogvideox_vae"),
                   cfg("text_encoder", "t5_v1_1_xxl_encoder"), cfg("image_encoder", "clip_vit_l14_vision"),
                   presets.load("cogvideox5b_scheduler"), None, "mm_jax.presets (CogVideoX-5B, T5-XXL, CLIP ViT-L/14)")

    @classmethod
    def from_checkpoint(cls, ckpt_dir, adapter_dir=None) -> "Models":
        """The configs of a converted backbone folder (and an adapter folder with ``image_encoder``
        and optionally a trained ``adapter``); only the ``config.json`` files are read."""
        import json
        from pathlib import Path

        from mm_jax import checkpoint, presets

        ckpt = Path(ckpt_dir)
        adapter_dir = Path(adapter_dir) if adapter_dir else None
        clip_dir = adapter_dir if adapter_dir and (adapter_dir / "image_encoder").is_dir() else None
        clip = (checkpoint.load_config(clip_dir, "image_encoder") if clip_dir else
                Models.real().image_encoder)
        adapter = (checkpoint.load_config(adapter_dir, "adapter")
                   if adapter_dir and (adapter_dir / "adapter" / "config.json").exists() else None)
        sched = ckpt / "scheduler" / "scheduler_config.json"
        return cls(checkpoint.load_config(ckpt, "transformer"), checkpoint.load_config(ckpt, "vae"),
                   checkpoint.load_config(ckpt, "text_encoder"), clip,
                   json.loads(sched.read_text()) if sched.exists() else presets.load("cogvideox5b_scheduler"),
                   adapter, f"{ckpt}" + (f" + {adapter_dir}" if adapter_dir else ""))


    def with_dit(self, fields: dict[str, str]) -> "Models":
        """These models with DiT config fields set from text (``{"remat_policy": "dots"}``), each
        parsed as its field's type; an unknown field or a bad value is a ValueError naming it."""
        import typing

        cfg = self.transformer
        known = {f.name: f for f in dataclasses.fields(cfg)}
        hints = typing.get_type_hints(type(cfg))
        values = {}
        for name, text in fields.items():
            if name not in known:
                raise ValueError(f"--dit {name}={text}: the DiT config has no field {name!r}; fields: "
                                 f"{', '.join(sorted(known))}")
            kind = hints[name]
            kind = next((a for a in typing.get_args(kind) if a is not type(None)), kind)  # Optional[X] -> X
            if kind is bool:
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"--dit {name}={text}: expected true or false")
                values[name] = text.lower() in ("true", "1")
            else:
                try:
                    values[name] = kind(text)
                except (TypeError, ValueError):
                    raise ValueError(f"--dit {name}={text}: not a {kind.__name__}") from None
        new = dataclasses.replace(cfg, **values)
        new.validate()
        return dataclasses.replace(self, transformer=new, source=f"{self.source}; DiT {values}")


@dataclasses.dataclass(frozen=True)
class SampleSettings(sample_settings.SampleSettings):
    """One video as ``mm_jax.pipeline.sample_identity`` makes it on an accelerator: the pipeline's
    settings (sizes, steps, scheduler, guidance > 1 for CFG as one batch of 2; no prompt needed)
    and how the sampler runs them."""
    prompt: str = "(planned)"
    identity: bool = True          # the adapter's face tokens and CAN in the DiT (Magic Mirror)
    vae_tiling: bool = True
    dtype: str = "bfloat16"
    quantize: str | None = None    # "int8" | "fp8" (+ fp8 attention) | "fp8-linears" | "int8-weights" (models.quantize)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """One training step as ``mm_jax.training.loop.train`` runs it; the defaults are the paper's
    video stage and ``defaults(stage)`` either stage, from ``mm_jax/presets/magic_mirror_training.json``
    (the numbers the training configs read)."""
    stage: str = "video"
    batch: int = _VIDEO["global_batch_size"]
    frames: int = _VIDEO["frames"]
    height: int = _RECIPE["height"]
    width: int = _RECIPE["width"]
    remat: str = _RECIPE["remat_policy"]
    precomputed: str = "none"      # none | latents+text (data.precomputed) | all (+ CLIP states)
    dtype: str = _RECIPE["dtype"]
    trainable: tuple = tuple(_RECIPE["trainable"])
    text_length: int = _RECIPE["max_text_length"]
    optimizer: dict = dataclasses.field(default_factory=lambda: dict(_RECIPE["optimizer"]))
    adapter_overrides: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def defaults(cls, stage: str) -> "TrainSettings":
        """The paper's stage: "image" (batch 64 of 1 frame) or "video" (batch 8 of 49 frames), at 480x720."""
        if stage not in _RECIPE["stages"]:
            raise ValueError(f"stage={stage!r}; choose from {', '.join(_RECIPE['stages'])}")
        st = _RECIPE["stages"][stage]
        return cls(stage=stage, batch=st["global_batch_size"], frames=st["frames"])

    @classmethod
    def from_config(cls, cfg) -> "TrainSettings":
        """From a training config (``mm_jax.config.load``): the fields that change the step."""
        return cls(stage=cfg.data.stage, batch=int(cfg.train.global_batch_size), frames=int(cfg.data.frames),
                   height=int(cfg.data.height), width=int(cfg.data.width), remat=cfg.model.remat_policy,
                   precomputed="latents+text" if cfg.data.precomputed else "none", dtype=cfg.model.dtype,
                   trainable=tuple(cfg.train.trainable), text_length=int(cfg.data.max_text_length),
                   optimizer=dict(cfg.optimizer), adapter_overrides=dict(cfg.adapter))


PRECOMPUTED = ("none", "latents+text", "all")


@dataclasses.dataclass
class Phase:
    """A phase to compile: ``build(mesh) -> (jitted fn, abstract args)``; ``runs`` per video/step."""
    name: str
    build: Callable
    runs: int = 1
    what: str = ""


def _replace(cfg, **kw):
    return dataclasses.replace(cfg, **kw)


def _sds(mesh, x) -> jax.ShapeDtypeStruct:
    """A host array as the jitted step receives it: replicated, its dtype canonicalized (f64 -> f32)."""
    from mm_jax.plan.aot import replicated

    return replicated(mesh, np.shape(x), jax.dtypes.canonicalize_dtype(np.asarray(x).dtype))


def _shape_on(mesh, fn, *args):
    """``jax.eval_shape`` under the target's mesh (so the models pick the target's kernels)."""
    with jax.set_mesh(mesh):
        return jax.eval_shape(fn, *args)


def _adapter_cfg(models: Models, dit_cfg, dtype: str, param_dtype: str, impl, overrides=None):
    from mm_jax.training.models import adapter_config

    if models.adapter is not None:
        return _replace(models.adapter, dtype=dtype, param_dtype=param_dtype, attention_impl=impl)
    cfg = adapter_config(dit_cfg, models.image_encoder.hidden_size, dict(overrides or {}, attention_impl=impl), dtype)
    return _replace(cfg, param_dtype=param_dtype)


def check_sample(models: Models, s: SampleSettings) -> None:
    """The sampler's own checks of the sizes (frames the VAE decodes exactly, multiples of 16, ...)."""
    from mm_jax import frame_counts
    from mm_jax.models import quantize

    vae = models.vae
    s.check_sizes(vae.spatial_compression, vae.temporal_compression_ratio, models.transformer.patch_size)
    frame_counts.check(s.frames, "frames", **frame_counts.from_vae_config(vae))
    quantize.check(s.quantize, "quantize")


def sample_phases(models: Models, s: SampleSettings, platform: str, kind: str | None = None) -> list[Phase]:
    """text_encoder, denoise (x steps), vae_decode: what ``pipeline.generate`` runs for one video."""
    from mm_jax import checkpoint, denoising, identity, pipeline, text
    from mm_jax import schedulers as sch
    from mm_jax.models import quantize

    check_sample(models, s)
    q = s.quantize

    def abstract(name, cfg, mesh):  # as the sampler holds it: restored, then its linear layers quantized
        return quantize.quantize_model(checkpoint.abstract_model(name, cfg, mesh), q)

    impl = default_attention_impl(platform, kind)
    cfg_on = s.guidance > 1.0
    n_text = 2 if cfg_on else 1
    dt = jnp.dtype(s.dtype)
    t5_cfg = _replace(models.text_encoder, dtype=s.dtype, param_dtype=s.dtype)
    dit_cfg = _replace(models.transformer, dtype=s.dtype, param_dtype=s.dtype, attention_impl=impl,
                       remat_policy="none")
    vae_cfg = _replace(models.vae, use_tiling=s.vae_tiling)
    latent_shape = s.latent_shape(dit_cfg.in_channels, vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio)

    # host-side constants of the loop, made here (outside the target's mesh) as the sampler makes them
    schedule = jax.tree.map(np.asarray, sch.make_schedule(
        sch.SchedulerConfig.from_dict(models.scheduler, kind=s.scheduler), s.steps))
    guidance = denoising.guidance_per_step(schedule, s.guidance, False)
    key = jax.eval_shape(lambda: jax.random.key(0))

    def ids(mesh):
        from mm_jax.plan.aot import replicated

        return replicated(mesh, (n_text, s.max_sequence_length), jnp.int32)

    def text_encoder(mesh):
        return text.encode_ids, (abstract("text_encoder", t5_cfg, mesh), ids(mesh))

    def denoise(mesh):
        from mm_jax.plan.aot import replicated

        t5 = checkpoint.abstract_model("text_encoder", t5_cfg, mesh)
        emb = _shape_on(mesh, text.encode_ids, t5, ids(mesh))
        dit = abstract("transformer", dit_cfg, mesh)
        args = [dit, replicated(mesh, latent_shape, dt), replicated(mesh, latent_shape, jnp.float32),
                replicated(mesh, emb.shape, dt), jax.tree.map(lambda a: _sds(mesh, a), schedule),
                _sds(mesh, guidance), replicated(mesh, key.shape, key.dtype), replicated(mesh, (), jnp.int32)]
        model_fn, extras = denoising.default_model_fn, None
        if s.identity:
            ad_cfg = _adapter_cfg(models, dit_cfg, s.dtype, s.dtype, impl)
            adapter = checkpoint.abstract_model("adapter", ad_cfg, mesh)
            clip = checkpoint.abstract_model("image_encoder", models.image_encoder, mesh)
            size = models.image_encoder.image_size
            hidden = _shape_on(mesh, lambda m, x: m(x), clip, jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
            x_id, x_face = _shape_on(mesh, lambda m, h, e: m.encode(h, e), adapter,
                                     jax.ShapeDtypeStruct(hidden.shape, dt), jax.ShapeDtypeStruct((1, ad_cfg.id_dim), dt))
            # identity.prepare: the CFG batch [negative without face | fused prompt with face]
            extras = (adapter, replicated(mesh, (n_text,) + x_id.shape[1:], x_id.dtype),
                      replicated(mesh, (n_text,) + x_face.shape[1:], x_face.dtype),
                      replicated(mesh, (n_text,), jnp.bool_) if cfg_on else None)
            model_fn = identity.identity_model_fn
        step = denoising.denoise_step_fn(s.scheduler, cfg_on, model_fn)
        return step, tuple(args) + (extras,)

    def vae_decode(mesh):
        from mm_jax.plan.aot import replicated

        return pipeline.decode_fn(), (checkpoint.abstract_model("vae", vae_cfg, mesh),
                                      replicated(mesh, latent_shape, jnp.float32))

    ident = "DiT + adapter" if s.identity else "DiT"
    dit_gb = quantize.weight_bytes(abstract("transformer", dit_cfg, None)) / 1e9
    qn = f", linear layers {q}" if q else ""
    return [Phase("text_encoder", text_encoder, 1, f"T5 encoder, {n_text} x {s.max_sequence_length} tokens, {s.dtype}{qn}"),
            Phase("denoise", denoise, s.steps, f"{ident}, CFG batch {n_text}, {s.scheduler}, {s.dtype}{qn}, "
                                               f"attention {quantize.attention_impl(q, impl) or 'default'}; "
                                               f"DiT weights {dit_gb:.2f} GB"),
            Phase("vae_decode", vae_decode, 1, f"VAE decode {latent_shape}, float32, "
                                               f"tiling {'on' if s.vae_tiling else 'off'}")]


def check_train(models: Models, s: TrainSettings) -> None:
    from mm_jax.frame_counts import check_frames
    from mm_jax.models.block_runner import REMAT_POLICIES

    check_frames(s.stage, s.frames, models.vae.temporal_compression_ratio)
    sample_settings.check_video(None, s.height, s.width, spatial=models.vae.spatial_compression,
                                patch=models.transformer.patch_size)
    if s.batch < 1:
        raise ValueError(f"batch={s.batch}: must be >= 1")
    if s.precomputed not in PRECOMPUTED:
        raise ValueError(f"precomputed={s.precomputed!r}; choose from {', '.join(PRECOMPUTED)}")
    if s.remat not in REMAT_POLICIES:
        raise ValueError(f"remat={s.remat!r}; choose from {', '.join(REMAT_POLICIES)}")


def train_phases(models: Models, s: TrainSettings, platform: str, kind: str | None = None) -> list[Phase]:
    """train_step: ``training.step.make_train_step`` on ``abstract_state``, the batch sharded as
    ``put_batch`` shards it, the frozen encoders the step runs (those ``precomputed`` does not replace)."""
    import ml_collections

    from mm_jax import checkpoint
    from mm_jax import schedulers as sch
    from mm_jax.training import step as step_lib
    from mm_jax.training.models import TrainModels
    from mm_jax.training.optim import make_optimizer

    check_train(models, s)
    impl = default_attention_impl(platform, kind)
    dt = s.dtype
    dit_cfg = _replace(models.transformer, dtype=dt, param_dtype=dt, remat_policy=s.remat, attention_impl=impl)
    vae_cfg = models.vae  # float32, as load_models restores it
    clip_cfg = _replace(models.image_encoder, dtype=dt, param_dtype=dt)
    t5_cfg = _replace(models.text_encoder, dtype=dt, param_dtype=dt)
    ad_cfg = _adapter_cfg(models, dit_cfg, dt, "float32", impl, s.adapter_overrides)

    def train_step(mesh):
        from mm_jax.plan.aot import replicated

        encoders = {"none": ("vae", "text_encoder", "image_encoder"), "latents+text": ("image_encoder",),
                    "all": ()}[s.precomputed]
        build = lambda name, cfg: checkpoint.abstract_model(name, cfg, mesh) if name in encoders else None  # noqa: E731
        clip = checkpoint.abstract_model("image_encoder", clip_cfg, mesh)
        models_ = TrainModels(
            dit=checkpoint.abstract_model("transformer", dit_cfg, mesh), vae=build("vae", vae_cfg),
            text_encoder=build("text_encoder", t5_cfg), image_encoder=build("image_encoder", clip_cfg),
            adapter=checkpoint.abstract_model("adapter", ad_cfg, mesh), tokenizer=None,
            scheduler=sch.SchedulerConfig.from_dict(models.scheduler), backbone_dir=None, adapter_dir=None,
            temporal_ratio=vae_cfg.temporal_compression_ratio)
        tx = make_optimizer(ml_collections.ConfigDict(s.optimizer))
        state, aux = step_lib.abstract_state(models_, tx, mesh, s.trainable)
        train_cfg = ml_collections.ConfigDict(dict(seed=0, face_loss_prob=0.5, face_loss_lambda=1.0))
        fn = step_lib.make_train_step(models_, tx, state, aux, train_cfg, mesh)
        return fn, (state.params, state.opt_state, aux[-1], _batch(mesh, clip, models_.dit), replicated(mesh, (), jnp.int32))

    def _batch(mesh, clip, dit):
        b, size = s.batch, clip_cfg.image_size
        lat = sample_settings.latent_shape(s.frames, s.height, s.width, dit_cfg.in_channels,
                                           vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio)
        f32 = jnp.float32
        shapes = {"face_mask": ((b, s.frames, s.height, s.width), f32), "class_index": ((b,), jnp.int32),
                  "e_id": ((b, ad_cfg.id_dim), f32), "has_id": ((b,), jnp.bool_)}
        if s.precomputed == "none":
            shapes.update(pixels=((b, s.frames, s.height, s.width, 3), f32), input_ids=((b, s.text_length), jnp.int32))
        else:
            shapes.update(latents=((b,) + lat[1:], f32), latents_std=((b,) + lat[1:], f32),
                          text_embeddings=((b, s.text_length, t5_cfg.d_model), f32))
        if s.precomputed == "all":
            hidden = _shape_on(mesh, lambda m, x: m(x), clip, jax.ShapeDtypeStruct((1, size, size, 3), f32))
            shapes["clip_hidden"] = ((b,) + hidden.shape[1:], f32)
        else:
            shapes["ref_pixels"] = ((b, size, size, 3), f32)
        return step_lib.abstract_batch(shapes, mesh)

    enc = {"none": "VAE + T5 + CLIP in the step", "latents+text": "precomputed latents and T5; CLIP in the step",
           "all": "precomputed latents, T5 and CLIP states"}[s.precomputed]
    return [Phase("train_step", train_step, 1,
                  f"{s.stage} stage, global batch {s.batch} x {s.frames}x{s.height}x{s.width}, remat {s.remat}, "
                  f"{'+'.join(s.trainable)} trained (AdamW, float32 master), {dt} compute, {enc}, "
                  f"attention {impl or 'default'}")]
