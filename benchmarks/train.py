"""Training speed: our jitted step vs the PyTorch reference step, and the whole tiny loop.

1. Step (always): the DiT + Magic Mirror adapter forward/backward and AdamW on the adapter (the
   frozen DiT gets no weight gradients), from precomputed latents, text and CLIP states, fp32.
   Ours: ``mm_jax.training.step.make_train_step``. Reference: diffusers' CogVideoXTransformer3DModel
   + tests/reference/magic_mirror_torch.py (the spec's adapter in torch), torch.optim.AdamW.
   On CPU each side runs in its own process (JAX's and torch's thread pools never share the two
   cores), in ``--rounds`` alternating rounds of ``--repeat`` timed steps, so a load change on a
   shared machine hits both sides; the table gives the min and the median of every timed step and
   the load average around the runs (one run each side at a different moment gave ratios from
   1.2 to 2.6 for the same code).
2. Loop (CPU): ``python -m mm_jax.train --config configs/video.py:tiny`` style run: steps/s and the
   share of step time spent loading data (goal < 5%). ``--baseline REV`` also runs the loop of
   ``git show REV:mm_jax/training/loop.py`` (loaded as a temporary module) in the same process,
   alternating with today's for ``--loop-rounds`` rounds: before/after on one machine at one time.
   The earlier loop fetched the metrics after every step and only then loaded the next batch, so its
   data share is time the devices sat idle; today's loads the next batch while the step runs, so its
   share is host time hidden behind the step (the step time says what the overlap gained).
GPU (--gpu): step 1 at CogVideoX-5B size, 49x480x720 (13x60x90 latents), batch 1, bf16, remat per
block: step time, MFU = model FLOPs / (time x peak) and peak device memory (torch side skipped).

    python benchmarks/train.py [--gpu] [--rounds 3] [--repeat 10] [--loop-steps 40]
    python benchmarks/train.py --rounds 0 --loop-steps 40 --workers 0 --baseline 70e180f --loop-rounds 2
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import ml_collections
import numpy as np
from flax import nnx

from benchmarks.common import dit_forward_flops, load_average, machine_report, side_report
from mm_jax import parallel, schedulers as sch
from mm_jax.models.dit import CogVideoXTransformer3D
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter
from mm_jax.demo.tiny_checkpoint import SCHEDULER
from mm_jax.training.models import TrainModels
from mm_jax.training.optim import make_optimizer
from mm_jax.training.step import init_state, make_train_step, put_batch

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "A800": 312e12}
CLASS_INDEX = 3


def configs(gpu: bool):
    if gpu:
        d = DiTConfig(dtype="bfloat16", param_dtype="bfloat16", remat_policy="full")
        return d, AdapterConfig.for_dit(d, dtype="bfloat16", param_dtype="float32"), (13, 60, 90), 1
    d = DiTConfig(num_attention_heads=4, attention_head_dim=32, num_layers=4, text_embed_dim=64, time_embed_dim=32,
                  sample_width=24, sample_height=16, sample_frames=9, attention_impl="xla")  # as the tiny presets
    return d, AdapterConfig.for_dit(d, clip_width=64, width=64, depth=2, heads=2, head_dim=32, id_mlp_hidden=64,
                                    attention_impl="xla"), (3, 16, 24), 2


def batch(dcfg, acfg, lat, b, seed=0):
    rng = np.random.default_rng(seed)
    f, h, w = lat
    frames = 1 + 4 * (f - 1)
    mask = np.zeros((b, frames, 8 * h, 8 * w), np.float32)
    mask[:, :, 2 * h:4 * h, 3 * w:5 * w] = 1
    return dict(latents=rng.standard_normal((b, f, h, w, dcfg.in_channels)).astype(np.float32),
                text_embeddings=rng.standard_normal((b, 226, dcfg.text_embed_dim)).astype(np.float32),
                clip_hidden=rng.standard_normal((b, 257, acfg.clip_width)).astype(np.float32),
                e_id=rng.standard_normal((b, acfg.id_dim)).astype(np.float32), face_mask=mask,
                class_index=np.full((b,), CLASS_INDEX, np.int32), has_id=np.ones((b,), bool))


def step_times(fn, repeat: int, sync=lambda x: x) -> dict[str, list[float]]:
    """Wall and process-CPU seconds of each of ``repeat`` calls (warm up first)."""
    out = {"wall": [], "cpu": []}
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        sync(fn())
        out["wall"].append(time.perf_counter() - t0)
        out["cpu"].append(time.process_time() - c0)
    return out


def ours(dcfg, acfg, lat, b, repeat):
    mesh = parallel.make_mesh()
    with jax.set_mesh(mesh):
        dit = nnx.jit(lambda: CogVideoXTransformer3D(dcfg, rngs=nnx.Rngs(0)))()
        adapter = nnx.jit(lambda: MagicMirrorAdapter(acfg, rngs=nnx.Rngs(1)))()
    models = TrainModels(dit, None, None, None, adapter, None, sch.SchedulerConfig.from_dict(SCHEDULER), Path("."),
                         Path("."))
    opt = ml_collections.ConfigDict(dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, warmup_steps=0,
                                         grad_clip=1.0))
    train_cfg = ml_collections.ConfigDict(dict(seed=0, face_loss_prob=0.5, face_loss_lambda=1.0))
    tx = make_optimizer(opt)
    state, aux = init_state(models, tx, mesh)
    step = make_train_step(models, tx, state, aux, train_cfg, mesh)
    x = put_batch(batch(dcfg, acfg, lat, b), mesh)
    holder = {"p": state.params, "o": state.opt_state, "i": 0}

    def run():
        with jax.set_mesh(mesh):
            holder["p"], holder["o"], m = step(holder["p"], holder["o"], aux[-1], x, holder["i"])
        holder["i"] += 1
        return m["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(run())
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(run())
    return step_times(run, repeat, jax.block_until_ready), compile_s


def reference(dcfg, acfg, lat, b, repeat):
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    from tests.reference.magic_mirror_torch import MagicMirrorAdapterTorch, magic_mirror_forward

    # the architecture fields diffusers' constructor takes (ours add dtype, remat, scan, attention ones)
    accepted = inspect.signature(CogVideoXTransformer3DModel.__init__).parameters
    keys = [k for k in DiTConfig.__dataclass_fields__ if k in accepted]
    dit = CogVideoXTransformer3DModel(**{k: getattr(dcfg, k) for k in keys}).eval()
    dit.requires_grad_(False)
    ad = MagicMirrorAdapterTorch(acfg.to_dict())
    opt = torch.optim.AdamW(ad.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1e-4)
    x = {k: torch.from_numpy(v) for k, v in batch(dcfg, acfg, lat, b).items()}
    f, h, w = lat
    p = dcfg.patch_size
    crops = get_resize_crop_region_for_grid((h // p, w // p), dcfg.sample_width // p, dcfg.sample_height // p)
    rope = get_3d_rotary_pos_embed(embed_dim=dcfg.attention_head_dim, crops_coords=crops, grid_size=(h // p, w // p),
                                   temporal_size=f, device="cpu")
    latents = x["latents"].permute(0, 1, 4, 2, 3)  # (B, F, C, H, W)
    abar = torch.from_numpy(sch.alphas_cumprod(sch.SchedulerConfig.from_dict(SCHEDULER))).float()

    def run():
        t = torch.randint(0, 1000, (b,))
        eps = torch.randn_like(latents)
        a = abar[t].view(-1, 1, 1, 1, 1)
        x_t = a.sqrt() * latents + (1 - a).sqrt() * eps
        v = a.sqrt() * eps - (1 - a).sqrt() * latents
        v_hat = magic_mirror_forward(dit, ad, x_t, x["text_embeddings"], t, x["clip_hidden"], x["e_id"], CLASS_INDEX,
                                     rope)
        loss = ((v_hat - v) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ad.parameters(), 1.0)
        opt.step()
        return loss.item()

    run()
    run()
    return step_times(run, repeat)


def baseline_loop(rev: str):
    """The training loop module of commit ``rev``, imported from a temporary file (its
    ``maybe_initialize_distributed`` call, gone since, is dropped: one process)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    text = subprocess.run(["git", "show", f"{rev}:mm_jax/training/loop.py"], cwd=root, capture_output=True,
                          text=True, check=True).stdout
    text = text.replace("parallel.maybe_initialize_distributed()", "pass")
    path = Path(tempfile.mkdtemp()) / f"loop_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"loop_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop(steps: int, workers: int, train_fn=None, log_every: int = 10):
    from mm_jax import config
    from mm_jax.demo import assets
    from mm_jax.training.loop import train

    with tempfile.TemporaryDirectory() as d:
        cfg = config.load("configs/video.py:tiny", [f"train.steps={steps}", "train.checkpoint_every=1000000",
                                                    f"data.num_workers={workers}", f"train.log_every={log_every}"])
        assets.prepare(cfg, Path(d) / "run")  # the preset's setup hook, as the train CLI calls it
        s = (train_fn or train)(cfg, Path(d) / "run", progress=False)
    return s


