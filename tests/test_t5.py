"""T5 v1.1 encoder equals transformers' T5EncoderModel; tokenization equals the CogVideoX pipeline's."""
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mm_jax import checkpoint, text
from mm_jax.models.t5 import relative_position_buckets
from tests.conftest import max_rel_err
from tests.tiny_pipeline import train_tokenizer
from tools.convert_weights.from_torch import check_manifest, convert


def _t5(vocab, seed=0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    m = T5EncoderModel(T5Config(vocab_size=vocab, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                                relative_attention_max_distance=128, dropout_rate=0.0)).eval()
    # T5's own (scaled) initialization keeps the un-normalized attention logits at realistic
    # magnitudes; the norm weights, which it sets to 1, are randomized so that they are exercised.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "layer_norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(tmp_path_factory.mktemp("spm"))


def test_t5_encoder_matches_transformers_over_226_tokens(tokenizer, tmp_path):
    m = _t5(len(tokenizer))
    m.save_pretrained(tmp_path / "src")
    ours = checkpoint.load_component(convert(tmp_path / "src", tmp_path / "ckpt"), "text_encoder")
    ids = text.tokenize(tokenizer, ["a man is walking on the beach", ""], max_length=226)
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()
    assert max_rel_err(ours(ids), ref) <= 1e-5


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_buckets(300, 300, 32, 128), ref.numpy())


@pytest.mark.parametrize("stored_as", ["shared.weight", "encoder.embed_tokens.weight"])
def test_tied_embedding_converts_from_either_name(tokenizer, tmp_path, stored_as):
    m = _t5(len(tokenizer))
    m.save_pretrained(tmp_path / "src")
    f = next((tmp_path / "src").glob("*.safetensors"))
    sd = load_file(f)
    emb = m.shared.weight.detach().clone()
    for k in ("shared.weight", "encoder.embed_tokens.weight"):
        sd.pop(k, None)
    sd[stored_as] = emb
    save_file(sd, f)
    ours = checkpoint.load_component(convert(tmp_path / "src", tmp_path / "ckpt"), "text_encoder")
    np.testing.assert_array_equal(np.asarray(ours.shared.embedding.get_value()), emb.numpy())


def test_tokenize_is_the_pipeline_call_and_warns_on_truncation(tokenizer):
    prompts = ["a woman plays the guitar", "a man " * 200]
    ref = tokenizer(prompts, padding="max_length", max_length=226, truncation=True, add_special_tokens=True,
                    return_tensors="np").input_ids
    with pytest.warns(UserWarning, match="truncated to 226 T5 tokens"):
        ids = text.tokenize(tokenizer, prompts, max_length=226)
    np.testing.assert_array_equal(ids, ref)
    assert ids.shape == (2, 226) and ids[0, list(ids[0]).index(1) + 1:].max() == 0  # </s> then pads
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text.tokenize(tokenizer, prompts[:1])


def test_manifest_of_t5_v1_1_xxl_maps_exactly(shared_dir):
    assert check_manifest(shared_dir / "manifests" / "t5_v1_1_xxl_encoder.json") == 4_762_310_656
