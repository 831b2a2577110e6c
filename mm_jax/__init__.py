"""mm_jax: Magic Mirror on CogVideoX in JAX/Flax NNX."""
from mm_jax.fake_devices import ensure_collective_threads

ensure_collective_threads()  # before any JAX backend starts: see mm_jax/fake_devices.py
