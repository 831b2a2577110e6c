"""Sample a video: ``python -m mm_jax.sample --checkpoint DIR --prompt "..." --out video.mp4``.

With an identity (Magic Mirror): ``--adapter DIR --ref face.jpg --face-models DIR`` (or ``--id
id.npz`` saved earlier with ``--save-id``); the prompt must name the subject with a class word.

Image to video (a CogVideoX-5B-I2V checkpoint): ``--image first_frame.png`` (``mm_jax.image_to_video``);
``--image-noise`` gives the VAE posterior sample's draw as ``--latents`` gives the initial noise.

ConsisID (its released weights): ``--model consisid --ref face.jpg --face-models DIR`` or ``--id id.npz``
(``mm_jax.sample_consisid``).

Prints the settings and the seed, shows a progress bar over denoising steps, and writes the
frames (.mp4, .gif, .npy of floats in [0, 1], or a folder of PNGs) with a ``<out>.json`` sidecar
of the settings. Bad input (frame count, sizes, a checkpoint missing a component, initial
latents of the wrong shape, a reference without a face, a prompt without a class word) is refused
before any work with exit code 2 and nothing written; an error once the work has started keeps
its traceback and exits 1 (``mm_jax.exit_codes``).

Many videos: ``--prompts FILE.jsonl`` (one ``{"prompt", "out", "seed"?, "negative_prompt"?,
"ref"? | "id"?}`` per line). Every line is checked first; a bad line (unreadable, missing file, no
face, no class word) is reported with its number and skipped, and the exit code is 1 when any
line failed. Models load once, T5 encodes every prompt before the DiT is placed, videos are
denoised ``--videos-per-batch`` at a time, and each batch is decoded and written as soon as it is
denoised (the VAE stays beside the DiT; only the current batch's frames are held), so a failure
at video k keeps the videos written before it.

Several processes (``python -m mm_jax.launch``, a TPU pod, SLURM): every process runs the same
work over the global mesh and gets the whole videos; process 0 alone writes the files and prints
the settings and "wrote" lines.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from mm_jax.sample_inputs import jsonl_lines as _lines, line_settings, load_npy as _npy, sampling_mesh


def build_parser() -> argparse.ArgumentParser:
    from mm_jax import frame_counts

    ap = argparse.ArgumentParser(prog="python -m mm_jax.sample", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="mm_jax checkpoint folder (from_torch.py --components all)")
    ap.add_argument("--model", choices=("cogvideox", "consisid"), default="cogvideox",
                    help="consisid: a ConsisID checkpoint with --ref/--id (mm_jax.sample_consisid)")
    ap.add_argument("--prompt", help="what happens; with --ref it must contain a class word (man, woman, ...)")
    ap.add_argument("--out", help="output: .mp4, .gif, .npy (float frames (F,H,W,3)) or a folder for PNGs")
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--frames", type=int, default=49,
                    help=f"pixel frames: {frame_counts.describe()} (the counts the VAE decodes exactly)")
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=6.0, help="CFG scale (<= 1 disables CFG)")
    ap.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim")
    ap.add_argument("--dynamic-cfg", action="store_true", help="the reference's cosine guidance schedule")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latents", help="initial noise .npy, (1, (F-1)/4+1, H/8, W/8, C)")
    ap.add_argument("--mesh", default=None,
                    help="e.g. data=2,context=4 (default: the CFG pair on data=2, the sequence over context)")
    ap.add_argument("--mesh-dcn", default=None,
                    help="multi-slice TPU pods: the axes across slices, e.g. data=2 (--mesh is then one slice's mesh)")
    ap.add_argument("--compile-cache", default=None, metavar="DIR",
                    help="persistent compilation cache: a later run reuses the compiled programs (default: "
                         "$MM_JAX_COMPILE_CACHE or ~/.cache/mm_jax/xla; 'off' disables)")
    ap.add_argument("--attention-parallelism", choices=("ulysses", "ring"), default=None,
                    help="how a context axis > 1 joins the sequence (default: ulysses when the heads divide, else ring)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="compute/param dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--quantize", default=None, metavar="MODE",
                    help="the DiT's and T5's linear layers quantized: int8 (TPU, A100/A800), fp8 (H100: also the "
                         "DiT's self-attention on cuDNN's fp8 kernel), fp8-linears (fp8 "
                         "linear layers, attention in --dtype), or int8-weights (weights only: memory); other "
                         "attention stays in --dtype (TPU: splash, CPU: no fp8 attention; a warning says so) "
                         "(default: none)")
    ap.add_argument("--fps", type=int, default=8)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--profile", metavar="DIR", help="write a profiler trace of the generation to DIR/process_K "
                                                     "(mm_jax.profiling)")
    ap.add_argument("--offload-text-encoder", action="store_true",
                    help="run T5 on the host CPU, not the accelerator (python -m mm_jax.plan says when: its text_encoder phase does not fit)")
    ap.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                    help="decode in spatial tiles (less memory; diffusers enable_tiling), spread over the mesh's "
                         "devices; default: on for accelerators and for several devices, off on one CPU device")
    ap.add_argument("--save-latents", help="also write the final latents (1, f, h, w, C) to this .npy (before decode)")
    idg = ap.add_argument_group("identity (Magic Mirror)")
    idg.add_argument("--adapter", help="mm_jax checkpoint folder with the 'adapter' (and optionally 'image_encoder') component")
    idg.add_argument("--ref", help="reference photo of the person")
    idg.add_argument("--face-models", help="local insightface model pack folder (SCRFD detector + ArcFace); "
                                           "with --model consisid: ConsisID's face_encoder/ folder")
    idg.add_argument("--save-id", help="write the reference's embeddings to this .npz for reuse")
    idg.add_argument("--id", help="reuse embeddings saved with --save-id instead of --ref")
    ig = ap.add_argument_group("image to video (CogVideoX-5B-I2V)")
    ig.add_argument("--image", help="the first frame (an image-to-video checkpoint); resized (Lanczos) to --width x --height")
    ig.add_argument("--image-noise", help="the VAE posterior sample's standard-normal draw for --image, .npy "
                                          "(1, 1, H/8, W/8, C) (default: drawn from --seed)")
    bg = ap.add_argument_group("many videos")
    bg.add_argument("--prompts", help="JSONL file, one video per line: {prompt, out, seed?, negative_prompt?, ref? | id?}; "
                                     "models load once; a bad line is reported and skipped (exit 1 when any was)")
    bg.add_argument("--videos-per-batch", type=int, default=None,
                    help="videos denoised together (default: what the data axis holds beyond the CFG pair)")
    ap.add_argument("--info", action="store_true", help="print model and adapter parameter counts and exit")
    return ap


def _info(args) -> int:
    from mm_jax import checkpoint
    from mm_jax.models.id_adapter import AdapterConfig, count_params

    dit_cfg = checkpoint.load_config(args.checkpoint, "transformer")
    dit_n = sum(int(np.prod(s)) for s, _ in checkpoint.param_shapes(checkpoint.abstract_model("transformer", dit_cfg)).values())
    ad_cfg = (checkpoint.load_config(args.adapter, "adapter") if args.adapter else AdapterConfig.for_dit(dit_cfg))
    n = count_params(ad_cfg)
    print(f"transformer: {dit_n:,} params ({dit_cfg.num_layers} blocks, width {dit_cfg.inner_dim})")
    print(f"adapter ({'from ' + args.adapter if args.adapter else 'default config for this DiT'}): {n:,} params "
          f"(+{100 * n / dit_n:.1f}%), in blocks {list(ad_cfg.adapter_layers)}")
    return 0


def _check_identity(args, adapter_cfg, dit_cfg, tokenizer, prompt: str, max_length: int, *, ref=None, id_file=None,
                    embedder=None):
    """An identity's input checks, before any model is placed: the prompt's class word, the
    adapter against the backbone and the CLIP width, the --id file, and the reference's face
    (detected here, on the host) -> ("id", Identity) or ("face", (face, ref))."""
    from mm_jax import identity

    identity.class_index(tokenizer, prompt, adapter_cfg, max_length)
    if id_file:
        ident = identity.load(id_file, args.adapter)
        identity.check_fits(adapter_cfg, dit_cfg, ident.clip_hidden.shape[-1])
        return "id", ident
    if not Path(ref).is_file():
        raise FileNotFoundError(f"reference {ref} not found")
    identity.check_fits(adapter_cfg, dit_cfg, embedder.clip_width)
    return "face", (embedder.analyze(ref), str(ref))


class _Faces:
    """The face models (and, lazily, the CLIP tower) of a run: loaded at the first reference."""

    def __init__(self, args, mesh):
        self.args, self.mesh, self.embedder = args, mesh, None

    def get(self):
        from mm_jax import identity

        if self.embedder is None:
            clip_dir = identity.component_dir("image_encoder", self.args.adapter, self.args.checkpoint)
            self.embedder = identity.Embedder(self.args.face_models, clip_dir, self.args.adapter, mesh=self.mesh)
        return self.embedder


def _identities(checked: list, faces: "_Faces"):
    """The work half of the identities: the CLIP tower over each analyzed face (every process runs
    it on the global mesh); the tower is freed afterwards, before the DiT is placed."""
    out = [(ident if kind == "id" else faces.embedder.embed(*ident)) if kind else None for kind, ident in checked]
    faces.embedder = None
    return out


def _check_lines(args, base, mesh):
    """``--prompts``' input checks, before any work: each line's fields, output, seed and identity
    (class word, files, the reference's face). A bad line is reported by number and skipped ->
    (good lines as (number, settings, out, checked identity), failed numbers, the face models)."""
    from mm_jax import checkpoint, distributed, identity, text

    failed, lines = [], []  # lines: (line number, settings, out, (kind, identity-or-face) or (None, None))
    main_process = distributed.is_main()

    def fail(n, msg):
        failed.append(n)
        if main_process:
            print(f"error: {args.prompts}:{n}: {msg}; line skipped", file=sys.stderr)

    adapter_cfg = dit_cfg = tokenizer = None
    if args.adapter:  # checked once for every identity line
        adapter_cfg = checkpoint.load_config(args.adapter, "adapter")
        dit_cfg = checkpoint.load_config(args.checkpoint, "transformer")
        tokenizer = text.load_tokenizer(Path(args.checkpoint) / "tokenizer")
        identity.check_fits(adapter_cfg, dit_cfg)
    faces = _Faces(args, mesh)
    for n, d in _lines(args.prompts):
        if isinstance(d, str):
            fail(n, d)
            continue
        try:
            settings = line_settings(d, base)
            checked = (None, None)
            if d.get("ref") or d.get("id"):
                if not args.adapter:
                    raise ValueError("'ref'/'id' need --adapter DIR")
                if d.get("ref") and d.get("id"):
                    raise ValueError("give either 'ref' or 'id', not both")
                if d.get("ref") and not args.face_models:
                    raise ValueError("'ref' needs --face-models DIR")
                checked = _check_identity(args, adapter_cfg, dit_cfg, tokenizer, settings.prompt,
                                          settings.max_sequence_length, ref=d.get("ref"), id_file=d.get("id"),
                                          embedder=faces.get() if d.get("ref") else None)
        except (ValueError, FileNotFoundError) as e:
            fail(n, e)
            continue
        lines.append((n, settings, d["out"], checked))
    if not lines:
        raise ValueError(f"{args.prompts}: no usable line" + (f" (line(s) {failed} refused above)" if failed else ""))
    return lines, failed, faces


def _many(args, lines, failed, faces, base, mesh, dtype) -> int:
    """``--prompts``' work, after ``_check_lines``: every good line becomes a video, written (by
    process 0) as soon as its batch is decoded; an error here propagates, the videos written stay."""
    from mm_jax import compile_cache, distributed, exit_codes, parallel, pipeline, video_io

    main_process = distributed.is_main()
    per_batch = args.videos_per_batch or max(1, parallel.data_replicas(mesh) // (2 if base.guidance > 1 else 1))
    if main_process:
        print(f"{len(lines)} video(s), {len(failed)} line(s) skipped; mesh {dict(mesh.shape)}, {per_batch} per batch",
              file=sys.stderr)
    t0 = time.time()
    idents = _identities([c for *_, c in lines], faces)
    requests = [pipeline.Request(settings, ident) for (_, settings, _, _), ident in zip(lines, idents)]
    videos = pipeline.iter_videos(args.checkpoint, requests, mesh=mesh, dtype=dtype, progress=not args.quiet,
                                  videos_per_batch=per_batch, text_encoder_on_host=args.offload_text_encoder,
                                  vae_tiling=args.vae_tiling, attention_parallelism=args.attention_parallelism,
                                  decode_each_batch=True, quantize=args.quantize)
    for i, frames, _ in videos:
        n, r, out = lines[i][0], requests[i], lines[i][2]
        if main_process:
            meta = dict(dataclasses.asdict(r.settings), checkpoint=str(args.checkpoint), dtype=dtype,
                        quantize=args.quantize, mesh=dict(mesh.shape), adapter=args.adapter,
                        reference=r.identity.source if r.identity is not None else None, line=n,
                        seconds=round(time.time() - t0, 2), compile=compile_cache.STATS.as_dict())
            video_io.write_frames(out, frames, fps=args.fps, metadata=meta)
            print(f"wrote {out} (line {n})", file=sys.stderr)
        del frames
    if main_process:
        print(compile_cache.STATS.line(), file=sys.stderr)
    if failed:
        if main_process:
            print(f"{len(failed)} line(s) failed: {failed}", file=sys.stderr)
        return exit_codes.CRASH  # some lines were skipped (named above)
    return exit_codes.OK


def _check(args):
    """Every input check that needs no model: flags, settings against the checkpoint, initial
    latents, the mesh, identity files and the reference's face. Raises ``ValueError`` /
    ``FileNotFoundError`` naming what is wrong; places nothing on the devices, writes nothing."""
    from mm_jax import consisid_pipeline, pipeline, video_io

    if consisid_pipeline.is_consisid(args.checkpoint):
        raise ValueError(f"checkpoint {args.checkpoint} is ConsisID ({consisid_pipeline.TRANSFORMER}): sample it with "
                         "--model consisid and --ref/--id")
    for flag in ("prompt", "out"):
        if not getattr(args, flag) and not args.prompts:
            raise ValueError(f"--{flag} is required (or --prompts FILE)")
    if args.prompts and (args.prompt or args.out or args.ref or args.id or args.latents or args.save_latents):
        raise ValueError("--prompts takes the prompts, outputs and references from its lines; do not also give "
                         "--prompt/--out/--ref/--id/--latents/--save-latents")
    if args.image and (args.prompts or args.adapter or args.ref or args.id):
        raise ValueError("--image (image to video) takes one --prompt; it does not combine with "
                         "--prompts/--adapter/--ref/--id")
    if args.image_noise and not args.image:
        raise ValueError("--image-noise needs --image")
    if args.save_latents and not args.save_latents.endswith(".npy"):
        raise ValueError(f"--save-latents {args.save_latents}: must be an .npy path")
    if args.videos_per_batch is not None and args.videos_per_batch < 1:
        raise ValueError(f"--videos-per-batch {args.videos_per_batch}: must be >= 1")
    if (args.ref or args.id) and not args.adapter:
        raise ValueError("--ref / --id need --adapter DIR")
    if args.ref and not args.face_models:
        raise ValueError("--ref needs --face-models DIR (a local insightface model pack)")
    if args.ref and args.id:
        raise ValueError("give either --ref or --id, not both")
    if args.out:
        video_io.output_kind(args.out)
    if args.fps < 1:
        raise ValueError(f"--fps {args.fps}: must be >= 1")
    settings = pipeline.SampleSettings(
        prompt=args.prompt or "(from --prompts)", negative_prompt=args.negative_prompt, frames=args.frames,
        height=args.height, width=args.width, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
        dynamic_cfg=args.dynamic_cfg, seed=args.seed)
    settings.validate()
    from mm_jax.models import quantize

    quantize.check(args.quantize, "--quantize")
    pipeline.check_checkpoint(args.checkpoint)
    latents = _npy(args.latents, "--latents") if args.latents else None
    request = pipeline.Request(settings, None, latents)
    image = None
    if args.image:  # image to video: the checkpoint must be one, the image readable
        from mm_jax import image_to_video

        noise = _npy(args.image_noise, "--image-noise") if args.image_noise else None
        image = image_to_video.check(args.checkpoint, settings, args.image, latents=latents, noise=noise)
    else:
        pipeline.check_requests(args.checkpoint, [request])  # against the checkpoint's VAE and DiT
    rows = 2 if args.prompts or args.guidance > 1 else 1  # the DiT batch of one call: a CFG pair, or videos
    mesh = sampling_mesh(args.mesh, args.mesh_dcn, rows)
    dtype = args.dtype or pipeline.default_dtype()
    scheme = pipeline.attention_scheme(args.checkpoint, mesh, args.attention_parallelism)
    checked, faces = (None, None), None
    if (args.ref or args.id) and not args.prompts:
        from mm_jax import checkpoint, text

        faces = _Faces(args, mesh)
        checked = _check_identity(args, checkpoint.load_config(args.adapter, "adapter"),
                                  checkpoint.load_config(args.checkpoint, "transformer"),
                                  text.load_tokenizer(Path(args.checkpoint) / "tokenizer"), settings.prompt,
                                  settings.max_sequence_length, ref=args.ref, id_file=args.id,
                                  embedder=faces.get() if args.ref else None)
    return request, mesh, dtype, scheme, checked, faces, image


def main(argv=None) -> int:
    """The CLI; exit codes from ``mm_jax.exit_codes``: 2 (REFUSED) only for input refused before any
    work, with nothing written; an error during the work propagates (traceback, exit 1)."""
    args = build_parser().parse_args(argv)
    from mm_jax import compile_cache, distributed, exit_codes, profiling

    try:
        distributed.initialize()  # first: before anything starts a JAX backend
    except ValueError as e:  # a launcher variable set wrong
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    if args.model == "consisid":  # ConsisID's half of the CLI
        from mm_jax import sample_consisid

        return sample_consisid.run(args)
    if args.info:
        return _info(args)
    try:
        compile_cache.enable(compile_cache.resolve(args.compile_cache))
        profiling.check_dir(args.profile)
        request, mesh, dtype, scheme, checked, faces, image = _check(args)
        if args.prompts:
            lines, failed, faces = _check_lines(args, request.settings, mesh)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.REFUSED
    # the work: from here on an error is a crash (its traceback, exit 1)
    if args.prompts:
        return _many(args, lines, failed, faces, request.settings, mesh, dtype)
    from mm_jax import identity, pipeline, video_io

    main_process = distributed.is_main()
    ident = _identities([checked], faces)[0] if checked[0] else None
    if args.save_id and ident is not None and main_process:
        identity.save(args.save_id, ident)
        print(f"saved the identity embeddings to {args.save_id}", file=sys.stderr)
    settings = request.settings
    meta = dict(dataclasses.asdict(settings), checkpoint=str(args.checkpoint), dtype=dtype,
                quantize=args.quantize, mesh=dict(mesh.shape), attention=scheme,
                latents=args.latents, adapter=args.adapter, reference=(ident.source if ident is not None else None),
                **({"image": args.image, "image_noise": args.image_noise} if image is not None else {}))
    if main_process:
        print("settings: " + json.dumps(meta), file=sys.stderr)
    t0 = time.time()
    with profiling.trace(args.profile):  # the frames come back to the host inside: the trace holds all the work
        if image is not None:
            from mm_jax import image_to_video

            frames, final = image_to_video.generate(
                args.checkpoint, settings, image, latents=request.latents, mesh=mesh, dtype=dtype,
                progress=not args.quiet, text_encoder_on_host=args.offload_text_encoder, vae_tiling=args.vae_tiling,
                quantize=args.quantize, attention_parallelism=args.attention_parallelism)
        else:
            [(_, frames, final)] = pipeline.iter_videos(
                args.checkpoint, [pipeline.Request(settings, ident, request.latents)], mesh=mesh, dtype=dtype,
                progress=not args.quiet, text_encoder_on_host=args.offload_text_encoder, vae_tiling=args.vae_tiling,
                attention_parallelism=args.attention_parallelism, quantize=args.quantize)
    if not main_process:
        return exit_codes.OK
    if args.save_latents:
        np.save(args.save_latents, final)
    meta["seconds"] = round(time.time() - t0, 2)
    meta["compile"] = compile_cache.STATS.as_dict()
    print(compile_cache.STATS.line(), file=sys.stderr)
    video_io.write_frames(args.out, frames, fps=args.fps, metadata=meta)
    print(f"wrote {args.out} ({frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]}) in {meta['seconds']} s",
          file=sys.stderr)
    return exit_codes.OK


if __name__ == "__main__":
    sys.exit(main())
