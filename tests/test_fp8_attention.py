"""fp8 attention (``mm_jax.models.fp8_attention``, ``--quantize fp8``): the emulation of cuDNN's fp8
kernel rounds q, k, v, the probabilities and the output to e4m3 and stays within a measured bound
of exact attention; mode fp8 switches the DiT's self-attention to it and fp8-linears does not;
where the kernel cannot run the call says so once and runs the bf16 path; the planner compiles
the kernel for an H100 and counts its FLOPs at the fp8 peak (needs the CUDA plugin).

The deviation of whole sampled videos (final latents and frames, the tiny pipeline, the same noise)
is bounded in tests/test_quantize.py (run "fp8-att")."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mm_jax.models import fp8_attention as F
from mm_jax.models import layers, quantize
from mm_jax.plan import targets


def _qkv(s=300, n=4, dh=64, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (2, s, n, dh)) for k in (k1, k2, k3))


def test_per_tensor_quantization_uses_the_whole_e4m3_range():
    x = jnp.array([[-3.0, 0.5], [1e-3, 1.5]])
    x8, descale = F.quantize_per_tensor(x)
    assert x8.dtype == jnp.float8_e4m3fn and float(jnp.max(jnp.abs(x8.astype(jnp.float32)))) == 448.0
    np.testing.assert_allclose(np.asarray(x8.astype(jnp.float32) * descale), np.asarray(x), rtol=2 ** -4)


def test_reference_rounds_the_output_to_e4m3_and_stays_close_to_exact_attention():
    """Random q, k, v (2 x 300 tokens x 4 heads x 64): the emulated fp8 attention's output times
    scale_o (224 / amax v) is e4m3-representable, and its relative RMS error against exact float32
    attention is 0.0585 (normalized-probability rounding: 0.0599), bounded at 0.08; attention with
    only q, k, v rounded (no probability or output rounding) is closer still (the roundings after
    the inputs add error)."""
    q, k, v = _qkv()
    exact = jax.nn.dot_product_attention(q, k, v, implementation="xla")
    rms = lambda a: float(jnp.sqrt(jnp.mean((a - exact) ** 2)) / jnp.sqrt(jnp.mean(exact ** 2)))  # noqa: E731
    out = F.reference_fp8_attention(q, k, v, block_q=128)
    scale_o = F.E4M3_MAX / F.O_HEADROOM / jnp.max(jnp.abs(v))
    scaled = out * scale_o
    np.testing.assert_allclose(np.asarray(scaled.astype(jnp.float8_e4m3fn).astype(jnp.float32)), np.asarray(scaled),
                               rtol=1e-5)
    deq = lambda t: F.quantize_per_tensor(t)[0].astype(jnp.float32) * F.quantize_per_tensor(t)[1]  # noqa: E731
    inputs_only = jax.nn.dot_product_attention(deq(q), deq(k), deq(v), implementation="xla")
    err, err_norm, err_in = rms(out), rms(F.reference_fp8_attention(q, k, v, normalized=True)), rms(inputs_only)
    print(f"relative RMS vs exact: flash-form {err:.4f}, normalized {err_norm:.4f}, inputs only {err_in:.4f}")
    assert err <= 0.08 and err_norm <= 0.08
    assert err_in < err
    # query blocks do not change the numbers (each block sees every key)
    np.testing.assert_allclose(np.asarray(F.reference_fp8_attention(q, k, v, block_q=64)), np.asarray(out), atol=1e-6)


def _tiny_dit(attention_impl=None):
    """A tiny DiT, abstract (shapes only: quantize_model works on those as the planner's)."""
    from mm_jax import checkpoint
    from mm_jax.models.dit import DiTConfig

    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32,
                    time_embed_dim=16, in_channels=4, out_channels=4, sample_frames=5, sample_height=8,
                    sample_width=8, attention_impl=attention_impl)
    return checkpoint.abstract_model("transformer", cfg)


def _impls(model):
    return {"/".join(map(str, p)): m.impl for p, m in nnx.iter_modules(model) if hasattr(m, "impl")}


