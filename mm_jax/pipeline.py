"""Text (+ identity) to video: T5 prompt embeddings -> one compiled denoising loop -> VAE decode.

Equal to diffusers' ``CogVideoXPipeline`` given the same initial latents (section 6 of the
CogVideoX reference): CFG as one batch [negative, positive], trailing timesteps, DDIM or DPM,
dynamic CFG on the raw timestep value, latents / scaling_factor before decoding, frames
(x / 2 + 0.5) clipped to [0, 1]. No argument parsing here: the CLI is ``mm_jax.sample``. The
settings and their checks live in ``mm_jax.sample_settings``, the compiled denoising loop in
``mm_jax.denoising`` (both importable from here too).

Memory order: T5 is loaded, run and released before the DiT is placed, so the two large models
are never resident together; one video's DiT is released before the VAE is placed, while many
videos written as they finish keep both (``iter_videos``).

Several processes (``mm_jax.distributed``): every process makes the same calls, the models run over
the global mesh, and every result fetched to the host is gathered (``mm_jax.gather.to_host``), so
each process gets whole videos; the caller writes them from one process.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import json
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mm_jax import checkpoint, image_conditioning, parallel
from mm_jax import identity as id_lib
from mm_jax import schedulers as sch
from mm_jax.denoising import (ProgressFn, default_model_fn, denoise, denoise_step_fn,  # noqa: F401  (public here)
                              guidance_per_step, tqdm_progress)
from mm_jax.gather import to_host
from mm_jax.sample_settings import SampleSettings  # noqa: F401  (callers take it from here too)

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


def check_checkpoint(ckpt_dir: str | Path, needed=REQUIRED_COMPONENTS) -> None:
    ckpt_dir = Path(ckpt_dir)
    present = checkpoint.read_index(ckpt_dir)
    missing = [c for c in needed if c not in present or not (ckpt_dir / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"checkpoint {ckpt_dir} lacks component(s) {missing}; it has {present}. "
                                "Convert a full pipeline folder with --components all")


# -- text ------------------------------------------------------------------------------------

def prompt_embeddings(ckpt_dir: str | Path, prompts: list[str], *, max_length: int = 226, mesh=None,
                      dtype: str | None = None, on_host: bool = False, quantize: str | None = None) -> np.ndarray:
    """Load T5 from ``ckpt_dir``, embed ``prompts`` (``mm_jax.text.encode_prompts``) -> (B,
    max_length, d_model) host array (the whole batch on every process of a multi-process run),
    then free T5.

    ``on_host``: place and run T5 on the host CPU instead of ``mesh`` (T5-XXL is 9.5 GB in bf16;
    on a 16 GB chip this keeps the accelerator for the DiT; ``python -m mm_jax.plan`` says when).
    ``quantize``: T5's linear layers in that mode (``mm_jax.models.quantize.MODES``) or None.
    ``dtype``: T5's; None: ``default_dtype()`` (bfloat16 on accelerators, float32 on CPU)."""
    from mm_jax import text as text_lib
    from mm_jax.models import quantize as quantize_lib

    dtype = dtype or default_dtype()
    tokenizer = text_lib.load_tokenizer(Path(ckpt_dir) / "tokenizer")
    if on_host:  # this process's own CPU (jax.devices("cpu")[0] belongs to process 0)
        mesh = parallel.make_mesh(devices=[jax.local_devices(backend="cpu")[0]])
    encoder = checkpoint.load_component(ckpt_dir, "text_encoder", mesh=mesh, dtype=dtype, param_dtype=dtype)
    quantize_lib.quantize_model(encoder, quantize)
    with jax.set_mesh(mesh or parallel.make_mesh()), jax.profiler.TraceAnnotation("text_encoder"):  # a profile's span
        emb = to_host(text_lib.encode_prompts(encoder, tokenizer, prompts, max_length=max_length))
    del encoder
    gc.collect()
    return emb


@functools.lru_cache(maxsize=None)
def decode_fn():
    """The compiled VAE decode ``(vae, latents (1, f, h, w, C) float32) -> video (1, F, H, W, 3) in
    [-1, 1]`` (what the planner compiles as the ``vae_decode`` phase)."""
    from mm_jax.models import vae as vae_lib

    return jax.jit(lambda vae, z: vae_lib.decode_latents(vae, z))


