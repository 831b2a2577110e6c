"""mm_jax.plan: the sampler's and the trainer's own jitted functions compiled for TPU topologies
(libtpu, the test extra) and NVIDIA targets (the CUDA plugin, the cuda12 extra) from abstract
shapes, on tiny configs; the numbers checked against the models' shapes and an analytic count.

Tiny sizes are chosen so every parameter fills whole TPU tiles ((8, 128) for 32-bit types, whole
128-lane rows on the 2x2 mesh too): XLA:TPU stores an array padded to its tiles, and with whole
tiles the compiler's argument bytes must equal the bytes of the parameters as sharded, exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from mm_jax import checkpoint
from mm_jax import plan as planner
from mm_jax.demo.tiny_checkpoint import SCHEDULER
from mm_jax.models.clip_vision import CLIPVisionConfig
from mm_jax.models.dit import DiTConfig
from mm_jax.models.t5 import T5Config
from mm_jax.models.vae import VAEConfig
from mm_jax.plan import __main__ as cli
from mm_jax.plan import aot, report, targets
from mm_jax.training.models import adapter_config

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

GIB = 1024 ** 3
D, HEADS, DH, T_EMB, T_TEXT = 256, 2, 128, 128, 256   # DiT width = HEADS * DH; T_TEXT = the T5 width
PATCH, C_LAT = 2, 16


def tiny_models(layers: int = 2) -> planner.Models:
    dit = DiTConfig(num_attention_heads=HEADS, attention_head_dim=DH, in_channels=C_LAT, out_channels=C_LAT,
                    num_layers=layers, patch_size=PATCH, text_embed_dim=T_TEXT, time_embed_dim=T_EMB,
                    sample_width=8, sample_height=8, sample_frames=9)
    t5 = T5Config(vocab_size=256, d_model=T_TEXT, d_kv=1, num_heads=256, d_ff=512, num_layers=2)
    vae = VAEConfig(latent_channels=C_LAT, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                    sample_height=64, sample_width=64)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    adapter = adapter_config(dit, 32, dict(width=32, depth=1, heads=2, head_dim=16, num_face_tokens=4, num_id_tokens=2,
                                           id_mlp_hidden=32), "float32")
    return planner.Models(dit, vae, t5, clip, SCHEDULER, adapter, "tiny")


SAMPLE = planner.SampleSettings(frames=9, height=64, width=64, steps=4, max_sequence_length=16)
MESHES = [("v5e-1", None), ("v5e-4", "fsdp=2,tensor=2")]


def _plan(target, workload="sample", mesh=None, only=("denoise",), **settings):
    sample = dataclasses.replace(SAMPLE, **settings) if workload == "sample" else None
    train = (planner.TrainSettings(batch=2, frames=9, height=64, width=64, text_length=16, **settings)
             if workload != "sample" else None)
    return planner.plan(target, workload, mesh=mesh, models=tiny_models(), sample=sample, train=train, only=only)


def _sharded_bytes(module) -> int:
    """Per-device bytes of a module's parameters as the mesh splits them (shape / shards x itemsize)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# -- targets ----------------------------------------------------------------------------------

def test_the_target_table_has_every_machine_the_users_run_with_devices_memory_and_peak():
    need = {"v2-8", "v5e-1", "v5e-8", "v6e-1", "v6e-8", "v5p-8", "v5p-32", "v4-8", "h100x1", "h100x8", "a100-80x8",
            "a800-80x8"}
    assert need <= set(targets.TARGETS)
    t = targets.TARGETS
    # chips per name: v5e/v6e names count chips, v4/v5p names count TensorCores (2 per megacore chip)
    assert [t[n].devices for n in ("v5e-1", "v5e-8", "v6e-8", "v4-8", "v5p-8", "v5p-32", "h100x8")] == [1, 8, 8, 4, 4,
                                                                                                          16, 8]
    assert t["v5e-1"].hbm_bytes == 16 * GIB and t["v5e-1"].peak_flops == 197e12
    # v2-8 (Colab): 4 chips of two TensorCores, each a JAX device of 8 GiB and half the chip's 45 TFLOP/s
    assert t["v2-8"].devices == 8 and t["v2-8"].hbm_bytes == 8 * GIB and t["v2-8"].peak_flops == 22.5e12
    assert t["a800-80x8"].peak_flops == t["a100-80x8"].peak_flops == 312e12
    assert "| `v5p-32` | 16 x TPU v5p |" in targets.table_markdown()


