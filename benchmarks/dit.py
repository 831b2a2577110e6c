"""DiT forward: ours vs diffusers on the same config and weights, printed as a ratio.

CPU (default): 2 blocks at full 5B width, 226 text tokens, latent 13x16x30x44, fp32. The weights
are diffusers' (seed 0) converted with our converter; each side runs in its own process (no shared
thread pools, no second model in memory) in ``--rounds`` alternating rounds of ``--repeat`` timed
forwards, so a load change on a shared machine hits both; ours is compiled with the options the
sampler compiles its CPU step with (``layers.scan_compiler_options``). Printed: the exact command,
the threads, versions and env vars of each side, the load average around each round, wall and
process-CPU seconds per forward (CPU seconds move less with the load than wall seconds), and the
parity of the two outputs.
GPU (--gpu): the full 5B block stack at 49x480x720 (latent 13x60x90) in bf16, batch 1; our
time and achieved TFLOP/s vs --peak-tflops (H100 bf16 dense: 800), and diffusers in the same run.

    python benchmarks/dit.py [--rounds 2] [--repeat 2] [--layers 2]     # CPU, ~4 min when idle
    python benchmarks/dit.py --gpu [--layers N] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from benchmarks.common import dit_forward_flops, load_average, machine_report, side_report, time_it

TEXT_LEN, BATCH = 226, 1


def shapes(gpu: bool):
    return (13, 60, 90, "bfloat16") if gpu else (13, 30, 44, "float32")


def inputs(frames, h, w):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((BATCH, frames, h, w, 16), dtype=np.float32),
            rng.standard_normal((BATCH, TEXT_LEN, 4096), dtype=np.float32), np.array([500] * BATCH))


def hf_kwargs(layers: int) -> dict:
    return dict(num_layers=layers, num_attention_heads=48, use_rotary_positional_embeddings=True)  # 5B widths


def timed(fn, repeat: int) -> dict:
    """Wall and process-CPU seconds of ``repeat`` calls after one warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": wall, "cpu": cpu}


