"""T5 v1.1 encoder equals transformers' T5EncoderModel; tokenization equals the CogVideoX pipeline's."""
import types
import warnings

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from mm_jax import checkpoint, text
from mm_jax.models.t5 import T5Config, relative_position_buckets
from tests.conftest import (assert_checkpoint_round_trips, assert_params_hold_the_torch_tensors,
                            assert_stacks_have_a_leading_layers_axis, max_rel_err, randomize_torch_params)
from tests.tiny_pipeline import CORPUS
from tools.convert_weights.from_torch import check_manifest, convert

VOCAB = 80  # 64 SentencePiece pieces + 8 sentinels, padded beyond the tokenizer like XXL's 32128 > 32100


def _t5(feed_forward_proj="gated-gelu", seed=0):
    from transformers import T5Config as HFT5Config, T5EncoderModel

    torch.manual_seed(seed)
    m = T5EncoderModel(HFT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                  feed_forward_proj=feed_forward_proj, relative_attention_num_buckets=32,
                                  relative_attention_max_distance=128, dropout_rate=0.0)).eval()
    # Every param randomized; scale 0.1, not 0.2: T5 has no 1/sqrt(d) logit scaling, so at 0.2 the
    # logits are ~4x those of T5's own init and the fp32 reference's rounding alone (8e-6 against a
    # float64 run) nears the 1e-5 tolerance; at 0.1 it is 1e-6 and the test measures our port.
    randomize_torch_params(m, seed, scale=0.1)
    return m