@pytest.mark.parametrize("name", [n for n, t in targets.TARGETS.items() if not t.is_gpu])
def test_each_tpu_target_compiles_for_the_device_count_and_host_memory_its_row_says(name):
    t = targets.TARGETS[name]
    devs = targets.devices(t)  # raises if libtpu's topology has another device count
    assert len(devs) == t.devices
    kinds = {m.kind for m in devs[0].addressable_memories()}
    assert ("pinned_host" in kinds) == t.host_offload
    assert targets.for_devices(devs) is t  # what the notebook plans for on the attached chips


def test_tpu_v2_takes_the_chunked_attention_because_its_mosaic_refuses_splash():
    """Compiled for v2-8, splash failed: "Mosaic failed to compile TPU kernel: E2001:
    CompileTimeMosaicUnsupportedRhsType ... vector<128x128xbf16>"; the models and the planner
    pick the chunked XLA attention there and splash from v4 on."""
    from jax.sharding import Mesh

    from mm_jax.models import layers

    for name, want in (("v2-8", "chunked"), ("v5e-8", "splash")):
        mesh = Mesh(np.array(targets.devices(targets.TARGETS[name])), ("data",))
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            assert layers.default_attention_impl() == want, name
        assert layers.default_attention_impl("tpu", targets.TARGETS[name].kind) == want


# -- meshes: the run's make_mesh, on the target's chips --------------------------------------

def _ids(mesh_or_array) -> list[int]:
    return [d.id for d in np.asarray(getattr(mesh_or_array, "devices", mesh_or_array)).flat]


def test_tpu_meshes_follow_the_chips_where_nothing_else_imported_mesh_utils(monkeypatch):
    """The run's path: nothing but mm_jax.parallel imported jax.experimental.mesh_utils (the planner's
    topologies import used to hide that make_mesh never could). v5e-8's 2x4 chips on data=2,fsdp=4
    and v5p-32's 2x2x4 on fsdp=4,tensor=4: the device order is create_device_mesh's (a ring, the
    tensor axis on a 2x2 plane), not the plain order, and the planner's mesh is the same."""
    from jax.experimental import mesh_utils

    from mm_jax import parallel

    monkeypatch.delattr(jax.experimental, "mesh_utils")
    for name, spec, sizes in (("v5e-8", "data=2,fsdp=4", (2, 4, 1, 1)), ("v5p-32", "fsdp=4,tensor=4", (1, 4, 1, 4))):
        devs = targets.devices(targets.get(name))
        run = parallel.make_mesh(spec, devs)
        want = _ids(mesh_utils.create_device_mesh(sizes, devs))
        assert _ids(run) == want != [d.id for d in devs], name
        assert _ids(aot.make_mesh(targets.get(name), spec, workload="train-image")) == want, name


