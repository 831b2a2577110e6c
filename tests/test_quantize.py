"""Quantized sampling (``--quantize``, ``mm_jax.models.quantize``): the tiny pipeline sampled with the
same noise in float32 and with the DiT's and T5's linear layers in int8 (weights and activations),
int8 weights only, and fp8 (XLA:CPU runs float8_e4m3fn dots, so the fp8 path runs here too),
through the CLI; the deviation of the final latents and frames is bounded, and a quantizer that
zeroes the weights breaks the bound."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax import sample
from mm_jax.models import quantize
from tests.tiny_pipeline import make_pipeline
from tools.convert_weights.from_torch import convert

PROMPT = "a man is walking on the beach at sunset"


def psnr(a, b) -> float:
    """Frames in [0, 1]."""
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2)))


def rel_err(a, ref) -> float:
    """max |a - ref| / max |ref|."""
    return float(np.max(np.abs(a - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{mode: (frames, latents, sidecar)} of the same CLI command, unquantized ("none") and per mode,
    plus "zeroed": int8 with a broken quantizer whose scales are 0 (the weights vanish)."""
    import torch

    root = tmp_path_factory.mktemp("quant")
    make_pipeline(root / "src")
    ckpt = convert(root / "src", root / "ckpt")
    lat = torch.randn(1, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    np.save(root / "latents.npy", lat.permute(0, 1, 3, 4, 2).numpy())

    def run(name, mode):
        out = root / f"{name}.npy"
        args = ["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64", "--width", "64",
                "--steps", "4", "--guidance", "6", "--latents", str(root / "latents.npy"), "--out", str(out),
                "--save-latents", str(root / f"{name}_z.npy"), "--quiet"] + (["--quantize", mode] if mode else [])
        assert sample.main(args) == 0
        return np.load(out), np.load(root / f"{name}_z.npy"), json.loads((root / f"{name}.npy.json").read_text())

    out = {"none": run("none", None)}
    for mode in quantize.MODES:
        out[mode] = run(mode, mode)
    # fp8 with its attention: cuDNN's kernel does not exist on CPU (mode fp8 warns and runs the bf16
    # path there), so the DiT's self-attention runs the kernel's emulation ("fp8-reference"):
    # "fp8-att" with the fp8 linear layers (mode fp8 as an H100 runs it), "fp8-att-only" without
    # them (float32 linear layers), "fp8-att-only-broken": an emulation that puts the probabilities
    # on e4m3 at 1/64 (most flush to zero), under its own name (a new kernel name traces again)
    import re

    from flax import nnx

    from mm_jax.models import fp8_attention, layers

    def broken(q, k, v, key_mask, kv_lengths, scale):
        real_s, fp8_attention.S_SCALE = fp8_attention.S_SCALE, 1 / 64
        try:
            return fp8_attention.reference_fp8_attention(q, k, v, scale)
        finally:
            fp8_attention.S_SCALE = real_s

    def attention_only(model, mode, **_):  # quantize_model without the linear layers
        for path, m in nnx.iter_modules(model):
            if hasattr(m, "impl") and re.fullmatch(quantize.ATTENTION_MODULES, "/".join(map(str, path))):
                m.impl = quantize.attention_impl(mode, m.impl)
        return model

    real_att, real_qm = quantize.ATTENTION, quantize.quantize_model
    try:
        quantize.ATTENTION = "fp8-reference"
        out["fp8-att"] = run("fp8-att", "fp8")
        quantize.quantize_model = attention_only
        out["fp8-att-only"] = run("fp8-att-only", "fp8")
        quantize.ATTENTION, layers.ATTENTION_IMPLS["fp8-broken"] = "fp8-broken", broken
        out["fp8-att-only-broken"] = run("fp8-att-only-broken", "fp8")
    finally:
        quantize.ATTENTION, quantize.quantize_model = real_att, real_qm
        layers.ATTENTION_IMPLS.pop("fp8-broken", None)
    real = quantize._quantize_kernel
    try:
        quantize._quantize_kernel = lambda v, q: (lambda qv, s: (qv, jnp.zeros_like(s)))(*real(v, q))
        out["zeroed"] = run("zeroed", "int8")
    finally:
        quantize._quantize_kernel = real
    return out, ckpt, root


# Measured (CPU, float32 compute, 4 DDIM steps, CFG 6, 9x64x64, the tiny model's 32-wide layers):
#   PSNR of frames / max relative error of final latents vs unquantized:
#   int8 34.87 dB / 0.0262, int8-weights 47.81 dB / 0.0039, fp8 24.68 dB / 0.105;
#   a quantizer that zeroes the weights: 7.92 dB / 0.644 (fails every bound).
#   fp8 on CPU runs its attention in float32 (no cuDNN; fp8-linears: the same, 24.70 dB / 0.105);
#   with the attention emulated in fp8 ("fp8-att") 25.41 dB / 0.0744: the attention's roundings
#   do not lower the PSNR of the linear layers' here (4 steps, 226 + 48 tokens); the emulated fp8
#   attention alone ("fp8-att-only", float32 linear layers) 41.21 dB / 0.0207; that emulation with
#   its probabilities at 1/64 of e4m3's range ("fp8-att-only-broken") 24.29 dB / 0.120 (fails).
BOUNDS = {"int8": (32.0, 0.04), "int8-weights": (44.0, 0.008), "fp8": (22.0, 0.15),  # (min PSNR dB, max rel err)
          "fp8-linears": (22.0, 0.15), "fp8-att": (23.0, 0.10), "fp8-att-only": (38.0, 0.03)}
BROKEN = {"zeroed": tuple(BOUNDS), "fp8-att-only-broken": ("fp8-att-only",)}  # runs that must fail these bounds


@pytest.mark.slow
def test_quantized_sampling_stays_close_to_unquantized_and_the_bound_can_fail(runs):
    out, _, _ = runs
    frames, z, _ = out["none"]
    measured = {m: (psnr(out[m][0], frames), rel_err(out[m][1], z)) for m in list(quantize.MODES) + list(
        BOUNDS) + list(BROKEN)}
    print("PSNR dB, latent max rel err:", measured)
    for mode, (min_psnr, max_err) in BOUNDS.items():
        p, e = measured[mode]
        assert p >= min_psnr and e <= max_err, (mode, p, e)
        assert e > 0  # the quantized layers ran
    for broken, bounds in BROKEN.items():
        p, e = measured[broken]
        assert not any(p >= BOUNDS[b][0] and e <= BOUNDS[b][1] for b in bounds), (broken, p, e)


def test_cli_sidecar_names_the_quantization(runs):
    out, _, _ = runs
    assert out["none"][2]["quantize"] is None
    for mode in quantize.MODES:
        assert out[mode][2]["quantize"] == mode


@pytest.mark.parametrize("bad", ["int4", "INT8", "fp16"])
def test_cli_refuses_a_bad_quantize_value_with_exit_2_and_writes_nothing(runs, bad, capsys):
    _, ckpt, root = runs
    out = root / f"bad_{bad}.npy"
    code = sample.main(["--checkpoint", str(ckpt), "--prompt", PROMPT, "--frames", "9", "--height", "64",
                        "--width", "64", "--steps", "1", "--out", str(out), "--quiet", "--quantize", bad])
    assert code == 2 and not out.exists()
    assert "--quantize" in capsys.readouterr().err


def test_int8_halves_the_5b_dit_weight_bytes():
    """The real CogVideoX-5B DiT (abstract: shapes only) in bf16 vs int8: kernels at 1 byte plus a
    float32 scale per output channel; norms, biases, the patch conv stay bf16. Measured: 11.14 GB
    -> 5.58 GB (ratio 0.501)."""
    import dataclasses

    from mm_jax import checkpoint
    from mm_jax.plan import Models

    cfg = dataclasses.replace(Models.real().transformer, dtype="bfloat16", param_dtype="bfloat16")
    bf16 = quantize.weight_bytes(checkpoint.abstract_model("transformer", cfg))
    int8 = quantize.weight_bytes(quantize.quantize_model(checkpoint.abstract_model("transformer", cfg), "int8"))
    fp8 = quantize.weight_bytes(quantize.quantize_model(checkpoint.abstract_model("transformer", cfg), "fp8"))
    print(f"5B DiT weights: bf16 {bf16 / 1e9:.2f} GB, int8 {int8 / 1e9:.2f} GB ({int8 / bf16:.3f})")
    assert 10e9 < bf16 < 12e9
    assert 0.48 < int8 / bf16 < 0.52 and fp8 == int8


def test_stacked_kernels_are_quantized_per_layer_and_output_channel():
    """A stacked (layers, in, out) kernel gets one scale per (layer, output channel), so a layer
    with 100x larger weights does not crush the others; it is stored transposed (layers, out, in);
    fp8 stores float8_e4m3fn, int8 int8; the quantized stack runs under lax.scan as the blocks do."""
    from flax import nnx

    from mm_jax.models import layers as L

    x = jax.random.normal(jax.random.key(1), (3, 5, 64))
    for mode, dt in (("int8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
        stack = L.stack(3, lambda r: L.linear(64, 8, rngs=r), nnx.Rngs(0))
        k = stack.kernel[...].at[1].multiply(100.0)
        stack.kernel.set_value(k)
        q = quantize.quantize_model(stack, mode)
        assert isinstance(q, quantize.QuantizedLinear)
        assert q.kernel[...].dtype == dt and q.kernel[...].shape == (3, 8, 64)
        assert q.kernel_scale[...].shape == (3, 8, 1)
        back = np.asarray(q.kernel[...].astype(jnp.float32) * q.kernel_scale[...]).transpose(0, 2, 1)
        tol = 0.01 if mode == "int8" else 0.07  # absmax rounding: 1/254 of the range (int8), 3 mantissa bits (fp8)
        for i in range(3):
            assert np.max(np.abs(back[i] - k[i])) <= tol * np.max(np.abs(k[i])), (mode, i)
        ys = jax.lax.scan(lambda c, lx: (c, lx[0](lx[1])), 0, (q, x))[1]
        ref = jnp.einsum("lbi,lio->lbo", x, k)
        assert float(jnp.max(jnp.abs(ys - ref)) / jnp.max(jnp.abs(ref))) < 2 * tol


# -- the planner ------------------------------------------------------------------------------

def test_plan_counts_the_quantized_linear_layers_at_the_int8_peak():
    """The tiny DiT's step for v5e-1, bf16 vs int8: the same FLOPs; in the int8 plan every XLA
    matmul but the patch convolution (kept in bf16) has int8 operands and counts at 394 TOPS,
    the splash attention at the 197 TFLOP/s bf16 peak."""
    from tests.tiny_plan import C_LAT, D, PATCH, plan_tiny as _plan

    bf, q = _plan("v5e-1", identity=False), _plan("v5e-1", identity=False, quantize="int8")
    cb, cq = bf.phases[0].compiled, q.phases[0].compiled
    assert cb is not None and cq is not None, (bf.phases[0].error, q.phases[0].error)
    assert cb.quantized_flops == 0 and cb.quantized is None
    assert cq.quantized == "int8" and abs(cq.flops - cb.flops) <= 0.01 * cb.flops
    b, n = 2, 3 * (8 // PATCH) * (8 // PATCH)          # CFG batch, video tokens of 9x64x64
    patch_conv = 2.0 * b * n * D * PATCH * PATCH * C_LAT
    assert abs(cq.quantized_flops - (cq.xla_flops - patch_conv)) <= 0.01 * cq.xla_flops
    want = (cq.flops - cq.quantized_flops) / 197e12 + cq.quantized_flops / 394e12
    assert q.ideal_seconds(q.phases[0]) == pytest.approx(want, rel=1e-9)
    assert q.ideal_seconds(q.phases[0]) < 0.75 * bf.ideal_seconds(bf.phases[0])
    assert q.to_json()["settings"]["quantize"] == "int8" and "linear layers int8" in q.phases[0].what


@pytest.mark.parametrize("args,message", [
    (["--target", "v5e-1", "--quantize", "fp8"], "target v5e-1 (TPU v5e) has no fp8 matmul peak in the table; it has int8"),
    (["--target", "a800-80x8", "--quantize", "fp8"], "target a800-80x8 (A800 SXM 80GB) has no fp8 matmul peak"),
    (["--target", "v2-8", "--quantize", "int8"], "target v2-8 (TPU v2) has no int8 matmul peak in the table; it has none"),
    (["--target", "v5e-1", "--quantize", "int4"], "--quantize='int4': choose from int8, fp8, int8-weights, fp8-linears"),
])
def test_plan_refuses_a_quantization_the_chip_has_no_peak_for_with_exit_2(args, message, capsys):
    from mm_jax.plan import __main__ as cli

    assert cli.main(args + ["--workload", "sample"]) == 2
    assert message in capsys.readouterr().err
