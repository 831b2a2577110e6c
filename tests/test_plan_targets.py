"""mm_jax.plan's targets and meshes: the machines the users run (devices, memory, peak), each TPU
target compiled for by libtpu without chips, the attention each chip can run, and the device
order of the run's meshes on the chips' topology (one slice and several); the real models come
from the package presets."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from mm_jax import plan as planner
from mm_jax.plan import aot, targets

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

GIB = 1024 ** 3


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


def test_real_configs_come_from_the_package_presets():
    m = planner.Models.real()
    assert m.transformer.num_layers == 42 and m.transformer.inner_dim == 3072
    assert m.text_encoder.d_model == 4096 and m.image_encoder.hidden_size == 1024
    assert Path(planner.__file__).parent.joinpath("gpu_specs", "h100_sxm.txtpb").exists()
