"""mm_jax: Magic Mirror on CogVideoX in JAX/Flax NNX."""
