"""The Flax DiT equals diffusers' CogVideoXTransformer3DModel after conversion by our tool."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import max_rel_err, randomize_torch_params
from tools.convert_weights.from_torch import convert
from mm_jax import checkpoint

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=2,
            text_embed_dim=32, time_embed_dim=16, sample_width=12, sample_height=8, sample_frames=9,
            max_text_seq_length=7, patch_size=2)


def _torch_model(rope: bool, seed: int = 0):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    m = CogVideoXTransformer3DModel(**TINY, use_rotary_positional_embeddings=rope,
                                    spatial_interpolation_scale=1.875 if not rope else 1.875).eval()
    randomize_torch_params(m, seed)
    return m


def _torch_rope(m, frames, h, w):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = m.config.patch_size
    crops = get_resize_crop_region_for_grid((h // p, w // p), m.config.sample_width // p, m.config.sample_height // p)
    return get_3d_rotary_pos_embed(embed_dim=m.config.attention_head_dim, crops_coords=crops,
                                   grid_size=(h // p, w // p), temporal_size=frames, device="cpu")


@pytest.fixture(scope="module", params=["rope", "sincos"])
def converted(request, tmp_path_factory):
    rope = request.param == "rope"
    m = _torch_model(rope)
    src = tmp_path_factory.mktemp("src") / "transformer"
    m.save_pretrained(src, max_shard_size="40KB")  # several shards + index
    assert len(list(src.glob("*.safetensors"))) > 1
    dst = convert(src, tmp_path_factory.mktemp("dst") / "ckpt")
    ours = checkpoint.load_component(dst, "transformer")
    return rope, m, ours


@pytest.mark.parametrize("frames,h,w", [(3, 8, 12), (2, 8, 8)])  # base grid (integer RoPE), other aspect (fractional)
def test_dit_matches_diffusers(converted, frames, h, w):
    rope, m, ours = converted
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, 4, h, w, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ref = m(hidden_states=x, encoder_hidden_states=text, timestep=t,
                image_rotary_emb=_torch_rope(m, frames, h, w) if rope else None, return_dict=False)[0]
    y = ours(x.permute(0, 1, 3, 4, 2).numpy(), text.numpy(), t.numpy())
    err = max_rel_err(np.asarray(y), ref.permute(0, 1, 3, 4, 2).numpy())
    assert err <= 1e-5, err


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_attention_implementations_agree_with_a_key_mask(impl):
    import jax

    from mm_jax.models.layers import attention

    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 37, 3, 8), dtype=np.float32) for _ in range(3))
    k, v = k[:, :29], v[:, :29]
    mask = np.ones((2, 29), bool)
    mask[1, :5] = False
    s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(8) + np.where(mask, 0, -np.inf)[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)
    out = jax.jit(lambda q, k, v, m: attention(q, k, v, key_mask=m, implementation=impl))(q, k, v, mask)
    assert max_rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("impl", ["chunked", "xla"])
def test_key_lengths_hide_a_suffix_of_the_keys(impl):
    """The DiT's masking form: row b sees keys [0, kv_lengths[b]) (cuDNN and splash take it too)."""
    import jax

    from mm_jax.models.layers import attention

    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((2, 31, 3, 8), dtype=np.float32) for _ in range(3))
    lengths = np.array([31, 24], np.int32)
    mask = np.arange(31)[None, :] < lengths[:, None]
    s = np.einsum("bqnh,bknh->bnqk", q, k) / np.sqrt(8) + np.where(mask, 0, -np.inf)[:, None, None, :]
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = np.einsum("bnqk,bknh->bqnh", p / p.sum(-1, keepdims=True), v)
    out = jax.jit(lambda q, k, v, n: attention(q, k, v, kv_lengths=n, implementation=impl))(q, k, v, lengths)
    assert max_rel_err(out, ref) <= 1e-6


@pytest.mark.parametrize("lengths", [None, (31, 24)])
def test_the_even_padding_cudnn_gets_leaves_attention_and_its_gradients_unchanged(lengths):
    """cuDNN (jax 0.10.2) refuses odd lengths in training, so its wrapper pads q and k/v by one,
    hides the padded key by key lengths and drops the padded row; the same padding through the
    XLA kernel equals the unpadded attention, values and gradients (1e-6)."""
    import jax
    import jax.numpy as jnp

    from mm_jax.models.layers import attention, even_lengths

    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 31, 3, 8), dtype=np.float32) for _ in range(3))
    n = None if lengths is None else np.array(lengths, np.int32)

    def padded(q, k, v):
        qp, kp, vp, lp = even_lengths(q, k, v, n)
        assert qp.shape[1] % 2 == 0 and kp.shape[1] % 2 == 0 and lp is not None
        return attention(qp, kp, vp, kv_lengths=lp, implementation="xla")[:, :q.shape[1]]

    plain = lambda q, k, v: attention(q, k, v, kv_lengths=n, implementation="xla")
    assert max_rel_err(jax.jit(padded)(q, k, v), jax.jit(plain)(q, k, v)) <= 1e-6
    grad = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
    for got, want in zip(grad(padded), grad(plain)):
        assert max_rel_err(got, want) <= 1e-6


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_scanned_or_unrolled_blocks_with_or_without_remat_give_the_same_output_and_gradients():
    """The scan over the stack equals the unrolled blocks; every remat policy: test_id_adapter.py."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mm_jax.models.dit import CogVideoXTransformer3D
    from mm_jax.models.dit_config import DiTConfig

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 8, 12, 4), dtype=np.float32)
    text = rng.standard_normal((1, 7, 32), dtype=np.float32)
    got = {}
    for scan in (True, False):
        for policy in ("none", "full"):
            cfg = DiTConfig.from_dict(dict(TINY, num_layers=3), remat_policy=policy, scan_layers=scan)
            m = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0))
            loss = lambda m: jnp.mean(m(x, text, jnp.array([10])) ** 2)
            value, grads = nnx.value_and_grad(loss)(m)
            got[scan, policy] = (float(value), [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))])
    value0, grads0 = got[True, "none"]
    scale = max(float(np.max(np.abs(g))) for g in grads0)
    assert len(got) == 4
    for key, (value, grads) in got.items():
        assert abs(value - value0) <= 1e-6 * abs(value0), key
        assert max(float(np.max(np.abs(g - g0))) for g, g0 in zip(grads, grads0)) <= 1e-6 * scale, key
