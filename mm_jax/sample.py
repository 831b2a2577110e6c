"""Sample a video: ``python -m mm_jax.sample --checkpoint DIR --prompt "..." --out video.mp4``.

With an identity (Magic Mirror): ``--adapter DIR --ref face.jpg --face-models DIR`` (or ``--id
id.npz`` saved earlier with ``--save-id``); the prompt must name the subject with a class word.

Prints the settings and the seed, shows a progress bar over denoising steps, and writes the
frames (.mp4, .gif, .npy of floats in [0, 1], or a folder of PNGs) with a ``<out>.json`` sidecar
of the settings. Bad input (frame count, sizes, a checkpoint missing a component, initial
latents of the wrong shape) exits with code 2 and writes nothing.

Many videos: ``--prompts FILE.jsonl`` (one ``{"prompt", "out", "seed"?, "negative_prompt"?,
"ref"? | "id"?}`` per line). Models load once, T5 encodes every prompt before the DiT is placed,
videos are denoised ``--videos-per-batch`` at a time; a bad line (unreadable, missing file, no
face, no class word) is reported with its number and skipped, the others are written, and the
exit code is 1 when any line failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    from mm_jax import frame_counts

    ap = argparse.ArgumentParser(prog="python -m mm_jax.sample", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="mm_jax checkpoint folder (from_torch.py --components all)")
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
    ap.add_argument("--attention-parallelism", choices=("ulysses", "ring"), default=None,
                    help="how a context axis > 1 joins the sequence (default: ulysses when the heads divide, else ring)")
    ap.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                    help="compute/param dtype (default: bfloat16 on GPU/TPU, float32 on CPU)")
    ap.add_argument("--fps", type=int, default=8)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--offload-text-encoder", action="store_true",
                    help="run T5 on the host CPU, not the accelerator (python -m mm_jax.plan says when: its text_encoder phase does not fit)")
    ap.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
                    help="decode in spatial tiles (less memory; diffusers enable_tiling), spread over the mesh's "
                         "devices; default: on for accelerators and for several devices, off on one CPU device")
    ap.add_argument("--save-latents", help="also write the final latents (1, f, h, w, C) to this .npy (before decode)")
    idg = ap.add_argument_group("identity (Magic Mirror)")
    idg.add_argument("--adapter", help="mm_jax checkpoint folder with the 'adapter' (and optionally 'image_encoder') component")
    idg.add_argument("--ref", help="reference photo of the person")
    idg.add_argument("--face-models", help="local insightface model pack folder (SCRFD detector + ArcFace)")
    idg.add_argument("--save-id", help="write the reference's embeddings to this .npz for reuse")
    idg.add_argument("--id", help="reuse embeddings saved with --save-id instead of --ref")
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


def _lines(path: str):
    """(line number, dict) for each non-empty line of a JSONL file; a line that is not a JSON object
    gives (number, error message)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read ({e})") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, f"not JSON ({e})"
            continue
        yield n, (d if isinstance(d, dict) else "not a JSON object")


