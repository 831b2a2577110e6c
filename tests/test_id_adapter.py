"""The Flax Magic Mirror adapter equals an independent PyTorch implementation of the spec
(tests/reference/magic_mirror_torch.py on diffusers' CogVideoX), both converted by our tool."""
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from mm_jax import checkpoint
from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter, count_adapter_params
from mm_jax.text import check_dropped_tokens, find_class_token
from tests.conftest import max_rel_err, randomize_torch_params
from tests.reference.magic_mirror_torch import MagicMirrorAdapterTorch, magic_mirror_forward
from tests.test_dit import TINY, _torch_rope
from tools.convert_weights.from_torch import convert

ADAPTER = dict(dit_dim=32, text_dim=32, time_embed_dim=16, num_dit_layers=3, adapter_layers=(0, 2), clip_width=24,
               id_dim=16, width=32, depth=2, heads=2, head_dim=16, ff_mult=4, num_face_tokens=4, num_id_tokens=3,
               id_mlp_hidden=32)
CLASS_INDEX = 2


def _build(root, num_layers=3, adapter_layers=(0, 2)):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    dit_t = CogVideoXTransformer3DModel(**dict(TINY, num_layers=num_layers,
                                               use_rotary_positional_embeddings=True)).eval()
    randomize_torch_params(dit_t, 0)
    dit_t.save_pretrained(root / "dit")
    cfg = AdapterConfig(**dict(ADAPTER, num_dit_layers=num_layers, adapter_layers=adapter_layers))
    ad_t = MagicMirrorAdapterTorch(cfg.to_dict()).eval()
    randomize_torch_params(ad_t, 1)  # every weight non-zero, the zero-init layers included
    (root / "adapter").mkdir()
    save_file({k: v.contiguous() for k, v in ad_t.state_dict().items()}, root / "adapter" / "model.safetensors")
    (root / "adapter" / "config.json").write_text(json.dumps(cfg.to_dict()))
    dit = checkpoint.load_component(convert(root / "dit", root / "dit_ckpt"), "transformer")
    ad = checkpoint.load_component(convert(root / "adapter", root / "ad_ckpt"), "adapter")
    return dit_t, ad_t, dit, ad


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("mm"))


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(b, 2, 4, 8, 12, generator=g), text=torch.randn(b, 7, 32, generator=g),
                neg=torch.randn(b, 7, 32, generator=g), t=torch.tensor([999, 321][:b]),
                clip=torch.randn(b, 5, 24, generator=g),
                e_id=torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=-1))


def _cl(video):  # (B, F, C, H, W) torch -> (B, F, H, W, C) numpy
    return video.permute(0, 1, 3, 4, 2).numpy()


@nnx.jit
def _with_id(dit, ad, lat, text, t, clip, e_id, class_index, has_id):
    x_id, x_face = ad.encode(clip, e_id)
    fused = ad.fuse(text, x_id, class_index)
    return ad.dit_forward(dit, lat, jnp.where(has_id[:, None, None], fused, text), t, x_face, x_id, has_id)


@nnx.jit
def _plain(dit, ad, lat, text, t):
    return ad.dit_forward(dit, lat, text, t)


def _torch_with_id(dit_t, ad_t, x, sl=slice(None)):
    with torch.no_grad():
        y = magic_mirror_forward(dit_t, ad_t, x["latents"][sl], x["text"][sl], x["t"][sl], x["clip"][sl],
                                 x["e_id"][sl], CLASS_INDEX, _torch_rope(dit_t, 2, 8, 12))
    return _cl(y)


def _torch_plain(dit_t, x, text, sl=slice(None)):
    with torch.no_grad():
        y = dit_t(hidden_states=x["latents"][sl], encoder_hidden_states=text[sl], timestep=x["t"][sl],
                  image_rotary_emb=_torch_rope(dit_t, 2, 8, 12), return_dict=False)[0]
    return _cl(y)