# -- end to end ------------------------------------------------------------------------------

def initial_latents(settings: SampleSettings, channels: int, spatial: int, temporal: int,
                    latents: np.ndarray | None = None, dtype=jnp.float32) -> jax.Array:
    """The initial noise: ``latents`` (checked against the settings' shape) or drawn from the seed."""
    shape = settings.latent_shape(channels, spatial, temporal)
    if latents is not None:
        latents = np.asarray(latents)
        if tuple(latents.shape) != shape:
            raise ValueError(f"initial latents have shape {tuple(latents.shape)}; these settings need {shape} "
                             "(1, (frames-1)/4+1, height/8, width/8, latent channels)")
        return jnp.asarray(latents, dtype)
    return sch.init_latents(jax.random.key(settings.seed), shape, dtype)


@dataclasses.dataclass
class Request:
    """One video of a batch: its settings (prompt, negative prompt, seed; the shape fields must
    agree across a batch), an optional ``identity`` and optional initial ``latents``."""
    settings: SampleSettings
    identity: Optional[Any] = None
    latents: Optional[np.ndarray] = None


SHARED_FIELDS = ("frames", "height", "width", "steps", "guidance", "scheduler", "dynamic_cfg", "max_sequence_length")


def check_requests(ckpt_dir: str | Path, requests: list[Request]) -> None:
    """Every check of a batch that needs no model, so that a CLI can refuse bad input before any
    work: the checkpoint's components, the ``SHARED_FIELDS`` the requests must agree on, each
    request's settings against the checkpoint's VAE and DiT, and initial latents' shapes.
    Raises ``FileNotFoundError`` / ``ValueError`` naming what is wrong."""
    ckpt_dir = Path(ckpt_dir)
    check_checkpoint(ckpt_dir)
    if not requests:
        return
    first = requests[0].settings
    for r in requests[1:]:
        diff = [f for f in SHARED_FIELDS if getattr(r.settings, f) != getattr(first, f)]
        if diff:
            raise ValueError(f"videos of one batch must share {diff}: {[getattr(r.settings, f) for f in diff]} vs "
                             f"{[getattr(first, f) for f in diff]}")
    vae_cfg = checkpoint.load_config(ckpt_dir, "vae")
    dit_cfg = checkpoint.load_config(ckpt_dir, "transformer")
    if image_conditioning.kind(dit_cfg, vae_cfg) == "i2v":
        raise ValueError(f"checkpoint {ckpt_dir} is image-to-video (transformer in_channels {dit_cfg.in_channels} = 2 x "
                         "the VAE's latent channels): give the first frame (mm_jax.sample --image)")
    spatial, temporal = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    for r in requests:
        r.settings.validate(spatial, temporal, dit_cfg.patch_size)
        shape = r.settings.latent_shape(dit_cfg.in_channels, spatial, temporal)
        if r.latents is not None and tuple(np.shape(r.latents)) != shape:
            raise ValueError(f"initial latents have shape {tuple(np.shape(r.latents))}; these settings need {shape} "
                             "(1, (frames-1)/4+1, height/8, width/8, latent channels)")


