"""The persistent compilation cache: a second process reads every program the first compiled, and a
second run of the same sample command spends a small part of the first one's compile time."""
import json
import os
import subprocess
import sys

import pytest

from mm_jax import compile_cache

PROGRAMS = """
import json, sys
from mm_jax import compile_cache
compile_cache.enable(compile_cache.resolve(sys.argv[1]))
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + jnp.tanh(x).sum())
for n in (64, 128, 256):
    f(jnp.ones((n, n))).block_until_ready()
print(json.dumps(compile_cache.STATS.as_dict()))
"""


def _run(folder):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    r = subprocess.run([sys.executable, "-c", PROGRAMS, str(folder)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_second_process_reads_every_program_from_the_cache(tmp_path):
    first, second = _run(tmp_path / "xla"), _run(tmp_path / "xla")
    assert first["cache_hits"] == 0 and first["cache_misses"] == first["programs"] >= 3
    assert second["cache_hits"] == second["programs"] == first["programs"] and second["cache_misses"] == 0


def test_off_disables_the_cache_and_empty_means_the_default_folder(tmp_path, monkeypatch):
    assert compile_cache.resolve("off") is None and compile_cache.resolve("None") is None
    monkeypatch.setenv("MM_JAX_COMPILE_CACHE", str(tmp_path / "c"))
    assert compile_cache.resolve("") == compile_cache.resolve(None) == str(tmp_path / "c")
    monkeypatch.delenv("MM_JAX_COMPILE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert compile_cache.resolve(None) == str(tmp_path / "x" / "mm_jax" / "xla")
    stats = _run("off")
    assert stats["cache_hits"] == stats["cache_misses"] == 0 and stats["programs"] >= 3


@pytest.mark.slow  # two tiny sample runs: ~40 s on 2 cores
def test_the_second_sample_run_takes_its_programs_from_the_cache(tmp_path):
    """The same tiny ``python -m mm_jax.sample`` command twice: the second run's sidecar counts every
    program as a cache hit and its compile time is under 10% of the first run's."""
    from tests.tiny_pipeline import make_pipeline
    from tools.convert_weights.from_torch import convert

    make_pipeline(tmp_path / "src")
    ckpt = convert(tmp_path / "src", tmp_path / "ckpt")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    runs = []
    for i in range(2):
        out = tmp_path / f"v{i}.npy"
        r = subprocess.run([sys.executable, "-m", "mm_jax.sample", "--checkpoint", str(ckpt), "--prompt", "a man walks",
                            "--frames", "9", "--height", "64", "--width", "64", "--steps", "2", "--out", str(out),
                            "--quiet", "--compile-cache", str(tmp_path / "xla")], env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        runs.append(json.loads((tmp_path / f"v{i}.npy.json").read_text())["compile"])
        assert "from the compile cache" in r.stderr
    first, second = runs
    # a program compiled twice in one process (two call sites) is already a hit in the first run
    assert first["cache_misses"] >= 4 and first["cache_hits"] < first["cache_misses"], first
    assert second["cache_hits"] == second["programs"] == first["programs"] and second["cache_misses"] == 0, second
    assert second["compile_s"] < 0.1 * first["compile_s"], (first, second)


def test_several_cpu_processes_compile_with_a_warning_instead_of_reading_the_cache(tmp_path):
    """2 processes x 2 CPU devices (gloo): ``enable`` refuses the cache with a warning, because such
    runs failed their first collective with executables read from it (a relaunched training run)."""
    code = ("import warnings\nfrom mm_jax import compile_cache, distributed\ndistributed.initialize()\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            f"    got = compile_cache.enable({str(tmp_path / 'xla')!r})\n"
            "print('enabled', got, 'warned', any('gloo' in str(x.message) for x in w))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC")}
    r = subprocess.run([sys.executable, "-m", "mm_jax.launch", "--processes", "2", "--devices-per-process", "2", "--",
                        sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(line for line in r.stdout.splitlines() if "enabled" in line) == [
        "[p0] enabled None warned True", "[p1] enabled None warned True"]