def test_adapter_matches_the_independent_torch_reference(models):
    dit_t, ad_t, dit, ad = models
    x = _inputs()
    got = _with_id(dit, ad, _cl(x["latents"]), x["text"].numpy(), x["t"].numpy(), x["clip"].numpy(),
                   x["e_id"].numpy(), jnp.full((2,), CLASS_INDEX), jnp.ones((2,), bool))
    err = max_rel_err(got, _torch_with_id(dit_t, ad_t, x))
    print(f"adapter vs torch reference: max rel err {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize("num_layers,adapter_layers", [(4, (0, 2)), (5, (1, 3)), (5, (0, 1, 3))])
def test_other_adapter_block_patterns_match_the_torch_reference(tmp_path, num_layers, adapter_layers):
    """The scan runs groups of p blocks from each adapter block; other patterns (a plain prefix,
    irregular steps) still equal the reference, which applies the adapter block by block."""
    dit_t, ad_t, dit, ad = _build(tmp_path, num_layers, adapter_layers)
    x = _inputs()
    got = _with_id(dit, ad, _cl(x["latents"]), x["text"].numpy(), x["t"].numpy(), x["clip"].numpy(),
                   x["e_id"].numpy(), jnp.full((2,), CLASS_INDEX), jnp.array([False, True]))
    want = np.concatenate([_torch_plain(dit_t, x, x["text"], slice(0, 1)), _torch_with_id(dit_t, ad_t, x, slice(1, 2))])
    assert max_rel_err(got, want) <= 1e-5


@pytest.mark.slow  # one compile per policy
def test_every_remat_policy_gives_the_adapters_gradients_of_no_remat(tmp_path):
    """Remat on the scanned [adapter block, plain block] groups: the loss and the adapter's
    gradients (what training updates) equal those without remat for every policy (1e-6 of the
    gradient's scale: a key bias's true gradient is zero and holds only rounding noise)."""
    from mm_jax.models.block_runner import REMAT_POLICIES

    _, _, dit, ad = _build(tmp_path, 4, (0, 2))
    x = _inputs()
    args = (_cl(x["latents"]), x["text"].numpy(), x["t"].numpy(), x["clip"].numpy(), x["e_id"].numpy(),
            jnp.full((2,), CLASS_INDEX), jnp.array([False, True]))
    got = {}
    for policy in REMAT_POLICIES:
        d = checkpoint.load_component(tmp_path / "dit_ckpt", "transformer", remat_policy=policy)
        def loss(a, d):
            lat, text, t, clip, e_id, idx, has_id = args
            x_id, x_face = a.encode(clip, e_id)
            fused = jnp.where(has_id[:, None, None], a.fuse(text, x_id, idx), text)
            return jnp.mean(a.dit_forward(d, lat, fused, t, x_face, x_id, has_id) ** 2)

        value, grads = jax.jit(jax.value_and_grad(loss))(ad, d)
        got[policy] = (float(value), [np.asarray(g) for g in jax.tree.leaves(nnx.state(grads, nnx.Param))])
    value0, grads0 = got["none"]
    scale = max(float(np.max(np.abs(g))) for g in grads0)
    for policy, (value, grads) in got.items():
        assert abs(value - value0) <= 1e-6 * abs(value0), policy
        assert max(float(np.max(np.abs(g - g0))) for g, g0 in zip(grads, grads0)) <= 1e-6 * scale, policy


def test_without_a_reference_face_it_is_plain_cogvideox(models):
    dit_t, _, dit, ad = models
    x = _inputs()
    got = _plain(dit, ad, _cl(x["latents"]), x["text"].numpy(), x["t"].numpy())
    err = max_rel_err(got, _torch_plain(dit_t, x, x["text"]))
    print(f"no face vs diffusers: max rel err {err:.2e}")
    assert err <= 1e-5


def test_cfg_batch_of_uncond_and_cond_equals_the_two_unbatched_runs(models):
    """[uncond (negative prompt, masked face, no residuals), cond] as one batch: each half equals
    its own unbatched run and its torch reference (plain diffusers / the torch adapter)."""
    dit_t, ad_t, dit, ad = models
    x = _inputs(1, b=1)
    both = dict(latents=torch.cat([x["latents"]] * 2), t=torch.cat([x["t"]] * 2), text=torch.cat([x["neg"], x["text"]]),
                clip=torch.cat([x["clip"]] * 2), e_id=torch.cat([x["e_id"]] * 2))
    got = _with_id(dit, ad, _cl(both["latents"]), both["text"].numpy(), both["t"].numpy(), both["clip"].numpy(),
                   both["e_id"].numpy(), jnp.full((2,), CLASS_INDEX), jnp.array([False, True]))
    uncond = _plain(dit, ad, _cl(x["latents"]), x["neg"].numpy(), x["t"].numpy())
    cond = _with_id(dit, ad, _cl(x["latents"]), x["text"].numpy(), x["t"].numpy(), x["clip"].numpy(),
                    x["e_id"].numpy(), jnp.full((1,), CLASS_INDEX), jnp.ones((1,), bool))
    errs = [max_rel_err(got[:1], uncond), max_rel_err(got[1:], cond),
            max_rel_err(got[:1], _torch_plain(dit_t, x, x["neg"])), max_rel_err(got[1:], _torch_with_id(dit_t, ad_t, x))]
    print("CFG batch halves vs unbatched ours / torch: " + ", ".join(f"{e:.2e}" for e in errs))
    assert max(errs) <= 1e-5


@pytest.fixture(scope="module")
def fresh(models):
    """A freshly initialized adapter joined to the converted DiT with init_from_dit."""
    _, _, dit, _ = models
    ad = nnx.jit(lambda: MagicMirrorAdapter(AdapterConfig(**ADAPTER), rngs=nnx.Rngs(0)))()
    ad.init_from_dit(dit)
    x = _inputs()
    x_id, _ = nnx.jit(lambda a, c, e: a.encode(c, e))(ad, x["clip"].numpy(), x["e_id"].numpy())
    return dit, ad, x, x_id


def test_fresh_fusion_is_the_identity_on_the_class_token_and_keeps_the_length(fresh):
    _, ad, x, x_id = fresh
    text = jnp.asarray(x["text"].numpy())
    fused = nnx.jit(lambda a, t, xi, w: a.fuse(t, xi, w))(ad, text, x_id, jnp.array([2, 5]))  # traced index
    # c_k = c_w (MLP_fuse's last layer is zero); what followed shifts right by N_id - 1 = 2
    np.testing.assert_array_equal(fused[0], jnp.concatenate([text[0, :2], jnp.repeat(text[0, 2:3], 3, 0), text[0, 3:5]]))
    np.testing.assert_array_equal(fused[1], jnp.concatenate([text[1, :5], jnp.repeat(text[1, 5:6], 2, 0)]))


def test_fresh_can_modulates_faces_like_text_with_zero_residuals(fresh):
    from mm_jax.models.layers import layer

    dit, ad, _, x_id = fresh
    temb = dit.time_embed(jnp.array([999, 5]))
    cond = ad.conditioning(x_id)(temb)  # stacked over the adapter blocks
    assert cond.extra_mod.shape[0] == len(ad.cfg.adapter_layers)
    for k, i in enumerate(ad.cfg.adapter_layers):
        blk = layer(dit.transformer_blocks, i)
        want = jnp.concatenate([blk.norm1.modulation(temb)[:, 3:6], blk.norm2.modulation(temb)[:, 3:6]], axis=1)
        assert max_rel_err(cond.extra_mod[k], want) <= 1e-6
        assert float(jnp.max(jnp.abs(cond.residual[k]))) == 0.0


def _tokenizer():
    from tests.tiny_pipeline import train_tokenizer

    return train_tokenizer(Path(tempfile.mkdtemp()) / "spm")


def test_class_word_lookup_finds_the_first_token_of_the_first_word():
    tok = _tokenizer()
    prompt = "close up of a man is walking on the beach with a woman"
    ids = tok(prompt, padding="max_length", max_length=40).input_ids
    i = find_class_token(tok, prompt, np.array(ids), ("woman", "man"))
    assert tok.decode(ids[i:]).strip().startswith("man is walking")
    assert tok.decode(ids[:i]).strip() == "close up of a"


def test_class_word_lookup_errors_listing_the_words():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="needs one of: woman, boy"):
        find_class_token(tok, "a dog on the beach", np.array(tok("a dog on the beach").input_ids), ("woman", "boy"))
    # a class word inside a longer word is no match ("manly" is not "man")
    with pytest.raises(ValueError, match="needs one of: man"):
        find_class_token(tok, "a manly dog", np.array(tok("a manly dog").input_ids), ("man",))


