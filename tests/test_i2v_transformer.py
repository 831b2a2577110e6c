"""The CogVideoX-5B-I2V transformer (32-channel style input, learned positions on top of RoPE)
equals diffusers' ``CogVideoXTransformer3DModel`` after conversion by our tool, and its learned
table's other sizes are an error (height/width, text length) or a warned sin-cos fallback (frames)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mm_jax import checkpoint
from mm_jax.models.learned_positions import LearnedTableWarning
from tests.conftest import max_rel_err, randomize_torch_params
from tests.test_dit import _torch_rope
from tools.convert_weights.from_torch import convert

# in = 2 x out: noisy latents ++ image latents on channels, as the I2V model
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, num_layers=2,
            text_embed_dim=32, time_embed_dim=16, sample_width=12, sample_height=8, sample_frames=9,
            max_text_seq_length=7, patch_size=2, use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(**TINY).eval()
    randomize_torch_params(m, 0)
    pe = m.patch_embed.pos_embedding  # a buffer, not a parameter: random values, text rows too
    assert "patch_embed.pos_embedding" in m.state_dict() and pe.shape == (1, 7 + 3 * 4 * 6, 32)
    pe.copy_(torch.randn(pe.shape, generator=torch.Generator().manual_seed(5)))
    src = tmp_path_factory.mktemp("src") / "transformer"
    m.save_pretrained(src)
    dst = convert(src, tmp_path_factory.mktemp("dst") / "ckpt")
    return m, checkpoint.load_component(dst, "transformer")


def _run(m, ours, frames, h, w, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, frames, 8, h, w, generator=g)
    text = torch.randn(2, 7, 32, generator=g)
    t = torch.tensor([999, 17])
    with torch.no_grad():
        ref = m(hidden_states=x, encoder_hidden_states=text, timestep=t,
                image_rotary_emb=_torch_rope(m, frames, h, w), return_dict=False)[0]
    y = ours(x.permute(0, 1, 3, 4, 2).numpy(), text.numpy(), t.numpy())
    return max_rel_err(np.asarray(y), ref.permute(0, 1, 3, 4, 2).numpy())


def test_i2v_dit_with_learned_positions_matches_diffusers(converted, recwarn):
    m, ours = converted
    assert ours.patch_embed.pos_embedding[...].shape == (1, 79, 32)
    np.testing.assert_array_equal(np.asarray(ours.patch_embed.pos_embedding[...]),
                                  m.patch_embed.pos_embedding.numpy())
    err = _run(m, ours, 3, 8, 12)  # the table's own size: (9 - 1) / 4 + 1 = 3 latent frames
    assert err <= 1e-5, err
    assert not [w for w in recwarn if issubclass(w.category, LearnedTableWarning)]


def test_other_frame_counts_warn_and_use_the_sincos_table_as_diffusers(converted):
    m, ours = converted
    with pytest.warns(LearnedTableWarning, match="2 latent frames: the learned positional table covers 3"):
        err = _run(m, ours, 2, 8, 12)
    assert err <= 1e-5, err


def test_other_latent_sizes_or_text_lengths_are_errors(converted):
    _, ours = converted
    x = np.zeros((1, 3, 8, 8, 8), np.float32)
    with pytest.raises(ValueError, match="latent height x width 8 x 8: .* covers only 8 x 12 latents"):
        ours(x, np.zeros((1, 7, 32), np.float32), np.array([1]))
    with pytest.raises(ValueError, match="text length 5: .* max_text_seq_length=7"):
        ours(np.zeros((1, 3, 8, 12, 8), np.float32), np.zeros((1, 5, 32), np.float32), np.array([1]))


def test_the_5b_i2v_preset_is_the_5b_with_32_input_channels_and_the_learned_table():
    """+16 input channels of the 2x2 patch conv (16*4*3072) and the (1, 226 + 13*30*45, 3072) table."""
    from mm_jax import components, presets

    def count(name):
        cfg = components.get("transformer").config_from_dict(presets.load(name))
        return cfg, checkpoint.param_shapes(checkpoint.abstract_model("transformer", cfg))

    t2v, t2v_shapes = count("cogvideox5b_transformer")
    i2v, shapes = count("cogvideox5b_i2v_transformer")
    assert (i2v.in_channels, i2v.out_channels, i2v.num_attention_heads, i2v.attention_head_dim, i2v.num_layers) == \
        (32, 16, 48, 64, 42)
    assert shapes["patch_embed/pos_embedding"][0] == (1, 226 + 13 * 30 * 45, 3072)
    total = lambda s: sum(int(np.prod(v[0])) for v in s.values())  # noqa: E731
    assert total(shapes) - total(t2v_shapes) == 16 * 4 * 3072 + (226 + 13 * 30 * 45) * 3072 == 54_804_480