def iter_videos(ckpt_dir: str | Path, requests: list[Request], *, mesh=None, dtype: str | None = None,
                progress: bool | ProgressFn = True, videos_per_batch: int = 1, text_embeddings: np.ndarray | None = None,
                model_fn: Callable = default_model_fn, transformer=None, vae=None, text_encoder_on_host: bool = False,
                vae_tiling: bool | None = None, attention_parallelism: str | None = None,
                decode_each_batch: bool = False, quantize: str | None = None):
    """Many videos with the models loaded once, yielded as each is decoded: ``(index into requests,
    frames (F, H, W, 3) float32 in [0, 1], final latents (1, f, h, w, C) float32)``.

    Order of work: T5 encodes every prompt (then is freed), the DiT (+ the adapter) denoises the
    videos ``videos_per_batch`` at a time (identity and plain videos in separate batches), the
    VAE decodes. Two residency orders:

    - ``decode_each_batch=False`` (one video, ``generate``): every batch is denoised, the DiT is
      released (when this call loaded it), then the VAE is placed and decodes each video. The DiT
      and the VAE are never resident together: the lowest peak memory. Nothing is yielded before
      the last batch is denoised.
    - ``decode_each_batch=True`` (``mm_jax.sample --prompts``): the VAE is placed beside the DiT
      and each batch is decoded as soon as it is denoised, so its videos can be written at once
      and only the current batch's frames are held (a failure at video k keeps the ones before).
      Peak memory: DiT + VAE + one decode (``python -m mm_jax.plan`` sizes each).

    Requests must share ``SHARED_FIELDS`` (they fix the compiled shapes; ``check_requests``).
    ``text_embeddings``: (2R or R, L, T) precomputed [negatives, positives] for all R requests.
    ``attention_parallelism``: "ulysses" / "ring" for a ``context`` mesh axis (None: the default).
    ``vae_tiling``: None decides by ``default_vae_tiling(mesh)``.
    ``dtype``: the compute and parameter dtype of T5, the DiT and the adapter (the VAE runs in
    float32); None: ``default_dtype()``, bfloat16 on accelerators and float32 on CPU ("float32" on
    a GPU needs ~22 GB for the 5B's weights alone and runs attention without cuDNN).
    ``quantize``: the DiT's and T5's linear layers in that mode ("int8", "fp8", "int8-weights":
    ``mm_jax.models.quantize``), attention in ``dtype``; a given ``transformer`` must already be
    quantized in that mode (``quantize.quantize_model``: it is changed in place).

    On several processes every process makes the same call (the models run over the global
    ``mesh``) and gets every video's frames and latents (gathered: ``mm_jax.gather``)."""
    from mm_jax.models import quantize as quantize_lib

    ckpt_dir = Path(ckpt_dir)
    if not requests:
        return
    dtype = dtype or default_dtype()
    quantize_lib.check(quantize)
    if transformer is not None and quantize_lib.quantized_mode(transformer) != quantize:
        raise ValueError(f"quantize={quantize!r} but the given transformer is quantized as "
                         f"{quantize_lib.quantized_mode(transformer)!r}: quantize it with quantize.quantize_model")
    check_requests(ckpt_dir, requests)
    first = requests[0].settings
    vae_cfg = checkpoint.load_config(ckpt_dir, "vae")
    dit_cfg = checkpoint.load_config(ckpt_dir, "transformer")
    spatial, temporal = vae_cfg.spatial_compression, vae_cfg.temporal_compression_ratio
    mesh = mesh or parallel.make_mesh()
    xs = [initial_latents(r.settings, dit_cfg.in_channels, spatial, temporal, r.latents) for r in requests]
    cfg_on = first.guidance > 1.0
    if text_embeddings is None:
        prompts = [r.settings.negative_prompt for r in requests] * cfg_on + [r.settings.prompt for r in requests]
        text_embeddings = prompt_embeddings(ckpt_dir, prompts, max_length=first.max_sequence_length, mesh=mesh,
                                            dtype=dtype, on_host=text_encoder_on_host, quantize=quantize)
    n = len(requests)
    neg = np.asarray(text_embeddings[:n]) if cfg_on else None
    pos = np.asarray(text_embeddings[-n:])
    owns_dit = transformer is None
    dit = transformer or checkpoint.load_component(ckpt_dir, "transformer", mesh=mesh, dtype=dtype, param_dtype=dtype,
                                                   attention_parallelism=attention_parallelism)
    if owns_dit:
        quantize_lib.quantize_model(dit, quantize)
    tiling = default_vae_tiling(mesh) if vae_tiling is None else vae_tiling

    def place_vae():
        return vae or checkpoint.load_component(ckpt_dir, "vae", mesh=mesh, use_tiling=tiling)

    def decoded(i, z, vae_module):
        with jax.set_mesh(mesh), jax.profiler.TraceAnnotation("vae_decode"):  # a profile's span (mm_jax.profiling)
            video = decode_fn()(vae_module, jnp.asarray(z, jnp.float32))
        return i, np.clip(to_host(video)[0].astype(np.float32) / 2 + 0.5, 0.0, 1.0), to_host(z).astype(np.float32)

    scheduler_cfg = json.loads((ckpt_dir / "scheduler" / "scheduler_config.json").read_text())
    plain = [i for i, r in enumerate(requests) if r.identity is None]
    with_id = [i for i, r in enumerate(requests) if r.identity is not None]
    chunks = [c[k:k + videos_per_batch] for c in (plain, with_id) for k in range(0, len(c), videos_per_batch)]
    latents_out: dict[int, jax.Array] = {}
    adapter = tokenizer = None
    if with_id:  # loaded once for every identity batch of the run
        from mm_jax import text as text_lib

        adapter = id_lib.load_adapter([requests[i].identity for i in with_id], dit.cfg, mesh=mesh, dtype=dtype)
        tokenizer = text_lib.load_tokenizer(ckpt_dir / "tokenizer")
    vae_now = place_vae() if decode_each_batch else None
    close = None
    if progress is True:
        progress, close = tqdm_progress(first.steps * len(chunks), desc=f"denoising {n} video(s)")
    try:
        for c, chunk in enumerate(chunks):
            text = jnp.asarray(np.concatenate(([neg[chunk]] if cfg_on else []) + [pos[chunk]]), dtype)
            fn, extras = model_fn, None
            if requests[chunk[0]].identity is not None:
                text, extras, fn = id_lib.prepare([requests[i].identity for i in chunk], adapter, tokenizer, text,
                                                  [requests[i].settings.prompt for i in chunk], dtype, cfg_on,
                                                  first.max_sequence_length)
            done = (lambda k, _t, c=c: progress(c * first.steps + k, first.steps * len(chunks))) if progress else None
            with jax.set_mesh(mesh):
                z = denoise(dit, jnp.concatenate([xs[i] for i in chunk]).astype(dtype), text, first, scheduler_cfg,
                            progress=done, model_fn=fn, extras=extras, seeds=[requests[i].settings.seed for i in chunk])
            del extras
            for j, i in enumerate(chunk):
                if decode_each_batch:
                    yield decoded(i, z[j:j + 1], vae_now)
                else:
                    latents_out[i] = z[j:j + 1]
            del z
    finally:
        if close is not None:
            close()
    del dit, adapter
    if decode_each_batch:
        return
    if owns_dit:  # release the DiT before the VAE is placed
        gc.collect()
    vae_now = place_vae()
    for i in sorted(latents_out):
        yield decoded(i, latents_out.pop(i), vae_now)