def test_fusion_warns_when_it_drops_real_tokens():
    with pytest.warns(UserWarning, match="drops them"):
        assert not check_dropped_tokens(np.array([5, 6, 7, 8, 1]), num_id_tokens=3)
    assert check_dropped_tokens(np.array([5, 6, 1, 0, 0]), num_id_tokens=3)


def test_added_parameter_count_of_the_5b_adapter():
    from mm_jax.models.dit_config import DiTConfig

    cfg = AdapterConfig.for_dit(DiTConfig(), clip_width=1024)
    assert cfg == AdapterConfig()
    with torch.device("meta"):
        ref = MagicMirrorAdapterTorch(cfg.to_dict())
    n = count_adapter_params(cfg)
    print(f"Magic Mirror adapter for CogVideoX-5B: {n:,} added parameters")
    assert n == sum(p.numel() for p in ref.parameters()) == 630_766_080


def test_config_round_trips_through_its_dict():
    cfg = AdapterConfig(**ADAPTER, class_words=("man", "lady"), gelu="tanh", dtype="bfloat16")
    back = AdapterConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), dtype="bfloat16")
    assert back == cfg
    with pytest.raises(ValueError, match="adapter_layers"):
        AdapterConfig(**dict(ADAPTER, adapter_layers=(0, 3))).validate()


def test_adapter_checkpoint_round_trips_apart_from_the_backbone(models, tmp_path):
    _, _, _, ad = models
    checkpoint.save_module(tmp_path, "adapter", ad)
    assert not (tmp_path / "transformer").exists()
    back = checkpoint.load_component(tmp_path, "adapter")
    assert back.cfg == ad.cfg
    a, b = nnx.to_flat_state(nnx.state(ad, nnx.Param)), nnx.to_flat_state(nnx.state(back, nnx.Param))
    assert [p for p, _ in a] == [p for p, _ in b]
    for (p, va), (_, vb) in zip(a, b):
        np.testing.assert_array_equal(va.get_value(), vb.get_value(), err_msg=str(p))