def compare_loops(rev: str, steps: int, workers: int, rounds: int, log_every: int) -> None:
    """Before (the loop of ``rev``) and after (today's), alternating in this process."""
    old = baseline_loop(rev).train
    rows = {"before": [], "after": []}
    load = [os.getloadavg()[0]]
    for r in range(rounds):
        for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
            rows[name].append(loop(steps, workers, old if name == "before" else None, log_every))
            load.append(os.getloadavg()[0])
    print(f"loop (configs/video.py:tiny, {steps} steps, {workers} data workers, {len(jax.devices())} devices, "
          f"log_every {log_every}); {rounds} rounds alternating; 1-min load average "
          f"{' -> '.join(f'{x:.2f}' for x in load)}")
    for name, label in (("before", f"before ({rev})"), ("after", "after")):
        for s in rows[name]:
            print(f"  {label:18s} {s['mean_step_s'] * 1e3:7.1f} ms/step ({1 / s['mean_step_s']:.2f} steps/s), "
                  f"data {s['data_wait_fraction']:.1%} of step time, first step {s['compile_s']:.1f} s")
    best = {k: min(s["mean_step_s"] for s in v) for k, v in rows.items()}
    print(f"  best step time after/before: {best['after'] / best['before']:.3f}")


def side(name: str, repeat: int) -> None:
    """One side of the CPU step comparison in this process: prints a JSON line."""
    dcfg, acfg, lat, b = configs(False)
    if name == "ours":
        times, compile_s = ours(dcfg, acfg, lat, b, repeat)
        extra = {"compile_s": round(compile_s, 1)}
    else:
        times, extra = reference(dcfg, acfg, lat, b, repeat), {}
    print("RESULT " + json.dumps(dict(times=times, **extra, **side_report(name))))


