"""Fake CPU devices get enough XLA worker threads that independent collectives cannot starve one
device of a thread (mm_jax/fake_devices.py)."""
import os
import subprocess
import sys

from mm_jax.fake_devices import THREADS_PER_DEVICE, ensure_collective_threads, requested_devices

COUNT = """
import mm_jax, jax, os
jax.numpy.ones(2).block_until_ready()
print(sum(open(f"/proc/self/task/{t}/comm").read().strip() == "tf_XLAEigen" for t in os.listdir("/proc/self/task")))
"""


def test_eight_fake_devices_ask_for_four_threads_each():
    env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8"}
    assert requested_devices(env["XLA_FLAGS"]) == 8
    assert ensure_collective_threads(env) == max(os.cpu_count(), 8 * THREADS_PER_DEVICE)
    assert env["NPROC"] == str(max(os.cpu_count(), 32))


def test_a_users_nproc_and_a_single_device_are_left_alone():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "NPROC": "3"}
    assert ensure_collective_threads(env) is None and env["NPROC"] == "3"
    env = {"XLA_FLAGS": ""}
    assert ensure_collective_threads(env) is None and "NPROC" not in env


def test_importing_mm_jax_sizes_the_cpu_pool_before_jax_starts():
    env = {k: v for k, v in os.environ.items() if k != "NPROC"}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", COUNT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) == max(os.cpu_count(), 8 * THREADS_PER_DEVICE)