def generate_batch(ckpt_dir: str | Path, requests: list[Request], *, mesh=None, dtype: str | None = None,
                   progress: bool | ProgressFn = True, videos_per_batch: int = 1, text_embeddings: np.ndarray | None = None,
                   model_fn: Callable = default_model_fn, transformer=None, vae=None, text_encoder_on_host: bool = False,
                   vae_tiling: bool | None = None, attention_parallelism: str | None = None,
                   return_latents: bool = False, quantize: str | None = None):
    """``iter_videos`` collected (the DiT released before the VAE is placed): frames (F, H, W, 3)
    float32 in [0, 1] per request, in request order; ``return_latents``: also each video's final
    latents (1, f, h, w, C) float32, as ``(frames, latents)``. Every video is held in host memory:
    for many videos, iterate ``iter_videos(..., decode_each_batch=True)`` and write each."""
    out = dict((i, (f, z)) for i, f, z in iter_videos(
        ckpt_dir, requests, mesh=mesh, dtype=dtype, progress=progress, videos_per_batch=videos_per_batch,
        text_embeddings=text_embeddings, model_fn=model_fn, transformer=transformer, vae=vae,
        text_encoder_on_host=text_encoder_on_host, vae_tiling=vae_tiling, attention_parallelism=attention_parallelism,
        quantize=quantize))
    frames = [out[i][0] for i in range(len(requests))]
    if return_latents:
        return frames, [out[i][1] for i in range(len(requests))]
    return frames


def attention_scheme(ckpt_dir: str | Path, mesh, requested: str | None = None) -> str | None:
    """How the DiT's self-attention joins the sequence on ``mesh``: "ulysses", "ring", or None
    without a context axis: ``attention_parallel.scheme``, the function the attention itself runs by
    (the heads per tensor shard decide, all of them where the tensor axis does not divide them)."""
    from mm_jax.models import attention_parallel

    heads = checkpoint.load_config(ckpt_dir, "transformer").num_attention_heads
    return attention_parallel.scheme(heads, mesh, requested)


