"""Will CogVideoX-5B + Magic Mirror fit a Colab TPU? Per-device memory of each sampling phase.

    python -m mm_jax.memory_plan [--runtime v5e-1] [--offload-text-encoder] [--frames 49 ...]

The phases run one after another and each frees its model before the next is placed (the order of
``mm_jax.identity.compute`` then ``mm_jax.pipeline.generate``):

1. identity: CLIP ViT-L/14 (float32) on the aligned face crop;
2. text encoding: T5-XXL (bfloat16), sharded like its parameters' logical axes;
3. denoising: the DiT + the adapter (bfloat16), CFG batch 2 over [face, text, video] tokens;
4. decoding: the VAE (float32), spatially tiled, two latent frames at a time.

Parameter bytes come from ``jax.eval_shape`` of the real-size configs (no weights) and are split
over the mesh exactly as ``mm_jax.parallel`` shards them. Activations are counted from the shapes:
at the DiT's peak (see ``dit_activations``) and per tensor for T5, CLIP and the VAE. Nothing here
allocates device memory; all functions are pure.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import sys
from pathlib import Path
from typing import Mapping

import numpy as np

GIB = 1024 ** 3
RESERVED_GIB = 0.5      # per device: XLA/runtime scratch that user arrays cannot use


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A Colab TPU runtime: ``devices`` JAX devices of ``hbm_gib`` each."""
    name: str
    devices: int
    hbm_gib: float
    note: str = ""


RUNTIMES: dict[str, Runtime] = {
    "v5e-1": Runtime("v5e-1", 1, 16.0, "1 chip, 16 GB HBM"),
    "v2-8": Runtime("v2-8", 8, 8.0, "4 chips = 8 cores x 8 GB"),
    "v6e-1": Runtime("v6e-1", 1, 32.0, "1 chip, 32 GB HBM"),
}


@dataclasses.dataclass(frozen=True)
class Workload:
    frames: int = 49
    height: int = 480
    width: int = 720
    cfg_batch: int = 2          # [negative, positive] in one batch
    text_tokens: int = 226
    with_face: bool = True


# -- configs and parameters -------------------------------------------------------------------

def real_configs() -> dict:
    """The real-size configs with the sampling dtypes: DiT (configs/model.py:cogvideox_5b), T5-XXL
    (the manifest's config, else the class defaults, which are v1.1 XXL), VAE, CLIP-L, adapter."""
    from mm_jax.models.clip_vision import CLIPVisionConfig
    from mm_jax.models.dit import DiTConfig
    from mm_jax.models.id_adapter import AdapterConfig
    from mm_jax.models.t5 import T5Config
    from mm_jax.models.vae import VAEConfig

    presets_file = Path(__file__).resolve().parents[1] / "configs" / "model.py"
    if not presets_file.exists():
        raise FileNotFoundError(f"{presets_file} not found: run from a checkout of the repository (pip install -e)")
    spec = importlib.util.spec_from_file_location("_model_presets", presets_file)
    presets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(presets)
    dit = DiTConfig.from_dict(dict(presets.get_config("cogvideox_5b").transformer.to_dict()))
    from mm_jax import presets

    t5 = T5Config.from_dict(presets.load("t5_v1_1_xxl_encoder"), dtype="bfloat16", param_dtype="bfloat16")
    bf16 = dict(dtype="bfloat16", param_dtype="bfloat16")
    return {"transformer": dit, "text_encoder": t5, "vae": VAEConfig(), "image_encoder": CLIPVisionConfig(),
            "adapter": AdapterConfig.for_dit(dit, **bf16)}


def param_leaves(name: str, cfg) -> list[tuple[tuple[int, ...], np.dtype, tuple | None]]:
    """(shape, dtype, logical axes) of every parameter of component ``name``, from ``nnx.eval_shape``."""
    from flax import nnx

    from mm_jax import checkpoint

    model = checkpoint.abstract_model(name, cfg)
    out = []
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        v = var.get_value()
        out.append((tuple(v.shape), np.dtype(v.dtype), var.get_metadata().get("logical_axes")))
    return out


def shard_count(logical, shape, mesh_shape: Mapping[str, int]) -> int:
    """Into how many pieces ``mm_jax.parallel``'s rules split an array of ``shape`` on this mesh."""
    from mm_jax import parallel

    spec = parallel.logical_to_spec(logical, shape, dict(mesh_shape))
    n = 1
    for axes in spec:
        for a in ((axes,) if isinstance(axes, str) else (axes or ())):
            n *= mesh_shape[a]
    return n