def test_fp8_mode_switches_the_dit_self_attention_and_fp8_linears_keeps_it():
    fp8 = quantize.quantize_model(_tiny_dit(), "fp8")
    assert _impls(fp8) == {"transformer_blocks/attn1": "cudnn-fp8"}
    assert quantize.quantized_mode(fp8) == "fp8"
    lin = quantize.quantize_model(_tiny_dit(), "fp8-linears")
    assert _impls(lin) == {"transformer_blocks/attn1": None} and quantize.quantized_mode(lin) == "fp8-linears"
    # an explicit other kernel is kept; the bf16 cuDNN one is the one fp8 replaces
    assert _impls(quantize.quantize_model(_tiny_dit("chunked"), "fp8")) == {"transformer_blocks/attn1": "chunked"}
    assert _impls(quantize.quantize_model(_tiny_dit("cudnn"), "fp8")) == {"transformer_blocks/attn1": "cudnn-fp8"}
    assert _impls(quantize.quantize_model(_tiny_dit(), "int8")) == {"transformer_blocks/attn1": None}


def test_cudnn_fp8_on_cpu_runs_the_default_kernel_and_says_so_once():
    q, k, v = _qkv(s=40, n=2, dh=16)
    F._WARNED.clear()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        a = layers.attention(q, k, v, implementation="cudnn-fp8")
        layers.attention(q, k, v, kv_lengths=jnp.array([30, 40]), implementation="cudnn-fp8")
        layers.attention(q, k, v, kv_lengths=jnp.array([30, 40]), implementation="fp8-reference")
    msgs = [str(x.message) for x in w]
    assert msgs == ["attention: cuDNN's fp8 attention runs on NVIDIA GPUs (H100) only, not cpu; these calls run the "
                    "'chunked' kernel in the compute dtype instead"], msgs
    np.testing.assert_array_equal(np.asarray(a), np.asarray(layers.attention(q, k, v, implementation="chunked")))


def test_hidden_keys_through_the_extra_value_channel_equal_masked_attention():
    """Key lengths (70 of 100 keys for row 0, all for row 1) without a mask in the kernel: the hidden
    keys' k and v zeroed, their mass read from one more value channel (head dim 64 -> 80). With exact
    attention as the kernel it equals masked attention (relative RMS 1.2e-7 measured, bound 1e-5); with
    the fp8 emulation the relative RMS error vs exact masked attention is 0.0563, bounded at 0.08; a
    kernel whose extra channel reads 0 (the hidden keys' mass ignored) is off by 0.151."""
    q, k, v = _qkv(s=100)
    lengths = jnp.array([70, 100])
    hidden = ~layers.lengths_mask(lengths, 100)
    exact = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
    rms = lambda a: float(jnp.sqrt(jnp.mean((a - exact) ** 2)) / jnp.sqrt(jnp.mean(exact ** 2)))  # noqa: E731
    def plain(q, k, v, scale):
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="xla")
    assert F.padded_head_dim(64) == 80
    via_channel = F.with_hidden_keys(plain, q, k, v, hidden)
    assert rms(via_channel) < 1e-5, rms(via_channel)
    fp8 = layers.attention(q, k, v, kv_lengths=lengths, implementation="fp8-reference")
    np.testing.assert_allclose(np.asarray(fp8), np.asarray(F.reference_fp8_attention(q, k, v, None, hidden)))
    wrong = F.with_hidden_keys(lambda *a: plain(*a).at[..., 64].set(0.0), q, k, v, hidden)
    print(f"relative RMS vs exact masked: channel {rms(via_channel):.2e}, fp8 {rms(fp8):.4f}, wrong {rms(wrong):.4f}")
    assert rms(fp8) <= 0.08 and rms(wrong) > 0.08