def default_dtype() -> str:
    """The compute dtype when none is given: bfloat16 on accelerators (the 5B's weights alone are
    22 GB in float32, beyond a 16 GB chip and most of an 80 GB one once activations are added),
    float32 on CPU (exact; bfloat16 matmuls are slow there)."""
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def default_vae_tiling(mesh) -> bool:
    """Tiled decode by default on accelerators (memory: one tile's activations at a time) and on
    meshes of several devices (the tiles are decoded in parallel over all of them); off on one CPU
    device, where it would only add the tiles' overlap work."""
    return jax.default_backend() != "cpu" or (mesh is not None and mesh.size > 1)


def generate(ckpt_dir: str | Path, settings: SampleSettings, *, latents: np.ndarray | None = None, mesh=None,
             dtype: str | None = None, progress: bool | ProgressFn = True, text_embeddings: np.ndarray | None = None,
             model_fn: Callable = default_model_fn, transformer=None, vae=None,
             identity: Optional[Any] = None, text_encoder_on_host: bool = False,
             vae_tiling: bool | None = None, quantize: str | None = None) -> np.ndarray:
    """Text (+ identity) to video: returns frames (F, H, W, 3) float32 in [0, 1]. On several
    processes every process makes the same call and gets the whole video.

    ``identity``: an ``mm_jax.identity.Identity`` (reference embeddings + adapter folder); None is
    plain CogVideoX text-to-video. ``progress``: True for a tqdm bar, False for none, or a
    ``ProgressFn``. ``dtype``: None is ``default_dtype()`` (bfloat16 on accelerators, float32 on
    CPU; ``iter_videos``). ``text_encoder_on_host``: run T5 on the host CPU. ``vae_tiling``: decode in
    overlapping spatial tiles (diffusers ``enable_tiling``), one tile's activations at a time;
    None: ``default_vae_tiling``. ``quantize``: "int8" (TPU, A100/A800), "fp8" (H100) or
    "int8-weights" (memory only): the DiT's and T5's linear layers quantized (``iter_videos``)."""
    return generate_batch(ckpt_dir, [Request(settings, identity, latents)], mesh=mesh, dtype=dtype, progress=progress,
                          text_embeddings=text_embeddings, model_fn=model_fn, transformer=transformer, vae=vae,
                          text_encoder_on_host=text_encoder_on_host, vae_tiling=vae_tiling, quantize=quantize)[0]


def sample_identity(ckpt_dir: str | Path, settings: SampleSettings, reference, face_models: str | Path,
                    adapter_dir: str | Path, *, clip_dir: str | Path | None = None, mesh=None,
                    dtype: str | None = None, progress: bool | ProgressFn = True, text_encoder_on_host: bool = False,
                    vae_tiling: bool | None = None, quantize: str | None = None) -> np.ndarray:
    """One call from a reference photo to frames (F, H, W, 3) in [0, 1] (what the notebook uses).

    ``reference``: image path or RGB uint8 array. ``clip_dir``: the checkpoint folder with the
    ``image_encoder`` (default: the adapter's folder, else the backbone's). ``dtype`` defaults to
    ``default_dtype()``, as ``mm_jax.sample``; ``vae_tiling`` follows
    ``default_vae_tiling`` (on for accelerators and meshes of several devices); ``quantize`` as ``generate``.
    """
    mesh = mesh or parallel.make_mesh(parallel.sampling_mesh_shape(len(jax.devices()), parallel.device_memory_bytes(),
                                                                   rows=2 if settings.guidance > 1 else 1))
    dtype = dtype or default_dtype()
    clip_dir = clip_dir or id_lib.component_dir("image_encoder", adapter_dir, ckpt_dir)
    ident = id_lib.compute(reference, face_models, clip_dir, adapter_dir, mesh=mesh)
    return generate(ckpt_dir, settings, mesh=mesh, dtype=dtype, progress=progress, identity=ident,
                    text_encoder_on_host=text_encoder_on_host, vae_tiling=vae_tiling, quantize=quantize)
