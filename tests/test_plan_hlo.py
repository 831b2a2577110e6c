"""mm_jax.plan's reading of compiled HLO (its HloModuleProto; HLO text through XLA's parser):
collectives per execution with their result bytes (the async TPU and GPU forms included), loop
bodies counted per iteration with the trip count derived from the loop, a conditional counted
once, by its most expensive branch, the attention kernels' calls, and XLA FLOPs of scanned
loops on real targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mm_jax.plan import aot, hlo, targets

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

HLO = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], bf16[4,128], f32[16])) -> (s32[], bf16[4,128], f32[16]) {
  %p = (s32[], bf16[4,128]{1,0}, f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = bf16[4,128]{1,0} get-tuple-element(%p), index=1
  %y = f32[16]{0} get-tuple-element(%p), index=2
  %ag = (bf16[4,128]{1,0}, bf16[8,128]{1,0}) all-gather-start(%x), dimensions={0}, replica_groups={{0,1}}
  %agd = bf16[8,128]{1,0} all-gather-done(%ag)
  %ar = f32[16]{0} all-reduce(%y), replica_groups={{0,1}}, to_apply=%add
  ROOT %t = (s32[], bf16[4,128]{1,0}, f32[16]{0}) tuple(%i, %x, %ar)
}

%cond (p: (s32[], bf16[4,128], f32[16])) -> pred[] {
  %p = (s32[], bf16[4,128]{1,0}, f32[16]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(1000)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: bf16[4,128], y: f32[16], z: f32[4,64], c: bf16[8,128]) -> bf16[8,128] {
  %a = bf16[4,128]{1,0} parameter(0)
  %y = f32[16]{0} parameter(1)
  %z = f32[4,64]{1,0} parameter(2)
  %c = bf16[8,128]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %t = (s32[], bf16[4,128]{1,0}, f32[16]{0}) tuple(%zero, %a, %y)
  %w = (s32[], bf16[4,128]{1,0}, f32[16]{0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"42"}}
  %rs = f32[2,64]{1,0} reduce-scatter(%z), dimensions={0}, replica_groups={{0,1}}, to_apply=%add
  ROOT %cp = bf16[8,128]{1,0} collective-permute(%c), source_target_pairs={{0,1}}
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
# fused), dots written as convolutions, splash kernels' custom calls named in their op_name
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
  %splash_mha_fwd.1 = (f32[2,128,128]{2,1,0}, bf16[2,2,128,128]{3,2,1,0}) custom-call(%gte.1), custom_call_target="tpu_custom_call", metadata={op_name="jit(f)/while/body/jit(mm_attention__splash__2_68_68_2_128__1)/splash_mha_fwd/pallas_call"}
  %ag = f32[16,256]{1,0} all-gather(%fusion.1), dimensions={0}, replica_groups={{0,1}}
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
    # a backward's dq and dkv kernels are one call
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


def test_a_conditional_counts_its_most_expensive_branch_once_not_every_branch():
    """lax.cond between one (8, 256) @ (256, 256) matmul and two, compiled for v5e-1: XLA keeps the
    conditional (the predicate is an argument) and one run executes one branch, so the count is
    the two-matmul branch's FLOPs, not the three matmuls of both branches."""
    mesh = aot.make_mesh(targets.get("v5e-1"))

    def f(p, x, a, b, c):
        return jax.lax.cond(p, lambda x: x @ a, lambda x: (x @ b) @ c, x)

    w = aot.replicated(mesh, (256, 256), jnp.float32)
    args = (aot.replicated(mesh, (), jnp.bool_), aot.replicated(mesh, (8, 256), jnp.float32), w, w, w)
    with jax.set_mesh(mesh):
        m = hlo.Module.of(jax.jit(f).trace(*args).lower().compile())
    one = 2 * 8 * 256 * 256
    assert [i.op for i, _ in m.executed() if i.op == "conditional"] == ["conditional"]
    assert m.flops() == 2 * one
    assert len(m.conditionals) == 1 and "the most FLOPs of 2 branches" in m.conditionals[0], m.conditionals


def test_counting_kernels_leaves_the_attention_registry_alone():
    from mm_jax.models import layers

    before = dict(layers.ATTENTION_IMPLS)
    with aot.counting_kernels():
        assert layers.ATTENTION_IMPLS == before
    assert layers.ATTENTION_IMPLS == before