def _many(args, base, mesh, dtype) -> int:
    """``--prompts``: every good line becomes a video; bad lines are reported and skipped."""
    from mm_jax import identity, pipeline, video_io

    failed, requests, outs = [], [], []
    embedder, adapter_cfg, tokenizer = None, None, None

    def fail(n, msg):
        failed.append(n)
        print(f"error: {args.prompts}:{n}: {msg}; line skipped", file=sys.stderr)

    for n, d in _lines(args.prompts):
        if isinstance(d, str):
            fail(n, d)
            continue
        try:
            unknown = sorted(set(d) - {"prompt", "out", "seed", "negative_prompt", "ref", "id"})
            if unknown:
                raise ValueError(f"unknown field(s) {unknown}")
            if not d.get("prompt") or not d.get("out"):
                raise ValueError("needs 'prompt' and 'out'")
            video_io.output_kind(d["out"])
            seed = d.get("seed", base.seed)
            if not isinstance(seed, int):
                raise ValueError(f"seed {seed!r}: must be an integer")
            settings = dataclasses.replace(base, prompt=d["prompt"], seed=seed,
                                           negative_prompt=d.get("negative_prompt", base.negative_prompt))
            ident = None
            if d.get("ref") or d.get("id"):
                if not args.adapter:
                    raise ValueError("'ref'/'id' need --adapter DIR")
                if d.get("ref") and d.get("id"):
                    raise ValueError("give either 'ref' or 'id', not both")
                if adapter_cfg is None:
                    from mm_jax import checkpoint, text

                    adapter_cfg = checkpoint.load_config(args.adapter, "adapter")
                    tokenizer = text.load_tokenizer(Path(args.checkpoint) / "tokenizer")
                identity.class_index(tokenizer, settings.prompt, adapter_cfg, settings.max_sequence_length)
                if d.get("id"):
                    ident = identity.load(d["id"], args.adapter)
                else:
                    if not args.face_models:
                        raise ValueError("'ref' needs --face-models DIR")
                    if not Path(d["ref"]).is_file():
                        raise FileNotFoundError(f"reference {d['ref']} not found")
                    if embedder is None:
                        clip_dir = identity.component_dir("image_encoder", args.adapter, args.checkpoint)
                        embedder = identity.Embedder(args.face_models, clip_dir, args.adapter, mesh=mesh)
                    ident = embedder(d["ref"])
        except (ValueError, FileNotFoundError) as e:
            fail(n, e)
            continue
        requests.append(pipeline.Request(settings, ident))
        outs.append((n, d["out"]))
    del embedder  # the CLIP tower and face models: freed before the DiT is placed
    if not requests:
        print(f"error: {args.prompts}: no usable line", file=sys.stderr)
        return 2 if not failed else 1
    per_batch = args.videos_per_batch or max(1, mesh.shape["data"] // (2 if base.guidance > 1 else 1))
    print(f"{len(requests)} video(s), {len(failed)} line(s) skipped; mesh {dict(mesh.shape)}, {per_batch} per batch",
          file=sys.stderr)
    t0 = time.time()
    try:
        videos = pipeline.generate_batch(args.checkpoint, requests, mesh=mesh, dtype=dtype, progress=not args.quiet,
                                         videos_per_batch=per_batch, text_encoder_on_host=args.offload_text_encoder,
                                         vae_tiling=args.vae_tiling, attention_parallelism=args.attention_parallelism)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = round(time.time() - t0, 2)
    for (n, out), r, frames in zip(outs, requests, videos):
        meta = dict(dataclasses.asdict(r.settings), checkpoint=str(args.checkpoint), dtype=dtype, mesh=dict(mesh.shape),
                    adapter=args.adapter, reference=r.identity.source if r.identity is not None else None,
                    line=n, batch_seconds=seconds)
        video_io.write_frames(out, frames, fps=args.fps, metadata=meta)
        print(f"wrote {out} (line {n})", file=sys.stderr)
    if failed:
        print(f"{len(failed)} line(s) failed: {failed}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import jax

    from mm_jax import distributed, parallel, pipeline, video_io

    if args.info:
        return _info(args)
    try:
        for flag in ("prompt", "out"):
            if not getattr(args, flag) and not args.prompts:
                raise ValueError(f"--{flag} is required (or --prompts FILE)")
        if args.prompts and (args.prompt or args.out or args.ref or args.id or args.latents or args.save_latents):
            raise ValueError("--prompts takes the prompts, outputs and references from its lines; do not also give "
                             "--prompt/--out/--ref/--id/--latents/--save-latents")
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
            prompt=args.prompt or "(from --prompts)", negative_prompt=args.negative_prompt, frames=args.frames, height=args.height,
            width=args.width, steps=args.steps, guidance=args.guidance, scheduler=args.scheduler,
            dynamic_cfg=args.dynamic_cfg, seed=args.seed)
        settings.validate()
        pipeline.check_checkpoint(args.checkpoint)
        latents = None
        if args.latents:
            try:
                latents = np.load(args.latents)
            except Exception as e:  # unreadable / not an .npy
                raise ValueError(f"--latents {args.latents}: cannot read ({e})") from None
        distributed.initialize()
        rows = 2 if args.prompts or args.guidance > 1 else 1  # the DiT batch of one call: a CFG pair, or videos
        mesh = parallel.make_mesh(args.mesh or parallel.sampling_mesh_shape(len(jax.devices()),
                                                                          parallel.device_memory_bytes(), rows))
        dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        scheme = pipeline.attention_scheme(args.checkpoint, mesh, args.attention_parallelism)
        if args.prompts:
            return _many(args, settings, mesh, dtype)
        ident = None
        if args.ref or args.id:
            from mm_jax import identity

            if args.id:
                ident = identity.load(args.id, args.adapter)
            else:
                clip_dir = identity.component_dir("image_encoder", args.adapter, args.checkpoint)
                ident = identity.compute(args.ref, args.face_models, clip_dir, args.adapter, mesh=mesh)
            if args.save_id:
                identity.save(args.save_id, ident)
                print(f"saved the identity embeddings to {args.save_id}", file=sys.stderr)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    meta = dict(dataclasses.asdict(settings), checkpoint=str(args.checkpoint), dtype=dtype,
                mesh=dict(mesh.shape), attention=scheme,
                latents=args.latents, adapter=args.adapter, reference=(ident.source if ident is not None else None))
    print("settings: " + json.dumps(meta), file=sys.stderr)
    t0 = time.time()
    try:
        frames, final = pipeline.generate_batch(
            args.checkpoint, [pipeline.Request(settings, ident, latents)], mesh=mesh, dtype=dtype,
            progress=not args.quiet, text_encoder_on_host=args.offload_text_encoder, vae_tiling=args.vae_tiling,
            attention_parallelism=args.attention_parallelism, return_latents=True)
        frames = frames[0]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.save_latents:
        np.save(args.save_latents, final[0])
    meta["seconds"] = round(time.time() - t0, 2)
    video_io.write_frames(args.out, frames, fps=args.fps, metadata=meta)
    print(f"wrote {args.out} ({frames.shape[0]} frames, {frames.shape[1]}x{frames.shape[2]}) in {meta['seconds']} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
