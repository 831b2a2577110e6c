"""ConsisID's half of ``python -m mm_jax.sample --model consisid`` (the flags are ``mm_jax.sample``'s).

    python -m mm_jax.sample --model consisid --checkpoint DIR --ref face.jpg --face-models FACEDIR \\
        --prompt "..." --out v.mp4 [--save-id id.npz]
    python -m mm_jax.sample --model consisid --checkpoint DIR --id id.npz --prompt "..." --out v.mp4
    python -m mm_jax.sample --model consisid --checkpoint DIR --face-models FACEDIR --prompts lines.jsonl

DIR is what ``from_torch.py --components all`` writes from a diffusers ``ConsisIDPipeline`` folder;
FACEDIR holds ConsisID's face models as published (``mm_jax.consisid_faces``). ``--id`` reads an
identity saved with ``--save-id`` (``mm_jax.consisid_identity``: the pipeline's ``image``,
``id_cond``, ``id_vit_hidden``). ``--latents`` and ``--image-noise`` give the initial noise and
the face crop's posterior draw (default: both drawn from ``--seed``).

The same rules as the other sampling modes: every input is checked first (the checkpoint is
ConsisID and complete, the sizes fit its learned positional table, the identity fits its
transformer, the photo has a face) and bad input exits 2 with nothing written; a crash once the
work has started keeps its traceback and exits 1. ``--prompts`` lines are ``{"prompt", "out",
"seed"?, "negative_prompt"?, "ref" | "id"}``; a bad line is reported with its number and skipped
(exit 1 when any was); the models load once and the videos are denoised ``--videos-per-batch`` at a
time (``mm_jax.consisid_pipeline.iter_videos``), each written as soon as it is decoded.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from mm_jax.sample_inputs import jsonl_lines, line_settings, load_npy, sampling_mesh



@dataclasses.dataclass
class _Item:
    """One checked video: its settings, output, optional noise arrays, and its identity: an
    ``ConsisIDIdentity`` (``--id``) or an analyzed photo (``--ref``), embedded at work time."""
    settings: object
    out: str
    ident: object = None      # ConsisIDIdentity, or None until ``face`` is embedded
    face: object = None       # (prepared face, photo path) from the face encoder's analyze
    latents: object = None
    noise: object = None
    line: int | None = None


class _Faces:
    """The face encoder of a run (``mm_jax.consisid_faces.FaceEncoder``), loaded at the first photo."""

    def __init__(self, folder, mesh, dtype):
        self.folder, self.mesh, self.dtype, self.encoder = folder, mesh, dtype, None

    def get(self):
        if self.encoder is None:
            from mm_jax.consisid_faces import FaceEncoder

            self.encoder = FaceEncoder(self.folder, mesh=self.mesh, dtype=self.dtype)
        return self.encoder


def _identity(dit_cfg, faces: _Faces, *, ref=None, id_file=None):
    """An identity's input checks -> (ConsisIDIdentity, None) for ``id_file``, (None, (prepared, ref))
    for a photo (its face detected and aligned here, on the host)."""
    from mm_jax import consisid_identity

    if id_file:
        ident = consisid_identity.load(id_file)
        consisid_identity.check_fits(ident, dit_cfg)
        return ident, None
    if not Path(ref).is_file():
        raise FileNotFoundError(f"reference {ref} not found")
    encoder = faces.get()
    prepared = encoder.analyze(ref)
    eva = encoder.eva.cfg  # the widths the identity will have, checked before the work
    pairs = [("id_cond width (antelopev2 + EVA-CLIP embed_dim)", prepared.antelope.shape[0] + eva.embed_dim,
              "LFE_id_dim", dit_cfg.LFE_id_dim),
             ("EVA-CLIP hidden states", len(eva.hidden_state_blocks), "LFE_num_scale", dit_cfg.LFE_num_scale),
             ("EVA-CLIP width", eva.width, "LFE_vit_dim", dit_cfg.LFE_vit_dim)]
    for what, have, field, want in pairs:
        if have != want:
            raise ValueError(f"--face-models {faces.folder}: the {what} is {have}; the ConsisID transformer's "
                             f"{field} is {want}")
    return None, (prepared, str(ref))


def _check(args):
    """Every input check that needs no model (and the photos' faces) -> (items, failed line numbers,
    mesh, dtype, attention scheme, faces); ``ValueError`` / ``FileNotFoundError`` naming what is wrong."""
    from mm_jax import checkpoint, consisid_pipeline, distributed, pipeline, video_io
    from mm_jax.models import attention_parallel, quantize

    if args.prompts:
        given = [f for f in ("prompt", "out", "ref", "id", "latents", "image_noise", "save_latents", "save_id")
                 if getattr(args, f)]
        if given:
            raise ValueError("--prompts takes the prompts, outputs and identities from its lines; do not also give "
                             + ", ".join("--" + f.replace("_", "-") for f in given))
    else:
        for flag in ("prompt", "out"):
            if not getattr(args, flag):
                raise ValueError(f"--{flag} is required (or --prompts FILE)")
        if not args.ref and not args.id:
            raise ValueError("--model consisid needs an identity: --ref PHOTO (with --face-models DIR) or --id FILE.npz")
    if args.adapter or args.image:
        raise ValueError("--model consisid takes its identity from --ref/--id: --adapter (Magic Mirror) and --image "
                         "(image to video) do not combine with it")
    if args.ref and args.id:
        raise ValueError("give either --ref or --id, not both")
    if args.ref and not args.face_models:
        raise ValueError("--ref needs --face-models DIR (ConsisID's face models as published)")
    if args.face_models:
        from mm_jax.consisid_faces import check_folder

        check_folder(args.face_models)  # every published file there, named when missing
    if args.save_latents and not args.save_latents.endswith(".npy"):
        raise ValueError(f"--save-latents {args.save_latents}: must be an .npy path")
    if args.videos_per_batch is not None and args.videos_per_batch < 1:
        raise ValueError(f"--videos-per-batch {args.videos_per_batch}: must be >= 1")
    if args.fps < 1:
        raise ValueError(f"--fps {args.fps}: must be >= 1")
    if args.out:
        video_io.output_kind(args.out)
    settings = pipeline.SampleSettings(
        prompt=args.prompt or "(from --prompts)", negative_prompt=args.negative_prompt, frames=args.frames,
        height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
        dynamic_cfg=args.dynamic_cfg, seed=args.seed)
    settings.validate()
    quantize.check(args.quantize, "--quantize")
    latents = load_npy(args.latents, "--latents") if args.latents else None
    noise = load_npy(args.image_noise, "--image-noise") if args.image_noise else None
    consisid_pipeline.check(args.checkpoint, settings, latents=latents, noise=noise)
    dit_cfg = checkpoint.load_config(args.checkpoint, consisid_pipeline.TRANSFORMER)
    mesh = sampling_mesh(args.mesh, args.mesh_dcn, 2 if args.prompts or args.guidance > 1 else 1)
    dtype = args.dtype or pipeline.default_dtype()
    scheme = attention_parallel.scheme(dit_cfg.num_attention_heads, mesh, args.attention_parallelism)
    faces = _Faces(args.face_models, mesh, dtype)
    if not args.prompts:
        ident, face = _identity(dit_cfg, faces, ref=args.ref, id_file=args.id)
        return [_Item(settings, args.out, ident, face, latents, noise)], [], mesh, dtype, scheme, faces
    items, failed = [], []
    for n, d in jsonl_lines(args.prompts):
        try:
            if isinstance(d, str):
                raise ValueError(d)
            s = line_settings(d, settings)
            if bool(d.get("ref")) == bool(d.get("id")):
                raise ValueError("needs an identity: either 'ref' (a photo) or 'id' (an .npz), not both")
            if d.get("ref") and not args.face_models:
                raise ValueError("'ref' needs --face-models DIR")
            ident, face = _identity(dit_cfg, faces, ref=d.get("ref"), id_file=d.get("id"))
        except (ValueError, FileNotFoundError) as e:
            failed.append(n)
            if distributed.is_main():
                print(f"error: {args.prompts}:{n}: {e}; line skipped", file=sys.stderr)
            continue
        items.append(_Item(s, d["out"], ident, face, line=n))
    if not items:
        raise ValueError(f"{args.prompts}: no usable line" + (f" (line(s) {failed} refused above)" if failed else ""))
    return items, failed, mesh, dtype, scheme, faces


def _embed(items: list[_Item], faces: _Faces, dit_cfg) -> None:
    """The work half of the identities: EVA-CLIP (and the ID embedding) over each analyzed photo;
    the face encoder is freed afterwards, before the DiT is placed."""
    from mm_jax import consisid_identity

    for it in items:
        if it.ident is None:
            prepared, ref = it.face
            it.ident = faces.get().embed(prepared)
            it.ident.source = it.ident.source or ref
            consisid_identity.check_fits(it.ident, dit_cfg)
    faces.encoder = None


def run(args) -> int:
    """``mm_jax.sample``'s ``main`` for ``--model consisid`` (after ``distributed.initialize``)."""
    from mm_jax import checkpoint, compile_cache, consisid_identity, consisid_pipeline, distributed, exit_codes
    from mm_jax import parallel, profiling, video_io

    if args.info:
        dit_cfg = checkpoint.load_config(args.checkpoint, consisid_pipeline.TRANSFORMER)
        shapes = checkpoint.param_shapes(checkpoint.abstract_model(consisid_pipeline.TRANSFORMER, dit_cfg))
        print(f"consisid_transformer: {sum(int(np.prod(s)) for s, _ in shapes.values()):,} params "
              f"({dit_cfg.num_layers} blocks, width {dit_cfg.inner_dim}, cross-attention after blocks "
              f"{list(dit_cfg.cross_attn_layers)})")
        return exit_codes.OK
    try:
        compile_cache.enable(compile_cache.resolve(args.compile_cache))
        profiling.check_dir(args.profile)
        items, failed, mesh, dtype, scheme, faces = _check(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    # the work: from here on an error is a crash (its traceback, exit 1)
    main_process = distributed.is_main()
    dit_cfg = checkpoint.load_config(args.checkpoint, consisid_pipeline.TRANSFORMER)
    _embed(items, faces, dit_cfg)
    if args.save_id and main_process:
        consisid_identity.save(args.save_id, items[0].ident)
        print(f"saved the identity to {args.save_id}", file=sys.stderr)
    base = dict(model="consisid", checkpoint=str(args.checkpoint), dtype=dtype, quantize=args.quantize,
                mesh=dict(mesh.shape), attention=scheme, latents=args.latents, image_noise=args.image_noise)
    per_batch = args.videos_per_batch or (
        max(1, parallel.data_replicas(mesh) // (2 if args.guidance > 1 else 1)) if args.prompts else 1)
    if main_process:
        print(f"settings: {json.dumps(dict(dataclasses.asdict(items[0].settings), **base))}; {len(items)} video(s), "
              f"{len(failed)} line(s) skipped, {per_batch} per batch", file=sys.stderr)
    t0 = time.time()
    videos = [consisid_pipeline.Video(it.settings, it.ident, it.latents, it.noise) for it in items]
    with profiling.trace(args.profile):
        for i, frames, final in consisid_pipeline.iter_videos(
                args.checkpoint, videos, mesh=mesh, dtype=dtype, progress=not args.quiet, videos_per_batch=per_batch,
                text_encoder_on_host=args.offload_text_encoder, vae_tiling=args.vae_tiling, quantize=args.quantize,
                attention_parallelism=args.attention_parallelism):
            it = items[i]
            if not main_process:
                continue
            if args.save_latents:
                np.save(args.save_latents, final)
            meta = dict(dataclasses.asdict(it.settings), **base, reference=it.ident.source,
                        identity="ref" if it.face else "id", line=it.line, seconds=round(time.time() - t0, 2),
                        compile=compile_cache.STATS.as_dict())
            video_io.write_frames(it.out, frames, fps=args.fps, metadata=meta)
            print(f"wrote {it.out}" + (f" (line {it.line})" if it.line else "") + f" in {meta['seconds']} s",
                  file=sys.stderr)
    if failed:
        if main_process:
            print(f"{len(failed)} line(s) failed: {failed}", file=sys.stderr)
        return exit_codes.CRASH  # some lines were skipped (named above)
    return exit_codes.OK