def side(name: str, folder: Path, layers: int, repeat: int) -> None:
    """One side of the CPU comparison in this process: prints a RESULT JSON line, saves its output."""
    frames, h, w, dtype = shapes(False)
    x, text, t = inputs(frames, h, w)
    if name == "ours":
        import jax
        import jax.numpy as jnp

        from mm_jax import checkpoint
        from mm_jax.models import layers as L

        model = checkpoint.load_component(folder / "ckpt", "transformer", dtype=dtype, param_dtype=dtype)
        options = L.scan_compiler_options("cpu")
        fwd = jax.jit(lambda m, x, c, t: m(x, c, t), compiler_options=options)  # as the sampler's CPU step
        args = (model, jnp.asarray(x), jnp.asarray(text), jnp.asarray(t))
        t0 = time.perf_counter()
        y = np.asarray(fwd(*args))
        extra = {"compile_s": time.perf_counter() - t0, "compiler_options": options}
        res = timed(lambda: fwd(*args).block_until_ready(), repeat)
    else:
        import torch
        from diffusers import CogVideoXTransformer3DModel
        from diffusers.models.embeddings import get_3d_rotary_pos_embed
        from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

        torch.set_grad_enabled(False)
        ref = CogVideoXTransformer3DModel.from_pretrained(folder / "src").eval()
        crops = get_resize_crop_region_for_grid((h // 2, w // 2), 45, 30)
        rope = get_3d_rotary_pos_embed(64, crops, (h // 2, w // 2), frames, device="cpu")
        xt, ct, tt = torch.from_numpy(x).permute(0, 1, 4, 2, 3), torch.from_numpy(text), torch.from_numpy(t)

        def run():
            return ref(hidden_states=xt, encoder_hidden_states=ct, timestep=tt, image_rotary_emb=rope,
                       return_dict=False)[0]

        y, extra = run().permute(0, 1, 3, 4, 2).numpy(), {}
        res = timed(run, repeat)
    np.save(folder / f"{name}.npy", y)
    print("RESULT " + json.dumps(dict(res, **extra, **side_report(name))))


def compare_on_cpu(args) -> None:
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from tools.convert_weights.from_torch import convert

    print(machine_report(sys.argv))
    frames, h, w, dtype = shapes(False)
    from mm_jax.models.dit_config import DiTConfig

    cfg = DiTConfig(num_layers=args.layers, dtype=dtype, param_dtype=dtype)
    flops = dit_forward_flops(cfg, BATCH, frames, h, w, TEXT_LEN)
    results = {"ours": {"wall": [], "cpu": []}, "torch": {"wall": [], "cpu": []}}
    info, load = {}, [load_average()]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        CogVideoXTransformer3DModel(**hf_kwargs(args.layers)).save_pretrained(tmp / "src")
        convert(tmp / "src", tmp / "ckpt")
        for r in range(args.rounds):
            for name in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
                out = subprocess.run([sys.executable, __file__, "--side", name, "--folder", str(tmp), "--layers",
                                      str(args.layers), "--repeat", str(args.repeat)], text=True, capture_output=True,
                                     cwd=Path(__file__).resolve().parents[1])
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    raise RuntimeError(f"{name} side failed:\n{out.stderr[-3000:]}")
                res = json.loads(line[len("RESULT "):])
                for k in ("wall", "cpu"):
                    results[name][k] += res.pop(k)
                info[name] = res
            load.append(load_average())
        y, y_ref = np.load(tmp / "ours.npy"), np.load(tmp / "torch.npy")
    print(f"config: {args.layers} blocks, width {cfg.inner_dim}, latent {frames}x16x{h}x{w}, text {TEXT_LEN}, {dtype}, "
          f"{flops / 1e12:.2f} TFLOP/forward; {args.rounds} rounds x {args.repeat} forwards per side, each side in "
          f"its own process; 1-min load average {' -> '.join(f'{x:.2f}' for x in load)}")
    for name in ("ours", "torch"):
        t = results[name]
        print(f"  {name:6s} wall min {min(t['wall']):7.2f} s median {statistics.median(t['wall']):7.2f} s;  "
              f"CPU min {min(t['cpu']):7.2f} s ({flops / min(t['cpu']) / 1e9:.0f} GFLOP per CPU-s)  {info[name]}")
    ratio = {k: min(results["ours"][k]) / min(results["torch"][k]) for k in ("wall", "cpu")}
    med = statistics.median(results["ours"]["wall"]) / statistics.median(results["torch"]["wall"])
    print(f"  ratio ours/diffusers: {ratio['wall']:.2f} (wall min), {med:.2f} (wall median), {ratio['cpu']:.2f} "
          f"(CPU min); lower is faster")
    print(f"  max rel err vs diffusers: {np.max(np.abs(y - y_ref)) / np.max(np.abs(y_ref)):.2e}")


def run_on_gpu(args) -> None:
    import jax.numpy as jnp
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid
    from flax import nnx

    from mm_jax.models.dit import CogVideoXTransformer3D
    from mm_jax.models.dit_config import DiTConfig

    print(machine_report(sys.argv))
    layers = args.layers or 42
    frames, h, w, dtype = shapes(True)
    cfg = DiTConfig(num_layers=layers, dtype=dtype, param_dtype=dtype)
    x, text, t = inputs(frames, h, w)
    ours = nnx.jit(lambda: CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0)))()
    fwd = nnx.jit(lambda m, x, c, t: m(x, c, t))
    xj, cj, tj = jnp.asarray(x, dtype), jnp.asarray(text, dtype), jnp.asarray(t)
    t0 = time.perf_counter()
    fwd(ours, xj, cj, tj).block_until_ready()
    compile_s = time.perf_counter() - t0
    ours_s = time_it(lambda: fwd(ours, xj, cj, tj), args.repeat, sync=lambda y: y.block_until_ready())
    flops = dit_forward_flops(cfg, BATCH, frames, h, w, TEXT_LEN)
    tf = flops / ours_s / 1e12
    print(f"config: {layers} blocks, latent {frames}x16x{h}x{w}, {dtype}, {side_report('ours')}")
    print(f"ours:      {ours_s:8.3f} s/forward  (first call incl. compile {compile_s:.1f} s)  {tf:.2f} TFLOP/s "
          f"= {100 * tf / args.peak_tflops:.1f}% of {args.peak_tflops:.0f}")
    if args.no_torch:
        return
    torch.manual_seed(0)
    ref = CogVideoXTransformer3DModel(**hf_kwargs(layers)).eval().to("cuda", torch.bfloat16)
    crops = get_resize_crop_region_for_grid((h // 2, w // 2), 45, 30)
    rope = get_3d_rotary_pos_embed(64, crops, (h // 2, w // 2), frames, device="cuda")
    xt = torch.from_numpy(x).permute(0, 1, 4, 2, 3).to("cuda", torch.bfloat16)
    ct, tt = torch.from_numpy(text).to("cuda", torch.bfloat16), torch.from_numpy(t).to("cuda")

    def run_ref():
        with torch.no_grad():
            y = ref(hidden_states=xt, encoder_hidden_states=ct, timestep=tt, image_rotary_emb=rope, return_dict=False)[0]
        torch.cuda.synchronize()
        return y

    run_ref()
    ref_s = time_it(run_ref, args.repeat)
    print(f"diffusers: {ref_s:8.3f} s/forward  {flops / ref_s / 1e12:.2f} TFLOP/s")
    print(f"ratio ours/diffusers: {ours_s / ref_s:.3f}  (lower is faster)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="real-size bf16 run on a GPU")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: 2 on CPU, 42 on GPU)")
    ap.add_argument("--rounds", type=int, default=2, help="CPU: alternating rounds, each side in its own process")
    ap.add_argument("--repeat", type=int, default=2, help="timed forwards per side and round (after one warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=800.0)
    ap.add_argument("--no-torch", action="store_true", help="GPU: skip diffusers (ours only)")
    ap.add_argument("--side", choices=("ours", "torch"), help=argparse.SUPPRESS)  # internal: one side per process
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        return side(args.side, args.folder, args.layers, args.repeat)
    if args.gpu:
        return run_on_gpu(args)
    args.layers = args.layers or 2
    compare_on_cpu(args)


if __name__ == "__main__":
    main()