def compare_on_cpu(rounds: int, repeat: int) -> None:
    print(machine_report(sys.argv))
    results = {"ours": [], "torch": []}
    cpu = {"ours": [], "torch": []}
    info = {}
    load = [load_average()]
    for r in range(rounds):
        for name in (("ours", "torch") if r % 2 == 0 else ("torch", "ours")):
            out = subprocess.run([sys.executable, __file__, "--side", name, "--repeat", str(repeat)], text=True,
                                 capture_output=True, cwd=Path(__file__).resolve().parents[1])
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{name} side failed:\n{out.stderr[-3000:]}")
            res = json.loads(line[len("RESULT "):])
            times = res.pop("times")
            results[name] += times["wall"]
            cpu[name] += times["cpu"]
            info[name] = res
        load.append(load_average())
    dcfg, acfg, lat, b = configs(False)
    print(f"step: DiT {dcfg.num_layers}x{dcfg.inner_dim}, adapter in {len(acfg.adapter_layers)} blocks, "
          f"latents {lat}, batch {b}, fp32, {os.cpu_count()} CPUs; {rounds} rounds x {repeat} steps per side, "
          f"each side in its own process; 1-min load average {' -> '.join(f'{x:.2f}' for x in load)}")
    for name in ("ours", "torch"):
        t = results[name]
        print(f"  {name:6s} min {min(t) * 1e3:7.1f} ms  median {statistics.median(t) * 1e3:7.1f} ms/step  "
              f"CPU min {min(cpu[name]) * 1e3:7.1f} ms  {info[name]}")
    mins = min(results["ours"]) / min(results["torch"])
    meds = statistics.median(results["ours"]) / statistics.median(results["torch"])
    print(f"  ratio ours/torch: {mins:.2f} (min), {meds:.2f} (median), "
          f"{min(cpu['ours']) / min(cpu['torch']):.2f} (CPU min)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--repeat", type=int, default=10, help="timed steps per side and round")
    ap.add_argument("--rounds", type=int, default=3, help="CPU: alternating rounds, each side in its own process "
                    "(0: skip the step comparison)")
    ap.add_argument("--loop-steps", type=int, default=40, help="tiny-loop steps on CPU (0: skip)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="data worker processes to compare")
    ap.add_argument("--baseline", metavar="REV", help="also run the training loop of this git revision, "
                    "alternating with today's (before/after)")
    ap.add_argument("--loop-rounds", type=int, default=2, help="--baseline: alternating rounds")
    ap.add_argument("--log-every", type=int, default=10, help="loop runs: train.log_every")
    ap.add_argument("--side", choices=("ours", "torch"), help=argparse.SUPPRESS)  # internal: one side per process
    args = ap.parse_args()
    if args.side:
        return side(args.side, args.repeat)
    if not args.gpu:
        if args.rounds:
            compare_on_cpu(args.rounds, args.repeat)
    else:
        dcfg, acfg, lat, b = configs(True)
        times, compile_s = ours(dcfg, acfg, lat, b, args.repeat)
        t_ours = statistics.median(times["wall"])
        print(f"step: DiT {dcfg.num_layers}x{dcfg.inner_dim}, adapter in {len(acfg.adapter_layers)} blocks, "
              f"latents {lat}, batch {b}, backend {jax.default_backend()}")
        print(f"  ours   {t_ours * 1e3:9.1f} ms/step (compile {compile_s:.1f} s)")
        f, h, w = lat
        flops = 2 * dit_forward_flops(dcfg, b, f, h * 1, w * 1, 226)  # forward + input-gradient backward
        dev = jax.devices()[0]
        peak = next((v for k, v in PEAK_BF16.items() if k in dev.device_kind), None)
        mem = dev.memory_stats() or {}
        print(f"  model FLOPs/step {flops:.3e}; MFU {flops / (t_ours * peak):.1%} of {dev.device_kind} bf16 peak"
              if peak else f"  model FLOPs/step {flops:.3e} (unknown peak for {dev.device_kind})")
        print(f"  peak device memory {mem.get('peak_bytes_in_use', 0) / 2**30:.1f} GiB")
        return
    if args.baseline:
        for workers in args.workers:
            compare_loops(args.baseline, args.loop_steps, workers, args.loop_rounds, args.log_every)
        return
    for workers in args.workers if args.loop_steps else ():
        s = loop(args.loop_steps, workers, log_every=args.log_every)
        print(f"loop (configs/video.py:tiny, {args.loop_steps} steps, {workers} data workers): "
              f"{1 / s['mean_step_s']:.1f} steps/s, data loading {s['data_wait_fraction']:.1%} of step time, "
              f"first step (compile) {s['compile_s']:.1f} s")


if __name__ == "__main__":
    main()