@pytest.mark.slow
def test_h100_sample_plan_compiles_the_fp8_attention_kernel_and_counts_it_at_the_fp8_peak():
    """Needs the CUDA plugin (the cuda12 extra). The tiny DiT's denoising step for h100x1 with
    --quantize fp8: the compiled HLO holds cuDNN's fp8 custom call, its FLOPs are the bf16 cuDNN
    kernel's (the same shapes) and count at the 1979 TOPS fp8 peak with the fp8 linear layers; with
    the adapter's key lengths it compiles too, on the padded head dim."""
    if not targets.cuda_plugin_installed():
        pytest.skip("the CUDA plugin is not installed (pip install -e '.[cuda12]'); this path did not run")
    from tests.tiny_plan import plan_tiny

    bf, lin, fp8 = (plan_tiny("h100x1", identity=False, quantize=m) for m in (None, "fp8-linears", "fp8"))
    cb, cl, cq = (p.phases[0].compiled for p in (bf, lin, fp8))
    assert cb is not None and cl is not None and cq is not None, [p.phases[0].error for p in (bf, lin, fp8)]
    [(name, calls)] = cq.kernels.items()
    assert name.startswith("cudnn-fp8 forward") and calls == 2
    assert cq.kernel_targets == {"__cudnn$fmhaSoftmaxF8": 2}, cq.kernel_targets  # the fp8 custom call in the HLO
    assert cl.kernel_targets == {"__cudnn$fmhaSoftmax": 2}, cl.kernel_targets
    assert list(cl.kernels) == [name.replace("cudnn-fp8", "cudnn")]
    assert cq.quantized == "fp8" and cq.quantized_kernel_flops == cb.kernel_flops > 0
    assert cq.quantized_flops == pytest.approx(cl.quantized_flops + cq.kernel_flops, rel=1e-9)
    want = (cq.flops - cq.quantized_flops) / 989e12 + cq.quantized_flops / 1979e12
    assert fp8.ideal_seconds(fp8.phases[0]) == pytest.approx(want, rel=1e-9)
    assert fp8.ideal_seconds(fp8.phases[0]) < lin.ideal_seconds(lin.phases[0]) < bf.ideal_seconds(bf.phases[0])
    assert "attention cudnn-fp8" in fp8.phases[0].what and "attention cudnn;" in lin.phases[0].what
    # with the adapter the CFG batch hides the identity tokens from the negative row (key lengths):
    # the fp8 call takes one more value channel, Dh 128 -> 144, and is counted so
    ident = plan_tiny("h100x1", quantize="fp8").phases[0].compiled
    assert ident is not None and ident.kernel_targets == {"__cudnn$fmhaSoftmaxF8": 2}, ident
    [name] = ident.kernels
    assert name.startswith("cudnn-fp8 forward") and "Dh144 " in name, name


def test_sharded_fp8_attention_per_shard_with_and_without_key_lengths():
    """On 4 fake CPU devices (context=2 x tensor=2, Ulysses) ``layers.attention`` runs the fp8
    emulation per shard in shard_map, each shard with its own scales: within 0.08 relative RMS of
    exact attention (0.0569 unmasked / 0.0563 masked measured), and an unmasked call takes no extra value channel
    (``with_hidden_keys`` is not called) while a call with key lengths does."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import ROOT, fake_devices_env

    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from mm_jax import parallel
        from mm_jax.models import fp8_attention as F, layers
        from tests.test_fp8_attention import _qkv
        calls = []
        real = F.with_hidden_keys
        F.with_hidden_keys = lambda *a: calls.append(1) or real(*a)
        q, k, v = _qkv(s=64)
        lengths = jnp.array([64, 50], jnp.int32)
        rms = lambda a, e: float(jnp.sqrt(jnp.mean((a - e) ** 2)) / jnp.sqrt(jnp.mean(e ** 2)))
        with jax.set_mesh(parallel.make_mesh("context=2,tensor=2")):
            att = jax.jit(lambda q, k, v, n: layers.attention(q, k, v, kv_lengths=n, implementation="fp8-reference"))
            full = jax.jit(lambda q, k, v: layers.attention(q, k, v, implementation="fp8-reference"))(q, k, v)
            plain_calls = len(calls)
            masked = att(q, k, v, lengths)
        exact_full = jax.nn.dot_product_attention(q, k, v, implementation="xla")
        exact_masked = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="xla")
        print(plain_calls, len(calls) > plain_calls, rms(full, exact_full), rms(masked, exact_masked))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=fake_devices_env(4))
    assert out.returncode == 0, out.stderr[-3000:]
    plain_calls, masked_used, err_full, err_masked = out.stdout.strip().splitlines()[-1].split()
    print(f"relative RMS: unmasked {err_full}, masked {err_masked}")
    assert plain_calls == "0" and masked_used == "True"
    assert float(err_full) <= 0.08 and float(err_masked) <= 0.08
