"""mm_jax.plan's compiled numbers: the sampler's and the trainer's own jitted functions compiled for
TPU topologies (libtpu, the test extra) and an NVIDIA target (the CUDA plugin, the cuda12 extra)
from abstract shapes, on tiny configs (tests/tiny_plan.py); argument bytes checked against the
sharded parameters, FLOPs against an analytic count, kernel calls against the model's calls."""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
import pytest
from flax import nnx

from mm_jax import checkpoint
from mm_jax import plan as planner
from mm_jax.models.t5 import T5Config
from mm_jax.plan import aot, targets
from tests.tiny_plan import C_LAT, D, DH, HEADS, PATCH, SAMPLE, T_EMB, T_TEXT, plan_tiny, sharded_bytes, tiny_models

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

MESHES = [("v5e-1", None), ("v5e-4", "fsdp=2,tensor=2")]


def test_text_encoder_on_two_slices_holds_the_one_slice_parameter_shards_per_device():
    """One cheap compile over 2 x v5e-4 (mesh fsdp=2,tensor=2 in each slice, data=2 across): the T5
    parameters are split as in one slice and replicated across the slices, so each device's
    argument bytes are its fsdp x tensor shard plus the token ids, as on one slice."""
    p = planner.plan("v5e-4", "sample", mesh="fsdp=2,tensor=2", mesh_dcn="data=2", models=tiny_models(),
                     only=("text_encoder",), sample=dataclasses.replace(SAMPLE, max_sequence_length=128, dtype="float32"))
    c = p.phases[0].compiled
    assert c is not None, p.phases[0].error
    assert (p.mesh, p.mesh_dcn, p.slices) == ("data=2,fsdp=2,context=1,tensor=2", "data=2", 2)
    assert p.text().startswith("sample on 2 x v5e-4: 2 slices of 4 x TPU v5e")
    assert p.to_json()["mesh_dcn"] == "data=2" and p.to_json()["slices"] == 2
    cfg = dataclasses.replace(tiny_models().text_encoder, dtype="float32")
    two = checkpoint.abstract_model("text_encoder", cfg, aot.make_mesh(targets.get("v5e-4"), "fsdp=2,tensor=2",
                                                                       dcn="data=2"))
    one = checkpoint.abstract_model("text_encoder", cfg, aot.make_mesh(targets.get("v5e-4"), "fsdp=2,tensor=2"))
    assert sharded_bytes(two) == sharded_bytes(one)
    assert c.argument_bytes == sharded_bytes(two) + 2 * 128 * 4  # + [negative, positive] x 128 int32 token ids


# -- compiled numbers -------------------------------------------------------------------------

@pytest.mark.parametrize("target,mesh", MESHES)
def test_text_encoder_argument_bytes_equal_the_sharded_t5_parameters_plus_the_token_ids(target, mesh):
    p = planner.plan(target, "sample", mesh=mesh, models=tiny_models(), only=("text_encoder",),
                     sample=dataclasses.replace(SAMPLE, max_sequence_length=128, dtype="float32"))
    c = p.phases[0].compiled
    assert c is not None, p.phases[0].error
    m = aot.make_mesh(targets.get(target), mesh)
    t5 = checkpoint.abstract_model("text_encoder", dataclasses.replace(tiny_models().text_encoder, dtype="float32"), m)
    params = sharded_bytes(t5)
    total = sum(math.prod(x.shape) * 4 for x in jax.tree.leaves(nnx.state(t5, nnx.Param)))
    ids = 2 * 128 * 4  # CFG: [negative, positive] x 128 int32 token ids, replicated
    assert c.argument_bytes == params + ids
    if mesh:  # the FF kernels, q/k/v/o and the embedding are split 4 ways, norms replicated
        assert params < total / 2
    assert c.peak_bytes < targets.get(target).hbm_bytes and p.fits(p.phases[0])


