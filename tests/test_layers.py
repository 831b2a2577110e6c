"""Shared layers: the attention kernel a dtype falls back from says so."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax.models import layers


def test_float32_on_cudnn_warns_and_runs_xla_attention(monkeypatch):
    """cuDNN takes bf16/fp16 only: float32 q/k/v asked for "cudnn" run XLA's attention (equal to
    it bit for bit) and warn once, naming the dtype."""
    monkeypatch.setattr(layers, "_CUDNN_WARNED", set())
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 8, 2, 16), jnp.float32) for i in range(3))
    with pytest.warns(UserWarning, match="cuDNN takes bfloat16/float16 only, so float32 queries run XLA's dense"):
        out = layers.attention(q, k, v, implementation="cudnn")
    np.testing.assert_array_equal(out, layers.attention(q, k, v, implementation="xla"))