def param_bytes(leaves, mesh_shape: Mapping[str, int] | None = None) -> int:
    """Total bytes, or the bytes one device holds on ``mesh_shape`` (shards rounded up)."""
    total = 0
    for shape, dtype, logical in leaves:
        size = math.prod(shape) * dtype.itemsize
        total += size if mesh_shape is None else -(-size // shard_count(logical, shape, mesh_shape))
    return total


# -- activations ------------------------------------------------------------------------------

def dit_tokens(dit_cfg, w: Workload, face_tokens: int) -> dict[str, int]:
    """Sequence of one DiT attention call: [face?, text, video] tokens."""
    p, lf = dit_cfg.patch_size, (w.frames - 1) // 4 + 1
    video = lf * (w.height // 8 // p) * (w.width // 8 // p)
    face = face_tokens if w.with_face else 0
    return {"face": face, "text": w.text_tokens, "video": video, "total": face + w.text_tokens + video}


def dit_activations(dit_cfg, w: Workload, face_tokens: int, mesh_shape: Mapping[str, int],
                    act_bytes: int = 2) -> dict[str, int]:
    """Per-device bytes of the activations live at each stage of one DiT block (inference: earlier
    blocks' activations are dead), and ``peak`` = the largest. U = one (B, S, D) tensor; with the
    splash kernel, P = one padded head-major (B, N, S', 128) tensor (``mm_jax.models.splash``):

    * qkv:     residual + normed input + q, k, v                 = 5 U
    * pad:     residual + roped q, k, v + padded q*scale, k, v   = 4 U + 3 P
    * kernel:  residual + padded q, k, v, output                 = 1 U + 4 P
      (the kernel's own working set is one (block_q, block_kv) fp32 tile per core in VMEM, no S x S)
    * ff:      residual + normed input + hidden (4D) + GELU(hidden) = 2 U + 8 U
    """
    from mm_jax.models import splash

    s = dit_tokens(dit_cfg, w, face_tokens)["total"]
    b, n, dh, d = w.cfg_batch, dit_cfg.num_attention_heads, dit_cfg.attention_head_dim, dit_cfg.inner_dim
    _, _, sp, _, dhp = splash.padded_sizes(s, s, dh)
    per_dev = lambda logical, shape: math.prod(shape) * act_bytes // shard_count(logical, shape, mesh_shape)
    u = per_dev(("batch", "seq", "act_embed"), (b, s, d))
    heads = per_dev(("batch", "seq", "act_heads", None), (b, s, n, dh))
    padded = per_dev(("batch", "act_heads", "seq", None), (b, n, sp, dhp))
    hidden = per_dev(("batch", "seq", "act_mlp"), (b, s, 4 * d))  # FeedForward is Linear(D, 4D)
    stages = {"qkv": 2 * u + 3 * heads, "pad": u + 3 * heads + 3 * padded, "kernel": u + 4 * padded,
              "ff": 2 * u + 2 * hidden}
    lf = (w.frames - 1) // 4 + 1
    latents = b * lf * (w.height // 8) * (w.width // 8) * dit_cfg.in_channels * 4  # x, model input, v in fp32
    stages["peak"] = max(stages.values()) + 3 * latents + b * w.text_tokens * dit_cfg.text_embed_dim * act_bytes
    return stages


def t5_activations(t5_cfg, w: Workload, act_bytes: int = 2) -> int:
    """Peak of one T5 layer: residual + normed + gated FF (2 x d_ff) or q, k, v + fp32 scores/bias."""
    b, l = w.cfg_batch, w.text_tokens
    hidden = b * l * t5_cfg.d_model * act_bytes
    ff = 2 * b * l * t5_cfg.d_ff * act_bytes
    attn = 3 * hidden + 2 * b * t5_cfg.num_heads * l * l * 4
    return 2 * hidden + max(ff, attn)


def clip_activations(clip_cfg, act_bytes: int = 4) -> int:
    tokens = (clip_cfg.image_size // clip_cfg.patch_size) ** 2 + 1
    return tokens * (3 * clip_cfg.hidden_size + clip_cfg.intermediate_size) * act_bytes + \
        clip_cfg.num_attention_heads * tokens * tokens * 4


def vae_decode_activations(vae_cfg, w: Workload, tiled: bool = True, act_bytes: int = 4) -> int:
    """Decoder peak: 4 live (frames, tile_h, tile_w, C0) float32 tensors in the last, full-resolution
    up block (C0 = block_out_channels[0]) for the first frame batch (its most pixel frames), one tile
    at a time under ``lax.map``, plus the decoded video and its tiles."""
    from mm_jax.models.vae import frame_batches

    lf = (w.frames - 1) // 4 + 1
    first = max(e - s for s, e in frame_batches(lf, 2))
    pix_frames = 4 * first - 3 if first > 1 else 1
    th, tw = ((vae_cfg.sample_height // 2, vae_cfg.sample_width // 2) if tiled else (w.height, w.width))
    th, tw = min(th, w.height), min(tw, w.width)
    block = pix_frames * th * tw * vae_cfg.block_out_channels[0] * act_bytes
    video = w.frames * w.height * w.width * 3 * 4
    return 4 * block + 2 * video


# -- the plan ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    params: int          # bytes per device
    activations: int     # bytes per device
    host: int = 0        # bytes in host RAM instead (offloaded)

    @property
    def peak(self) -> int:
        return self.params + self.activations


def plan(runtime: Runtime, w: Workload = Workload(), *, offload_text_encoder: bool = False,
         mesh_shape: Mapping[str, int] | None = None, configs: dict | None = None, leaves: dict | None = None
         ) -> list[Phase]:
    """Per-device peak of each phase on ``runtime`` (default mesh: all devices on fsdp)."""
    from mm_jax import parallel

    configs = configs or real_configs()
    leaves = leaves or {k: param_leaves(k, c) for k, c in configs.items()}
    mesh_shape = dict(mesh_shape or parallel.default_mesh_shape(runtime.devices))
    if math.prod(mesh_shape.values()) != runtime.devices:
        raise ValueError(f"mesh {mesh_shape} does not have the {runtime.devices} devices of {runtime.name}")
    one = {"data": 1, "fsdp": 1, "tensor": 1}
    dev = lambda k, m=mesh_shape: param_bytes(leaves[k], m)
    dit, t5, vae, clip, ad = (configs[k] for k in ("transformer", "text_encoder", "vae", "image_encoder", "adapter"))
    face = ad.num_face_tokens
    phases = [Phase("identity (CLIP-L)", dev("image_encoder", one), clip_activations(clip))]
    if offload_text_encoder:
        phases.append(Phase("text encoding (T5-XXL)", 0, 0, host=dev("text_encoder", one) + t5_activations(t5, w)))
    else:
        phases.append(Phase("text encoding (T5-XXL)", dev("text_encoder"), t5_activations(t5, w)))
    phases.append(Phase("denoising (DiT + adapter)", dev("transformer") + (dev("adapter") if w.with_face else 0),
                        dit_activations(dit, w, face, mesh_shape)["peak"]))
    phases.append(Phase("decoding (VAE, tiled)", dev("vae"), vae_decode_activations(vae, w)))
    return phases


def fits(phase: Phase, runtime: Runtime, reserved_gib: float = RESERVED_GIB) -> bool:
    return phase.peak <= (runtime.hbm_gib - reserved_gib) * GIB


def format_plan(runtime: Runtime, phases: list[Phase]) -> str:
    cap = runtime.hbm_gib - RESERVED_GIB
    rows = [f"{runtime.name} ({runtime.note}; {cap:.1f} GiB usable per device)",
            f"  {'phase':28s} {'params':>8s} {'activ.':>8s} {'peak':>8s}  fits"]
    for p in phases:
        extra = f"  (on host: {p.host / GIB:.2f} GiB RAM)" if p.host else ""
        rows.append(f"  {p.name:28s} {p.params / GIB:8.2f} {p.activations / GIB:8.2f} {p.peak / GIB:8.2f}  "
                    f"{'yes' if fits(p, runtime) else 'NO'}{extra}")
    return "\n".join(rows)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.memory_plan", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runtime", action="append", choices=sorted(RUNTIMES), help="default: all of them")
    ap.add_argument("--offload-text-encoder", action="store_true", help="T5 on the host CPU (sample.py flag of the same name)")
    ap.add_argument("--mesh", default=None, help="e.g. fsdp=2,tensor=4 (default: all devices on fsdp)")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--no-face", action="store_true", help="plain CogVideoX: no adapter, no face tokens")
    ap.add_argument("--markdown", action="store_true", help="one markdown table for all runtimes")
    return ap


def markdown_table(results: list[tuple[Runtime, list[Phase]]]) -> str:
    names = [p.name for p in results[0][1]]
    head = "| runtime (GiB usable/device) | " + " | ".join(names) + " |"
    rows = [head, "|" + "---|" * (len(names) + 1)]
    for rt, phases in results:
        cells = [f"{p.peak / GIB:.2f} {'✓' if fits(p, rt) else '✗'}" + (f" (host {p.host / GIB:.1f})" if p.host else "")
                 for p in phases]
        rows.append(f"| {rt.name} ({rt.hbm_gib - RESERVED_GIB:.1f}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from mm_jax import parallel

    w = Workload(frames=args.frames, height=args.height, width=args.width, with_face=not args.no_face)
    configs = real_configs()
    leaves = {k: param_leaves(k, c) for k, c in configs.items()}
    results = []
    for name in args.runtime or list(RUNTIMES):
        rt = RUNTIMES[name]
        mesh = parallel.parse_mesh_spec(args.mesh) if args.mesh else None
        try:
            results.append((rt, plan(rt, w, offload_text_encoder=args.offload_text_encoder, mesh_shape=mesh,
                                     configs=configs, leaves=leaves)))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    tok = dit_tokens(configs["transformer"], w, configs["adapter"].num_face_tokens)
    print(f"{w.frames}x{w.height}x{w.width}, CFG batch {w.cfg_batch}: DiT sequence {tok} tokens; "
          f"params {', '.join(f'{k} {param_bytes(v) / GIB:.2f} GiB' for k, v in leaves.items())}")
    if args.markdown:
        print(markdown_table(results))
    else:
        print("\n\n".join(format_plan(rt, ph) for rt, ph in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