def test_a_tpu_mesh_off_the_torus_axes_splits_a_physical_axis_and_warns_once(monkeypatch):
    """fsdp=2,context=2,tensor=4 on v5p-32 (2x2x4 chips): tensor takes a 2x2 plane, so 2 x 2 must split
    the 4-chip axis; mesh_utils refuses that (NotImplementedError) unless told to split. make_mesh
    splits it, by topology (not the plain order), and warns once for that kind and shape."""
    import warnings

    from jax.experimental import mesh_utils

    from mm_jax import parallel

    monkeypatch.setattr(parallel, "_SPLIT_WARNED", set())
    devs = targets.devices(targets.get("v5p-32"))
    with pytest.raises(NotImplementedError):
        mesh_utils.create_device_mesh((1, 2, 2, 4), devs)
    with pytest.warns(UserWarning, match=r"mesh data=1,fsdp=2,context=2,tensor=4 on 16 x TPU v5 \(chips 2x2x4\): an "
                                         r"axis size is not a product of whole physical torus axes"):
        mesh = parallel.make_mesh("fsdp=2,context=2,tensor=4", devs)
    want = _ids(mesh_utils.create_device_mesh((1, 2, 2, 4), devs, allow_split_physical_axes=True))
    assert _ids(mesh) == want != [d.id for d in devs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ids(parallel.make_mesh("fsdp=2,context=2,tensor=4", devs)) == want


def test_two_slices_with_dcn_data_2_put_one_slice_on_each_data_index():
    """2 x v5e-8 (libtpu's num_slices=2; devices carry slice_index): mesh fsdp=8 with dcn data=2 is
    data=2,fsdp=8, data index i holds slice i in that slice's own create_device_mesh order; the
    planner builds the same; without dcn, or with a dcn of another slice count, it is refused."""
    from jax.experimental import mesh_utils

    from mm_jax import parallel

    t = targets.get("v5e-8")
    devs = targets.devices(t, slices=2)
    mesh = parallel.make_mesh("fsdp=8", devs, dcn="data=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 8, "context": 1, "tensor": 1}
    for i in range(2):
        assert {d.slice_index for d in mesh.devices[i].flat} == {i}
        mine = [d for d in devs if d.slice_index == i]
        assert _ids(mesh.devices[i]) == _ids(mesh_utils.create_device_mesh((1, 8, 1, 1), mine)) != [d.id for d in mine]
    assert _ids(aot.make_mesh(t, "fsdp=8", workload="train-image", dcn="data=2")) == _ids(mesh)
    with pytest.raises(ValueError, match=r"the 16 devices span 2 slices \(device.slice_index\): give the mesh's axes "
                                         r"across slices, dcn / config mesh_dcn, e.g. \"data=2\""):
        parallel.make_mesh("fsdp=16", devs)
    with pytest.raises(ValueError, match=r"spans 4 slices but the 16 devices are in 2 slice\(s\) \(device.slice_index"):
        parallel.make_mesh("fsdp=4", devs, dcn="data=4")


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
    assert _sharded_bytes(two) == _sharded_bytes(one)
    assert c.argument_bytes == _sharded_bytes(two) + 2 * 128 * 4  # + [negative, positive] x 128 int32 token ids


# -- compiled numbers -------------------------------------------------------------------------

@pytest.mark.parametrize("target,mesh", MESHES)
def test_text_encoder_argument_bytes_equal_the_sharded_t5_parameters_plus_the_token_ids(target, mesh):
    p = planner.plan(target, "sample", mesh=mesh, models=tiny_models(), only=("text_encoder",),
                     sample=dataclasses.replace(SAMPLE, max_sequence_length=128, dtype="float32"))
    c = p.phases[0].compiled
    assert c is not None, p.phases[0].error
    m = aot.make_mesh(targets.get(target), mesh)
    t5 = checkpoint.abstract_model("text_encoder", dataclasses.replace(tiny_models().text_encoder, dtype="float32"), m)
    params = _sharded_bytes(t5)
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


def test_denoise_flops_are_within_5_percent_of_the_analytic_count_with_the_splash_kernel_counted():
    p = _plan("v5e-1")
    c = p.phases[0].compiled
    assert c is not None, p.phases[0].error
    want = _analytic_denoise_flops()
    assert abs(c.flops - want) <= 0.05 * want, (c.flops, c.xla_flops, c.kernel_flops, want)
    # the kernels XLA does not count: one splash call per block over [text, video, face]
    assert c.kernels == {"splash forward B2 S68 T68 N2 Dh128 /1": 2}
    assert c.kernel_flops == 4 * 2 * HEADS * DH * (68 ** 2 + 68 ** 2)
    assert c.xla_flops < want  # XLA alone misses the attention


def test_the_identity_step_compiles_with_splash_on_a_2x2_mesh_with_tensor_2_and_splits_its_work():
    one, four = _plan("v5e-1"), _plan("v5e-4", mesh="fsdp=2,tensor=2")
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
    plain = _plan("h100x1", identity=False)
    c = plain.phases[0].compiled
    assert c is not None, plain.phases[0].error
    assert c.kernels == {"cudnn forward B2 S64 T64 N2 Dh128 /1": 2}
    # XLA FLOPs from the optimized HLO, the scanned blocks' loop body counted per iteration
    want = _analytic_denoise_flops(adapter_blocks=0)
    assert abs(c.flops - want) <= 0.05 * want, (c.flops, c.xla_flops, c.kernel_flops, want)
    ident = _plan("h100x1")
    assert ident.phases[0].compiled is not None, ident.phases[0].error


# -- the CLI ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """Checkpoint folders of the tiny models holding only what the planner reads: the configs."""
    root = tmp_path_factory.mktemp("plan_ckpt")
    m = tiny_models()
    backbone, adapter = root / "backbone", root / "adapter"
    for folder, comps in ((backbone, {"transformer": m.transformer, "vae": m.vae, "text_encoder": m.text_encoder}),
                          (adapter, {"image_encoder": m.image_encoder, "adapter": m.adapter})):
        for name, cfg in comps.items():
            (folder / name).mkdir(parents=True)
            (folder / name / "config.json").write_text(json.dumps(cfg.to_dict()))
        checkpoint.write_index(folder, list(comps))
    (backbone / "scheduler").mkdir()
    (backbone / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    return backbone, adapter


def _cli(tiny_ckpt, *args):
    backbone, adapter = tiny_ckpt
    return cli.main(["--checkpoint", str(backbone), "--adapter", str(adapter), "--frames", "9", "--height", "64",
                     "--width", "64", "--steps", "4", *args])


def test_cli_json_has_the_fields_other_scripts_read(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert _cli(tiny_ckpt, "--target", "v5e-1", "--workload", "sample", "--phases", "text_encoder,denoise",
                "--json", str(out)) == 0
    data = json.loads(out.read_text())
    assert {"target", "workload", "mesh", "phases"} <= set(data) and data["target"] == "v5e-1"
    assert [p["name"] for p in data["phases"]] == ["text_encoder", "denoise"]
    for p in data["phases"]:
        assert {"name", "argument_bytes", "temp_bytes", "output_bytes", "peak_bytes", "hbm_bytes", "fits", "flops",
                "ideal_seconds", "compile_seconds", "collectives"} <= set(p)
        assert p["fits"] is True and p["peak_bytes"] > 0 and p["compile_seconds"] > 0
    assert data["phases"][1]["runs"] == 4
    text = capsys.readouterr().out
    assert "denoise" in text and "ideal time per video" in text


def test_cli_table_writes_the_readme_table_between_its_markers(tiny_ckpt, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.TABLE_START}\nold\n{report.TABLE_END}\n\nafter\n")
    assert _cli(tiny_ckpt, "--table", str(readme), "--target", "v5e-1", "--workload", "sample",
                "--phases", "denoise") == 0
    text = readme.read_text()
    assert "old" not in text and text.endswith("\n\nafter\n")
    assert "| target | workload | mesh | phase |" in text
    row = next(line for line in text.splitlines() if line.startswith("| v5e-1 | sample |"))
    assert "| data=1,fsdp=1,context=1,tensor=1 | denoise | " in row and " ✓ (15.20) | " in row
    assert row.count(" per video |") == 1 and "(4) |" in row  # 4 denoising steps in the tiny config


@pytest.mark.parametrize("args,message", [
    (["--target", "v9-1", "--workload", "sample"], "unknown target 'v9-1'; known targets: v5e-1, v5e-4"),
    (["--target", "v5e-4", "--workload", "sample", "--mesh", "fsdp=2,tensor=4"],
     "mesh 'fsdp=2,tensor=4' (data=1,fsdp=2,context=1,tensor=4) has 8 devices but target v5e-4 has 4"),
    (["--target", "v5e-1", "--workload", "sample", "--frames", "13"],
     "frames=13: not a frame count the VAE encodes and decodes exactly"),
    (["--target", "v5e-1", "--workload", "sample", "--batch", "2"], "the sampler makes one video at a time"),
    (["--target", "v5e-1", "--workload", "train", ], "unknown workload 'train'"),
    (["--target", "v5e-1", "--workload", "sample", "--dit", "nope=1"], "the DiT config has no field 'nope'; fields:"),
    (["--target", "v5e-1", "--workload", "train-video", "--config", "configs/image.py:tiny"],
     "--config is a image-stage config (data.stage='image') but the workload is train-video"),
])
def test_cli_refuses_bad_input_by_name_with_exit_2(tiny_ckpt, args, message, capsys):
    assert _cli(tiny_ckpt, *args) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--target", "v5e-4", "--mesh-dcn", "pipe=2"], "mesh spec 'pipe=2': unknown axis 'pipe'"),
    (["--target", "v5e-4", "--mesh", "fsdp=8", "--mesh-dcn", "data=2"],
     "mesh 'fsdp=8' (data=1,fsdp=8,context=1,tensor=1) has 8 devices but target v5e-4 has 4 per slice"),
    (["--target", "h100x8", "--mesh-dcn", "data=2"], "target h100x8: multi-slice (DCN) plans are for TPU targets"),
])
def test_cli_refuses_a_multi_slice_plan_it_cannot_make_with_exit_2(tiny_ckpt, args, message, capsys):
    assert _cli(tiny_ckpt, *args, "--workload", "sample") == 2
    assert message in capsys.readouterr().err


def test_cli_takes_the_train_step_settings_from_a_training_config(tiny_ckpt, tmp_path):
    out = tmp_path / "plan.json"
    assert _cli(tiny_ckpt, "--target", "v5e-1", "--workload", "train-video", "--config", "configs/video.py:tiny",
                "--config.train.global_batch_size=4", "--precomputed", "all", "--json", str(out)) == 0
    data = json.loads(out.read_text())
    s = data["settings"]  # the tiny preset's remat and dtype, the override's batch, the flags' sizes
    assert (s["batch"], s["remat"], s["dtype"], s["frames"], s["precomputed"]) == (4, "none", "float32", 9, "all")
    assert data["unit"] == "training step" and data["phases"][0]["name"] == "train_step"
    assert data["phases"][0]["alias_bytes"] > 0


def test_cli_names_the_extra_when_the_cuda_plugin_is_missing(tiny_ckpt, monkeypatch, capsys):
    monkeypatch.setattr(targets, "cuda_plugin_installed", lambda: False)
    assert _cli(tiny_ckpt, "--target", "h100x8", "--workload", "sample") == 2
    assert 'needs the CUDA plugin: pip install -e ".[cuda12]"' in capsys.readouterr().err


def test_cli_help_shows_the_defaults():
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0


def test_a_phase_that_fails_to_compile_is_reported_and_the_cli_exits_1(tiny_ckpt, monkeypatch, capsys):
    from mm_jax import pipeline

    def broken(*a, **k):
        raise RuntimeError("Bias must have same seq length as QKV (stand-in)")

    monkeypatch.setattr(pipeline, "decode_fn", broken)
    assert _cli(tiny_ckpt, "--target", "v5e-1", "--workload", "sample", "--phases", "text_encoder,vae_decode") == 1
    out = capsys.readouterr().out
    assert "vae_decode    FAILED: RuntimeError: Bias must have same seq length" in out
    assert "text_encoder " in out and "FAILED" not in out.split("vae_decode")[0]


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


def test_real_configs_come_from_the_package_presets():
    m = planner.Models.real()
    assert m.transformer.num_layers == 42 and m.transformer.inner_dim == 3072
    assert m.text_encoder.d_model == 4096 and m.image_encoder.hidden_size == 1024
    assert Path(planner.__file__).parent.joinpath("gpu_specs", "h100_sxm.txtpb").exists()
