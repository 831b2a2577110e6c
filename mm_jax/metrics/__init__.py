"""Evaluation metrics for generated identity videos (``python -m mm_jax.evaluate``)."""
