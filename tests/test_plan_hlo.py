"""mm_jax.plan's reading of compiled HLO: collectives per execution with their result bytes (the
async TPU and GPU forms included), loop bodies counted per iteration with the trip count derived
from the loop, the attention kernels' calls, and XLA FLOPs of scanned loops on real targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mm_jax.plan import aot, hlo, targets

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

HLO = """HloModule m

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %ag = (bf16[4,128]{1,0}, bf16[8,128]{1,0}) all-gather-start(bf16[4,128]{1,0} %x), dimensions={0}
  %agd = bf16[8,128]{1,0} all-gather-done(%ag)
  %ar = f32[16]{0} all-reduce(f32[16]{0} %y), to_apply=%add
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {
  %w = (s32[], bf16[8,128]) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"42"}}
  %rs = f32[2,64]{1,0} reduce-scatter(f32[4,64]{1,0} %z), dimensions={0}, to_apply=%add
  ROOT %cp = bf16[8,128]{1,0} collective-permute(bf16[8,128]{1,0} %a), source_target_pairs={{0,1}}
}
"""


def test_collectives_are_counted_per_execution_with_result_bytes_and_loop_trip_counts():
    got = aot.collectives(HLO)
    assert got == {"all-gather": {"count": 42, "bytes": 42 * 8 * 128 * 2}, "all-reduce": {"count": 42, "bytes": 42 * 64},
                   "reduce-scatter": {"count": 1, "bytes": 2 * 64 * 4}, "collective-permute": {"count": 1,
                                                                                             "bytes": 8 * 128 * 2}}


def test_a_tpu_async_permute_counts_its_result_not_its_context_scalars():
    """XLA:TPU writes (operand, result, u32[], u32[]) for collective-permute-start; the ring's
    transfers on TPU read as 0 MiB when the context scalars were taken for the result."""
    hlo = """HloModule t