def _analytic_denoise_flops(b=2, text=16, frames=3, h=8, w=8, face=4, adapter_blocks=1, blocks=2) -> float:
    """Matmul and attention FLOPs of one CFG denoising step of the tiny DiT + adapter (2 per
    multiply-add), from the architecture: patch and text projections, time embedding, per block
    two AdaLN linears, q/k/v/out, attention (4 B H S^2 Dh), the 4x feed-forward; adapter blocks add
    the face tokens to the joint sequence, which every block then carries (the plain blocks hide
    them from their keys by key length) and one CAN linear (14 D) each; then Linear_id, norm_out,
    proj_out."""
    n = frames * (h // PATCH) * (w // PATCH)
    f = 2 * b * n * (PATCH * PATCH * C_LAT) * D + 2 * b * text * T_TEXT * D     # patch embed, text proj
    f += 2 * b * D * T_EMB + 2 * b * T_EMB * T_EMB                                # time embedding
    for i in range(blocks):
        s = text + n + (face if adapter_blocks else 0)
        f += 2 * (2 * b * T_EMB * 6 * D)                                          # norm1, norm2 linears
        f += 4 * (2 * b * s * D * D)                                               # q, k, v, out
        f += 4 * b * HEADS * s * s * DH                                            # QK^T, PV
        f += 2 * (2 * b * s * D * 4 * D)                                           # feed-forward
        if i < adapter_blocks:
            f += 2 * b * T_EMB * 14 * D                                            # CAN
    f += 2 * b * T_TEXT * T_EMB                                                    # Linear_id
    f += 2 * b * T_EMB * 2 * D + 2 * b * n * D * PATCH * PATCH * C_LAT             # norm_out, proj_out
    return float(f)


@pytest.fixture(scope="module")
def denoise_v5e_1():
    """The tiny denoising step planned for one v5e chip, compiled once for the two tests that read it."""
    return plan_tiny("v5e-1")


def test_denoise_flops_are_within_5_percent_of_the_analytic_count_with_the_splash_kernel_counted(denoise_v5e_1):
    p = denoise_v5e_1
    c = p.phases[0].compiled
    assert c is not None, p.phases[0].error
    want = _analytic_denoise_flops()
    assert abs(c.flops - want) <= 0.05 * want, (c.flops, c.xla_flops, c.kernel_flops, want)
    # the kernels XLA does not count: one splash call per block over [text, video, face]
    assert c.kernels == {"splash forward B2 S68 T68 N2 Dh128 /1": 2}
    assert c.kernel_flops == 4 * 2 * HEADS * DH * (68 ** 2 + 68 ** 2)
    assert c.xla_flops < want  # XLA alone misses the attention


def test_the_identity_step_compiles_with_splash_on_a_2x2_mesh_with_tensor_2_and_splits_its_work(denoise_v5e_1):
    one, four = denoise_v5e_1, plan_tiny("v5e-4", mesh="fsdp=2,tensor=2")
    c1, c4 = one.phases[0].compiled, four.phases[0].compiled
    assert c4 is not None, four.phases[0].error
    # each device's kernel call (inside attention_parallel's shard_map) takes its shard:
    # batch over fsdp, heads over tensor
    assert c4.kernels == {"splash forward B1 S68 T68 N1 Dh128 /1": 2}, c4.kernels
    assert c4.kernel_flops == c1.kernel_flops / 4
    assert c4.argument_bytes < c1.argument_bytes and c4.collectives  # sharded weights need collectives
    assert four.mesh == "data=1,fsdp=2,context=1,tensor=2"


def test_train_step_counts_each_kernel_call_with_its_remat_recompute_and_backward():
    """The kernel calls of the compiled step, scanned DiT blocks counted per iteration: each DiT
    block (all carry the face tokens: S = 16 text + 48 video + 4 face) one forward and one
    backward, plus the forward remat "full" recomputes in the backward pass; each adapter
    perceiver one forward and one backward. 4 blocks, so the scanned DiT stays a loop (of 2 groups
    of [adapter block, plain block]): XLA inlines a loop of one iteration, and then merges the
    remat recompute with the forward it repeats. The unrolled DiT compiles to the same calls and
    the same XLA FLOPs."""
    def step(scan):  # ~40 s a compile: remat "none" (one forward per block) is left out
        train = planner.TrainSettings(batch=2, frames=9, height=64, width=64, text_length=16, precomputed="all",
                                      remat="full")
        p = planner.plan("v5e-1", "train-video", models=tiny_models(layers=4).with_dit({"scan_layers": scan}),
                         train=train)
        assert p.phases[0].compiled is not None, p.phases[0].error
        return p.phases[0].compiled

    scanned, unrolled = step("true"), step("false")
    want = {"splash forward B2 S68 T68 N2 Dh128 /1": 2 * 4, "splash backward B2 S68 T68 N2 Dh128 /1": 4,
            "splash forward B2 S2 T259 N2 Dh16 /1": 1, "splash backward B2 S2 T259 N2 Dh16 /1": 1,
            "splash forward B2 S4 T261 N2 Dh16 /1": 1, "splash backward B2 S4 T261 N2 Dh16 /1": 1}
    assert scanned.kernels == unrolled.kernels == want, (scanned.kernels, unrolled.kernels)
    assert scanned.kernel_flops == unrolled.kernel_flops
    assert abs(scanned.xla_flops - unrolled.xla_flops) <= 0.01 * unrolled.xla_flops, (scanned.xla_flops,
                                                                                       unrolled.xla_flops)
    assert not scanned.uncounted
    assert scanned.alias_bytes > 0  # the adapter's params and optimizer state are donated
    c = scanned
    assert c.peak_bytes == c.argument_bytes + c.output_bytes + c.temp_bytes - c.alias_bytes


def test_identity_step_compiles_with_cudnn_for_an_h100():
    """Needs the CUDA plugin (the cuda12 extra, not installed by the test extra: 3.2 GB of wheels).
    Fails until the DiT's identity attention compiles on cuDNN (today: "Bias must have same seq
    length as QKV, got 1 and ..." from the CFG batch's (B, 1, 1, T) key mask)."""
    if not targets.cuda_plugin_installed():
        pytest.skip("the CUDA plugin is not installed (pip install -e '.[cuda12]'); this path did not run")
    print("compiling for h100x1 with the CUDA plugin")
    plain = plan_tiny("h100x1", identity=False)
    c = plain.phases[0].compiled
    assert c is not None, plain.phases[0].error
    assert c.kernels == {"cudnn forward B2 S64 T64 N2 Dh128 /1": 2}
    # XLA FLOPs from the optimized HLO, the scanned blocks' loop body counted per iteration
    want = _analytic_denoise_flops(adapter_blocks=0)
    assert abs(c.flops - want) <= 0.05 * want, (c.flops, c.xla_flops, c.kernel_flops, want)
    ident = plan_tiny("h100x1")
    assert ident.phases[0].compiled is not None, ident.phases[0].error


# -- the sampler's switch the plan advises ----------------------------------------------------

def test_text_encoder_on_host_gives_the_same_embeddings(tmp_path):
    """On this CPU-only machine both paths use the CPU device: this checks the switch's plumbing."""
    from mm_jax import pipeline
    from mm_jax.demo.tiny_checkpoint import build_tokenizer
    from mm_jax.models.t5 import T5Encoder

    tok = build_tokenizer(tmp_path / "tokenizer")
    t5 = T5Encoder(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1),
                   rngs=nnx.Rngs(0))
    checkpoint.save_module(tmp_path, "text_encoder", t5)
    prompts = ["", "a man is walking on the beach at sunset"]
    dev = pipeline.prompt_embeddings(tmp_path, prompts, max_length=32)
    host = pipeline.prompt_embeddings(tmp_path, prompts, max_length=32, on_host=True)
    assert dev.shape == (2, 32, 32)
    np.testing.assert_array_equal(dev, host)