def _convert(m, folder):
    m.save_pretrained(folder / "src")
    return convert(folder / "src", folder / "ckpt")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A SentencePiece unigram T5 tokenizer, saved with save_pretrained and reloaded by our loader."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(folder / "corpus.txt"), model_prefix=str(folder / "spiece"),
                                   vocab_size=64, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    T5Tokenizer.from_pretrained(str(folder), extra_ids=8).save_pretrained(str(folder / "tokenizer"))
    tok = text.load_tokenizer(folder / "tokenizer")
    assert len(tok) == 72 and tok.unk_token_id not in tok("a man is walking").input_ids
    return tok


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(torch model, our model) for the T5 v1.1 (gated-gelu) tiny config."""
    m = _t5()
    ckpt = _convert(m, tmp_path_factory.mktemp("t5"))
    return m, checkpoint.load_component(ckpt, "text_encoder")


@nnx.jit
def _ours(model, ids, mask=None):  # one compile per shape: faster on CPU than eager op by op
    return model(ids, mask)


def _ref(m, ids):
    with torch.no_grad():
        return m(input_ids=torch.from_numpy(np.asarray(ids)).long()).last_hidden_state.float().numpy()


def test_t5_encoder_matches_transformers_over_226_tokens(converted, tokenizer):
    # 226 tokens with max_distance 128: both saturated buckets (15 and 31) are in use.
    m, ours = converted
    ids = text.tokenize(tokenizer, ["a man is walking on the beach", ""], max_length=226)
    assert max_rel_err(_ours(ours, ids), _ref(m, ids)) <= 1e-5


def test_t5_encoder_matches_transformers_with_attention_mask(converted):
    m, ours = converted
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 40)).astype(np.int32)
    mask = np.ones((2, 40), np.int32)
    mask[1, 25:] = 0
    with torch.no_grad():
        ref = m(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    assert max_rel_err(_ours(ours, ids, mask), ref.numpy()) <= 1e-5


def test_relative_position_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(300)[None, :] - torch.arange(300)[:, None]
    ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128)
    np.testing.assert_array_equal(relative_position_buckets(300, 300, 32, 128), ref.numpy())


def test_t5_blocks_are_one_stack_whose_parameters_lead_with_the_layers_axis(converted):
    _, ours = converted
    assert_stacks_have_a_leading_layers_axis("text_encoder", ours, {"encoder/block": 2})
    assert ours.encoder.block.layer[1].DenseReluDense.wo.kernel.get_value().shape == (2, 48, 32)


def test_converted_t5_holds_every_torch_tensor_and_its_checkpoint_round_trips(converted, tmp_path):
    m, ours = converted
    sd = m.state_dict()
    assert assert_params_hold_the_torch_tensors("text_encoder", ours, sd) == len(sd) - 1  # the tied copy
    # the shared position-bias table is block 0's, held once outside the stack; block 1's wo is layer 1
    np.testing.assert_array_equal(np.asarray(ours.encoder.relative_attention_bias.embedding.get_value()),
                                  sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].numpy())
    np.testing.assert_array_equal(np.asarray(ours.encoder.block.layer[1].DenseReluDense.wo.kernel.get_value()[1]),
                                  sd["encoder.block.1.layer.1.DenseReluDense.wo.weight"].numpy().T)
    assert_checkpoint_round_trips("text_encoder", ours, tmp_path)


def test_unrolled_blocks_give_the_scanned_output(converted, tmp_path):
    m, ours = converted
    m.save_pretrained(tmp_path / "src")
    unrolled = checkpoint.load_component(convert(tmp_path / "src", tmp_path / "ckpt"), "text_encoder",
                                         scan_layers=False)
    ids = np.random.RandomState(3).randint(0, VOCAB, (2, 40)).astype(np.int32)
    assert max_rel_err(_ours(unrolled, ids), _ours(ours, ids)) <= 1e-6


@pytest.mark.parametrize("feed_forward_proj", ["relu", "gated-silu"])
def test_other_feed_forward_variants_match_transformers(tmp_path, feed_forward_proj):
    m = _t5(feed_forward_proj, seed=1)
    ours = checkpoint.load_component(_convert(m, tmp_path), "text_encoder")
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 40)).astype(np.int32)
    assert max_rel_err(_ours(ours, ids), _ref(m, ids)) <= 1e-5


@pytest.mark.parametrize("field,value,match", [("feed_forward_proj", "gated-swish", "supported are"),
                                               ("feed_forward_proj", "glu-gelu", "supported are"),
                                               ("dtype", "float16", "float16 overflows")])
def test_unsupported_config_is_refused_naming_the_choices(field, value, match):
    with pytest.raises(ValueError, match=match):
        T5Config.from_dict({"d_model": 8}, **{field: value})


def test_source_config_dtype_does_not_set_our_runtime_dtype():
    # transformers 5 writes "dtype" into config.json; the runtime precision comes from overrides only
    assert T5Config.from_dict({"dtype": "bfloat16"}).dtype == "float32"
    assert T5Config.from_dict({"dtype": "float32"}, dtype="bfloat16").dtype == "bfloat16"


def test_bf16_encoder_loses_no_more_than_transformers_bf16(converted, tmp_path):
    from transformers import T5EncoderModel

    m, _ = converted
    m.save_pretrained(tmp_path / "src")
    ours = checkpoint.load_component(convert(tmp_path / "src", tmp_path / "ckpt"), "text_encoder",
                                     dtype="bfloat16", param_dtype="bfloat16")
    ref_bf16 = T5EncoderModel.from_pretrained(tmp_path / "src", dtype=torch.bfloat16).eval()
    ids = np.random.RandomState(2).randint(0, VOCAB, (2, 226)).astype(np.int32)
    y = _ours(ours, ids)
    assert y.dtype == np.dtype("bfloat16") and np.isfinite(np.asarray(y, np.float32)).all()
    # mean |error| against the fp32 model, ours vs transformers' own bf16 run (max errors are ~2e-2
    # for both but too noisy to compare); transformers 5 keeps `wo` in bf16 here, as we do
    ref32 = _ref(m, ids)
    mean_err = lambda a: float(np.abs(a - ref32).mean() / np.abs(ref32).mean())
    ours_err, ref_err = mean_err(np.asarray(y, np.float32)), mean_err(_ref(ref_bf16, ids))
    assert ours_err <= 1.1 * ref_err, (ours_err, ref_err)


@pytest.mark.parametrize("stored_as", [("shared.weight",), ("encoder.embed_tokens.weight",),
                                       ("shared.weight", "encoder.embed_tokens.weight")])
def test_tied_embedding_converts_from_either_or_both_names(tmp_path, stored_as):
    m = _t5()
    m.save_pretrained(tmp_path / "src")
    f = next((tmp_path / "src").glob("*.safetensors"))
    sd = load_file(f)
    emb = m.shared.weight.detach().clone()
    for k in ("shared.weight", "encoder.embed_tokens.weight"):
        sd.pop(k, None)
    sd.update({k: emb.clone() for k in stored_as})
    save_file(sd, f)
    ours = checkpoint.load_component(convert(tmp_path / "src", tmp_path / "ckpt"), "text_encoder")
    np.testing.assert_array_equal(np.asarray(ours.shared.embedding.get_value()), emb.numpy())


def test_tokenize_is_the_pipeline_call_and_warns_how_many_tokens_were_dropped(tokenizer):
    prompts = ["a woman plays the guitar", "a man " * 150]
    ref = tokenizer(prompts, padding="max_length", max_length=226, truncation=True, add_special_tokens=True,
                    return_tensors="np").input_ids
    dropped = len(tokenizer(prompts[1], add_special_tokens=False).input_ids) - 225  # 225 words + </s> kept
    with pytest.warns(UserWarning, match=f"truncated to 226 T5 tokens: {dropped} token\\(s\\) dropped"):
        ids = text.tokenize(tokenizer, prompts, max_length=226)
    np.testing.assert_array_equal(ids, ref)
    assert ids.dtype == np.int32 and ids.shape == (2, 226)
    n = len(tokenizer(prompts[0]).input_ids)
    assert ids[0, n - 1] == 1 and not ids[0, n:].any() and ids[1, -1] == 1  # </s>, then pads; </s> kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(text.tokenize(tokenizer, ""), [[1] + [0] * 225])  # the negative prompt


def test_encode_prompts_equals_cogvideox_pipeline_prompt_embeds(converted, tokenizer):
    from diffusers import CogVideoXPipeline

    m, ours = converted
    prompts = ["a man is walking on the beach at sunset", ""]
    pipe = types.SimpleNamespace(tokenizer=tokenizer, text_encoder=m)
    with torch.no_grad():
        ref = CogVideoXPipeline._get_t5_prompt_embeds(pipe, prompts, device=torch.device("cpu")).numpy()
    emb = text.encode_prompts(ours, tokenizer, prompts)
    assert emb.shape == (2, 226, 32) and max_rel_err(emb, ref) <= 1e-5


def test_manifest_of_t5_v1_1_xxl_maps_exactly(manifests_dir):
    # the manifest stores both tied names, shared.weight and encoder.embed_tokens.weight
    assert check_manifest(manifests_dir / "t5_v1_1_xxl_encoder.json") == 4_762_310_656
