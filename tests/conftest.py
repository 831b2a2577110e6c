"""Shared test helpers: seeded torch references, the converter, and the error measure."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MANIFESTS = ROOT / "tests" / "data" / "manifests"  # key/shape lists + configs of the real checkpoints

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# With the cuda12 extra installed on a machine without a driver, the CUDA plugin's start-up check
# fails (cuInit 303) and the plugin is dropped; skipping the check keeps it for compiling GPU
# targets (tests/test_plan_*.py). It changes nothing where the extra is absent.
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# The CLIs turn on the persistent compilation cache by default (mm_jax.compile_cache); the tests run
# without it unless a test names a folder, so no test reads programs another one compiled.
os.environ.setdefault("MM_JAX_COMPILE_CACHE", "off")
# libtpu (test extra) takes a process lock when JAX starts its backends; without TPU chips that
# only stops a second process (a subprocess test, the notebook's kernel) from compiling for TPU
# topologies. Set before any backend starts.
from mm_jax.fake_devices import ensure_collective_threads  # noqa: E402
from mm_jax.plan.targets import allow_compile_only_libtpu  # noqa: E402

allow_compile_only_libtpu()


def fake_devices_env(n: int = 8) -> dict:
    """The environment for a subprocess on ``n`` fake CPU devices. The collectives' rendezvous
    timeout is raised from XLA's 40 s: on 2 busy cores the 8 device threads can take longer to
    arrive, and XLA then aborts the process."""
    flags = (f"--xla_force_host_platform_device_count={n} --xla_cpu_collective_call_terminate_timeout_seconds=900 "
             "--xla_cpu_collective_timeout_seconds=900")
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}  # sized for n devices, not ours
    env.update(XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    ensure_collective_threads(env)
    return env


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the error relative to the reference's scale."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.max(np.abs(ours - ref)) / max(np.max(np.abs(ref)), 1e-30))


def randomize_torch_params(module, seed: int = 0, scale: float = 0.2) -> None:
    """Give every parameter (norms and zero-inits included) non-trivial random values."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32) * scale
            if name.endswith("norm.weight") or ".norm_" in name and name.endswith("weight"):
                noise = 1.0 + noise
            p.copy_(noise.to(p.dtype))


@pytest.fixture(scope="session")
def manifests_dir() -> Path:
    return MANIFESTS


def assert_params_hold_the_torch_tensors(component: str, ours, state_dict) -> int:
    """Every tensor of a torch ``state_dict`` sits in our (loaded) module ``ours`` where the
    converter's mapping puts it, transformed: layer i of a stacked parameter is torch's block i.
    Nothing is left over on either side. Returns the number of tensors compared."""
    from flax import nnx

    from mm_jax import checkpoint
    from tools.convert_weights import mapping as mp

    flat = {checkpoint.flat_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    mapping = mp.build_mapping(component, {k: (v.shape, v.dtype) for k, v in flat.items()})
    found = {k: state_dict[v] for k, v in mp.normalize_source_keys(component, state_dict).items()}
    assert mp.check_source(component, mapping, {k: tuple(t.shape) for k, t in found.items()}) == []
    for tk, m in mapping.items():
        want = m.to_ours(found[mp.resolve(component, tk, found)].detach().float().numpy())
        got = flat[m.ours] if m.index is None else flat[m.ours][m.index]
        np.testing.assert_array_equal(got, want, err_msg=f"{tk} -> {m.ours}[{m.index}]")
    return len(mapping)


def assert_checkpoint_round_trips(component: str, ours, folder) -> None:
    """Saving ``ours`` and loading it back gives the same parameters, each stacked parameter stored
    as one group holding all its layers."""
    from flax import nnx

    from mm_jax import checkpoint, components

    checkpoint.save_module(folder, component, ours)
    checkpoint.write_index(folder, [component])
    back = checkpoint.load_component(folder, component)
    a = {checkpoint.flat_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    b = {checkpoint.flat_key(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(back, nnx.Param))}
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    groups = {p.name for p in (folder / component / "params").iterdir()}
    stacked = [k for k in a if components.stack_of(component, k)]
    assert stacked and {k.replace("/", ".") for k in stacked} <= groups


def assert_stacks_have_a_leading_layers_axis(component: str, ours, num_layers: dict) -> None:
    """Every parameter under a declared stack has logical axes ("layers", ...) and a leading
    dimension of its stack's length (``num_layers[stack]``); no other parameter has a layers axis."""
    from flax import nnx

    from mm_jax import checkpoint, components

    seen = set()
    for p, v in nnx.to_flat_state(nnx.state(ours, nnx.Param)):
        key, axes = checkpoint.flat_key(p), tuple(v.get_metadata().get("out_sharding") or ())
        stack = components.stack_of(component, key)
        if stack is None:
            assert "layers" not in axes, (key, axes)
            continue
        seen.add(stack)
        assert axes[0] == "layers" and len(axes) == v.get_value().ndim, (key, axes)
        assert v.get_value().shape[0] == num_layers[stack], (key, v.get_value().shape)
    assert seen == set(num_layers) == set(components.get(component).stacks)


@pytest.fixture(scope="module")
def module_compile_cache(tmp_path_factory) -> str:
    """A persistent compilation cache folder for one module's in-process runs (pass it as their
    ``compile_cache``), so a program the module compiled once is read back by its later runs.
    JAX's cache settings are put back after the module: no other module reads these programs."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    before = {name: getattr(jax.config, name) for name in names}
    yield str(tmp_path_factory.mktemp("xla_cache"))
    for name, value in before.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict:
    """The assets ``configs/video.py:tiny`` builds with its setup hook (random tiny backbone and
    adapter, stand-in face models, the synthetic set, the reference face), built once per session
    for the modules that only read them: {config field: path}."""
    from mm_jax import config
    from mm_jax.demo import assets

    cfg = config.load("configs/video.py:tiny", ["sample.enabled=True"])  # enabled: the reference face too
    assets.prepare(cfg, tmp_path_factory.mktemp("tiny_assets"))
    return {k: cfg[k.split(".")[0]][k.split(".")[1]] for k in
            ("model.checkpoint", "model.adapter", "data.face_models", "data.path", "sample.ref")}