ENTRY %main (p: bf16[2,1,1024,8,64]) -> bf16[2,1,1024,8,64] {
  %p = bf16[2,1,1024,8,64]{2,4,3,1,0:T(8,128)(2,1)} parameter(0)
  %cps = (bf16[2,1,1024,8,64]{2,4,3,1,0:T(8,128)(2,1)S(1)}, bf16[2,1,1024,8,64]{2,4,3,1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%p), channel_id=1, source_target_pairs={{0,1},{1,0}}
  ROOT %cpd = bf16[2,1,1024,8,64]{2,4,3,1,0:T(8,128)(2,1)} collective-permute-done(%cps)
}
"""
    assert aot.collectives(hlo) == {"collective-permute": {"count": 1, "bytes": 2 * 1024 * 8 * 64 * 2}}


# XLA:TPU's form: no known_trip_count on the loop (derived: i = 0; i < 5; i += 1, the compare
# fused), dots written as convolutions, a splash kernel's custom call printed over three lines
HLO_TPU = """HloModule t

%fused_conv (param_0: f32[8,256], param_1: bf16[256,256]) -> f32[8,256] {
  %param_0 = f32[8,256]{1,0:T(8,128)} parameter(0)
  %param_1 = bf16[256,256]{1,0:T(8,128)(2,1)} parameter(1)
  ROOT %convolution.5 = f32[8,256]{1,0:T(8,128)} convolution(%param_0, %param_1), dim_labels=bf_io->bf
}

%body (arg: (s32[], f32[8,256], bf16[256,256])) -> (s32[], f32[8,256], bf16[256,256]) {
  %arg = (s32[]{:T(128)}, f32[8,256]{1,0:T(8,128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) parameter(0)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%arg), index=0
  %copy.2 = s32[]{:T(128)S(6)} copy(%gte.0)
  %one = s32[]{:T(128)} constant(1)
  %add.2 = s32[]{:T(128)} add(%copy.2, %one)
  %gte.1 = f32[8,256]{1,0:T(8,128)} get-tuple-element(%arg), index=1
  %gte.2 = bf16[256,256]{1,0:T(8,128)(2,1)} get-tuple-element(%arg), index=2
  %fusion.1 = f32[8,256]{1,0:T(8,128)} fusion(%gte.1, %gte.2), kind=kOutput, calls=%fused_conv
  %splash_mha_fwd.1 = (f32[2,128,128]{2,1,0}, bf16[2,2,128,128]{3,2,1,0}) custom-call(%gte.1), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
"xprof_metadata":"{\\"block_q\\": 128}"
}}, metadata={op_name="jit(f)/while/body/jit(mm_attention__splash__2_68_68_2_128__1)/splash_mha_fwd/pallas_call"}
  %ag = f32[16,256]{1,0} all-gather(%fusion.1), dimensions={0}
  ROOT %tuple.1 = (s32[]{:T(128)}, f32[8,256]{1,0:T(8,128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) tuple(%add.2, %fusion.1, %gte.2)
}

%fused_compare (param_0.1: s32[]) -> pred[] {
  %param_0.1 = s32[] parameter(0)
  %five = s32[] constant(5)
  ROOT %lt = pred[] compare(%param_0.1, %five), direction=LT
}

%cond (arg.1: (s32[], f32[8,256], bf16[256,256])) -> pred[] {
  %arg.1 = (s32[]{:T(128)}, f32[8,256]{1,0:T(8,128)}, bf16[256,256]{1,0:T(8,128)(2,1)}) parameter(0)
  %gte.3 = s32[]{:T(128)} get-tuple-element(%arg.1), index=0
  ROOT %cmp = pred[] fusion(%gte.3), kind=kLoop, calls=%fused_compare
}

ENTRY %main (x: f32[8,256], w: bf16[256,256], v: f32[256,16], img: f32[1,4,4,3], k: f32[3,3,3,2]) -> f32[8,16] {
  %x = f32[8,256]{1,0} parameter(0)
  %w = bf16[256,256]{1,0} parameter(1)
  %v = f32[256,16]{1,0} parameter(2)
  %img = f32[1,4,4,3]{3,2,1,0} parameter(3)
  %k = f32[3,3,3,2]{3,2,1,0} parameter(4)
  %zero = s32[] constant(0)
  %i0 = s32[] copy(%zero)
  %t = (s32[], f32[8,256]{1,0}, bf16[256,256]{1,0}) tuple(%i0, %x, %w)
  %while.1 = (s32[], f32[8,256]{1,0}, bf16[256,256]{1,0}) while(%t), condition=%cond, body=%body
  %h = f32[8,256]{1,0} get-tuple-element(%while.1), index=1
  %conv = f32[1,4,4,2]{3,2,1,0} convolution(%img, %k), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f
  %splash_mha_dq.1 = bf16[2,2,128,128]{3,2,1,0} custom-call(%h), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/transpose(jvp())/jit(mm_attention__splash__2_68_68_2_128__1)/splash_mha_dq/pallas_call"}
  %splash_mha_dkv.1 = bf16[2,2,128,128]{3,2,1,0} custom-call(%h), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/transpose(jvp())/jit(mm_attention__splash__2_68_68_2_128__1)/splash_mha_dkv/pallas_call"}
  ROOT %dot = f32[8,16]{1,0} dot(%h, %v), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
"""


def test_hlo_counts_loop_bodies_per_iteration_with_the_trip_count_derived_from_the_loop():
    m = hlo.Module(HLO_TPU)
    assert m.trip_count(m.instrs["while.1"]) == 5 and not m.unknown_loops
    # the body's dot-as-convolution 5 times, the entry's dot once, the 3x3 "same" convolution
    # over 4x4 (10 of 12 window positions per axis land on the image): 3 in x 2 out x 100
    assert m.flops() == 5 * 2 * 8 * 256 * 256 + 2 * 8 * 16 * 256 + 2 * 3 * 2 * 100
    assert m.collectives() == {"all-gather": {"count": 5, "bytes": 5 * 16 * 256 * 4}}
    # the instruction after the three-line custom call is read; a backward's dq and dkv are one call
    assert m.kernel_calls(aot.MARK) == {("mm_attention__splash__2_68_68_2_128__1", "forward"): 5,
                                        ("mm_attention__splash__2_68_68_2_128__1", "backward"): 1}


def _scan_and_unrolled(target):
    """XLA FLOPs of 4 layers of (8, 256) @ (256, 256) under lax.scan and unrolled."""
    t = targets.get(target)
    mesh = aot.make_mesh(t)

    def scanned(x, w):
        return jax.lax.scan(lambda x, w: (jnp.tanh(x @ w), None), x, w)[0]

    def unrolled(x, w):
        for i in range(w.shape[0]):
            x = jnp.tanh(x @ w[i])
        return x

    args = (aot.replicated(mesh, (8, 256), jnp.float32), aot.replicated(mesh, (4, 256, 256), jnp.float32))
    return [aot.compile(jax.jit(f), args, mesh).xla_flops for f in (scanned, unrolled)]


@pytest.mark.parametrize("target", ["v5e-1", "h100x1"])
def test_xla_flops_count_every_iteration_of_a_scanned_loop(target):
    if targets.get(target).is_gpu and not targets.cuda_plugin_installed():
        pytest.skip("the CUDA plugin is not installed (pip install -e '.[cuda12]'); this path did not run")
    scanned, unrolled = _scan_and_unrolled(target)
    want = 4 * 2 * 8 * 256 * 256
    assert abs(scanned - unrolled) <= 0.01 * unrolled and abs(unrolled - want) <= 0.01 * want, (scanned, unrolled)
