"""The Flax Magic Mirror adapter equals an independent PyTorch implementation of the spec."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from mm_jax import checkpoint
from mm_jax.models.id_adapter import (AdapterConfig, MagicMirrorAdapter, count_params, find_class_token,
                                      identity_forward)
from tests.conftest import max_rel_err, randomize_torch_params
from tests.reference.magic_mirror_torch import MagicMirrorAdapterTorch, magic_mirror_forward
from tests.test_dit import TINY, _torch_rope
from tools.convert_weights.from_torch import convert

ADAPTER = dict(dit_dim=32, text_dim=32, time_embed_dim=16, num_dit_layers=3, adapter_layers=(0, 2), clip_width=24,
               id_dim=16, width=32, depth=2, heads=2, head_dim=16, ff_mult=4, num_face_tokens=4, num_id_tokens=3,
               id_mlp_hidden=32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel

    root = tmp_path_factory.mktemp("mm")
    torch.manual_seed(0)
    dit_t = CogVideoXTransformer3DModel(**dict(TINY, num_layers=3, use_rotary_positional_embeddings=True)).eval()
    randomize_torch_params(dit_t, 0)
    dit_t.save_pretrained(root / "dit")
    cfg = AdapterConfig(**ADAPTER)
    ad_t = MagicMirrorAdapterTorch(cfg.to_dict()).eval()
    randomize_torch_params(ad_t, 1)  # every weight non-zero, the zero-init layers included
    (root / "adapter").mkdir()
    save_file({k: v.contiguous() for k, v in ad_t.state_dict().items()}, root / "adapter" / "model.safetensors")
    (root / "adapter" / "config.json").write_text(json.dumps(cfg.to_dict()))
    dit = checkpoint.load_component(convert(root / "dit", root / "dit_ckpt"), "transformer")
    ad = checkpoint.load_component(convert(root / "adapter", root / "ad_ckpt"), "adapter")
    return dit_t, ad_t, dit, ad


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(b, 2, 4, 8, 12, generator=g), text=torch.randn(b, 7, 32, generator=g),
                t=torch.tensor([999, 321][:b]), clip=torch.randn(b, 5, 24, generator=g),
                e_id=torch.nn.functional.normalize(torch.randn(b, 16, generator=g), dim=-1))


def _ours(dit, ad, x, class_index, has_id=None):
    x_id, x_face = ad.encode(x["clip"].numpy(), x["e_id"].numpy())
    text = ad.fuse(jnp.asarray(x["text"].numpy()), x_id, jnp.full((x["text"].shape[0],), class_index))
    lat = x["latents"].permute(0, 1, 3, 4, 2).numpy()
    return identity_forward(dit, ad, lat, text, x["t"].numpy(), x_id=x_id, x_face=x_face, has_id=has_id)


def test_adapter_matches_the_independent_torch_reference(models):
    dit_t, ad_t, dit, ad = models
    x = _inputs()
    with torch.no_grad():
        want = magic_mirror_forward(dit_t, ad_t, x["latents"], x["text"], x["t"], x["clip"], x["e_id"], 2,
                                    _torch_rope(dit_t, 2, 8, 12))
    got = _ours(dit, ad, x, 2)
    assert max_rel_err(got, want.permute(0, 1, 3, 4, 2).numpy()) <= 1e-5


def test_without_a_reference_face_it_is_plain_cogvideox(models):
    dit_t, _, dit, ad = models
    x = _inputs()
    with torch.no_grad():
        want = dit_t(hidden_states=x["latents"], encoder_hidden_states=x["text"], timestep=x["t"],
                     image_rotary_emb=_torch_rope(dit_t, 2, 8, 12), return_dict=False)[0]
    got = identity_forward(dit, ad, x["latents"].permute(0, 1, 3, 4, 2).numpy(), x["text"].numpy(), x["t"].numpy())
    assert max_rel_err(got, want.permute(0, 1, 3, 4, 2).numpy()) <= 1e-5


def test_cfg_batch_with_a_masked_unconditional_half_equals_two_runs(models):
    _, _, dit, ad = models
    x = _inputs(1, b=1)
    neg = np.random.default_rng(0).standard_normal((1, 7, 32)).astype(np.float32)
    lat = x["latents"].permute(0, 1, 3, 4, 2).numpy()
    t = x["t"].numpy()
    x_id, x_face = ad.encode(x["clip"].numpy(), x["e_id"].numpy())
    text = ad.fuse(jnp.asarray(x["text"].numpy()), x_id, jnp.array([2]))
    cond = identity_forward(dit, ad, lat, text, t, x_id=x_id, x_face=x_face)
    uncond = dit(lat, neg, t)
    both = identity_forward(dit, ad, np.concatenate([lat, lat]), jnp.concatenate([neg, text]), np.concatenate([t, t]),
                            x_id=jnp.concatenate([x_id, x_id]), x_face=jnp.concatenate([x_face, x_face]),
                            has_id=jnp.array([False, True]))
    assert max_rel_err(both[:1], uncond) <= 1e-5 and max_rel_err(both[1:], cond) <= 1e-5


def test_fresh_adapter_fuses_as_identity_and_modulates_faces_like_text(models):
    _, _, dit, _ = models
    ad = MagicMirrorAdapter(AdapterConfig(**ADAPTER), rngs=nnx.Rngs(0))
    ad.init_from_dit(dit)
    x = _inputs()
    x_id, _ = ad.encode(x["clip"].numpy(), x["e_id"].numpy())
    text = jnp.asarray(x["text"].numpy())
    fused = ad.fuse(text, x_id, jnp.array([2, 5]))
    np.testing.assert_array_equal(fused[0], jnp.concatenate([text[0, :2], jnp.repeat(text[0, 2:3], 3, 0), text[0, 3:5]]))
    np.testing.assert_array_equal(fused[1], jnp.concatenate([text[1, :5], jnp.repeat(text[1, 5:6], 2, 0)]))
    temb = dit.time_embed(jnp.array([999, 5]))
    cond = ad.block_conditioning(x_id)(2, temb)
    text_expert = dit.transformer_blocks[2].norm1.modulation(temb)[:, 3:6]
    assert max_rel_err(cond.extra_mod[:, :3], text_expert) <= 1e-6
    assert float(jnp.max(jnp.abs(cond.residual))) == 0.0
    assert ad.block_conditioning(x_id)(1, temb) is None  # odd blocks carry no adapter


def test_class_word_lookup_and_its_error():
    from tests.tiny_pipeline import train_tokenizer
    import tempfile
    from pathlib import Path

    tok = train_tokenizer(Path(tempfile.mkdtemp()) / "spm")
    prompt = "close up of a man is walking on the beach"
    ids = tok(prompt).input_ids
    i = find_class_token(tok, prompt, np.array(ids), ("woman", "man"))
    # the word's first token: everything from it on starts with the word, nothing before holds it
    assert tok.decode(ids[i:]).strip().startswith("man is walking")
    assert tok.decode(ids[:i]).strip() == "close up of a"
    with pytest.raises(ValueError, match="needs one of: woman, boy"):
        find_class_token(tok, "a dog on the beach", np.array(ids), ("woman", "boy"))


def test_added_parameter_count_of_the_5b_adapter():
    cfg = AdapterConfig()
    with torch.device("meta"):
        ref = MagicMirrorAdapterTorch(cfg.to_dict())
    n = count_params(cfg)
    assert n == sum(p.numel() for p in ref.parameters()) == 630_766_080


def test_adapter_checkpoint_round_trips_apart_from_the_backbone(models, tmp_path):
    _, _, _, ad = models
    checkpoint.save_module(tmp_path, "adapter", ad)
    back = checkpoint.load_component(tmp_path, "adapter")
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ad, nnx.Param)), nnx.to_flat_state(nnx.state(back, nnx.Param))):
        np.testing.assert_array_equal(a.get_value(), b.get_value(), err_msg=str(p))
