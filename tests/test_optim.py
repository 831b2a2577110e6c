"""Weight decay by parameter role on the real stacked adapter: biases and norm scales never decay
(even 2-D in a stack), kernels and learned tables do; one AdamW step with zero gradients shows it."""
import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter
from mm_jax.training.optim import decay_mask, make_optimizer

TINY = dict(dit_dim=32, text_dim=32, time_embed_dim=16, num_dit_layers=3, adapter_layers=(0, 2), clip_width=24,
            id_dim=16, width=32, depth=2, heads=2, head_dim=16, ff_mult=4, num_face_tokens=4, num_id_tokens=3,
            id_mlp_hidden=32)


@pytest.fixture(scope="module")
def params():
    """The trainer's view ({"adapter": pure dict}), every leaf random (zero-initialized biases would hide decay)."""
    pure = nnx.to_pure_dict(nnx.state(MagicMirrorAdapter(AdapterConfig(**TINY), rngs=nnx.Rngs(0)), nnx.Param))
    leaves, tree = jax.tree.flatten({"adapter": pure})
    rng = np.random.default_rng(0)
    return jax.tree.unflatten(tree, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def _by_role(params):
    mask = decay_mask(params)
    out = {}
    leaves = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(mask))
    for (path, p), (_, m) in leaves:
        out.setdefault(path[-1].key, []).append((jax.tree_util.keystr(path), p.ndim, bool(m)))
    return out


def test_biases_and_norm_scales_are_not_decayed_even_when_stacked_and_kernels_are(params):
    roles = _by_role(params)
    assert set(roles) == {"kernel", "bias", "scale", "latents"}
    stacked = [(name, nd) for r in ("bias", "scale") for name, nd, _ in roles[r] if nd >= 2]
    assert any("['can']['bias']" in n for n, _ in stacked) and any("norm_q" in n for n, _ in stacked)
    assert all(not m for r in ("bias", "scale") for _, _, m in roles[r])
    assert all(m for _, _, m in roles["kernel"]) and any(nd == 3 for _, nd, _ in roles["kernel"])
    assert all(m for _, _, m in roles["latents"])  # the learned queries: a table, decayed as a matrix


def test_one_adamw_step_with_zero_gradients_shrinks_kernels_and_leaves_biases_and_scales(params):
    lr, wd = 0.1, 0.5
    tx = make_optimizer(ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=wd,
                                                       warmup_steps=0, grad_clip=1.0)))
    updates, _ = jax.jit(tx.update)(jax.tree.map(np.zeros_like, params), tx.init(params), params)

    def check(path, p, u):
        after = np.asarray(p + u)
        if path[-1].key in ("bias", "scale"):
            assert np.array_equal(after, p), jax.tree_util.keystr(path)
        else:
            np.testing.assert_allclose(after, p * (1 - lr * wd), rtol=1e-6, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, params, updates)


def test_a_parameter_without_a_known_role_is_an_error_naming_it():
    with pytest.raises(ValueError,
                       match=r"parameter \['adapter'\]\['gain'\]: no weight-decay role for the name 'gain'"):
        decay_mask({"adapter": {"gain": np.ones((2, 3))}})
