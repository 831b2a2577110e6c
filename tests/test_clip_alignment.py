"""CLIP text alignment: our converted CLIPModel equals transformers' on both towers' projected
features, our frame preprocessing equals CLIPImageProcessor, and ``mm_jax.evaluate --clip``
reports 100 * max(cos, 0) averaged over frames as computed with torch."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mm_jax import checkpoint, evaluate
from mm_jax.metrics.text_alignment import preprocess
from mm_jax.models.clip import CLIPConfig
from mm_jax.demo.standin_faces import face_image, make_pack
from tests.conftest import (assert_checkpoint_round_trips, assert_params_hold_the_torch_tensors,
                            assert_stacks_have_a_leading_layers_axis, max_rel_err, randomize_torch_params)
from tools.convert_weights.from_torch import CheckpointError, convert

EOT = 513  # the tiny tokenizer: 256 byte symbols, the same with "</w>", then <|startoftext|> 512, <|endoftext|> 513


def _tokenizer():
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    return CLIPTokenizer(vocab=vocab | {"<|startoftext|>": 512, "<|endoftext|>": EOT}, merges=[])


def _tiny_clip(folder, eos_token_id):
    """A random transformers CLIPModel + its tokenizer saved in ``folder``."""
    from transformers import CLIPConfig as HFConfig, CLIPModel

    torch.manual_seed(0)
    cfg = HFConfig(text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id),
                   vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                      image_size=28, patch_size=14),
                   projection_dim=24)
    ref = CLIPModel(cfg).eval()
    randomize_torch_params(ref, 0)
    ref.save_pretrained(folder)
    _tokenizer().save_pretrained(folder)
    return ref


def _feats(out):
    return (out.pooler_output if hasattr(out, "pooler_output") else out).numpy()


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip")
    ref = _tiny_clip(root / "hf", EOT)
    return ref, convert(root / "hf", root / "ckpt", ["clip"])


@pytest.mark.parametrize("eos_token_id", [2, EOT])  # 2: transformers' legacy rule, pooled at argmax(ids)
def test_projected_text_and_image_features_match_transformers(tmp_path, eos_token_id):
    ref = _tiny_clip(tmp_path / "hf", eos_token_id)
    ours = checkpoint.load_component(convert(tmp_path / "hf", tmp_path / "ckpt", ["clip"]), "clip")
    ids = _tokenizer()(["a man reading", "a woman, smiling!"], padding="max_length", max_length=16,
                       truncation=True, return_tensors="pt").input_ids
    px = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_t, want_i = _feats(ref.get_text_features(input_ids=ids)), _feats(ref.get_image_features(pixel_values=px))
    assert max_rel_err(ours.text_embeds(ids.numpy().astype(np.int32)), want_t) <= 1e-5
    assert max_rel_err(ours.image_embeds(px.permute(0, 2, 3, 1).numpy()), want_i) <= 1e-5


def test_both_towers_layers_are_stacks_and_the_converted_checkpoint_round_trips(clip_pair, tmp_path):
    ref, ckpt = clip_pair
    ours = checkpoint.load_component(ckpt, "clip")
    assert_stacks_have_a_leading_layers_axis("clip", ours, {"text_model/encoder/layers": 2,
                                                            "vision_model/encoder/layers": 2})
    sd = ref.state_dict()
    assert assert_params_hold_the_torch_tensors("clip", ours, sd) == len(sd)
    assert_checkpoint_round_trips("clip", ours, tmp_path)


def test_unrolled_towers_give_the_scanned_features(clip_pair):
    _, ckpt = clip_pair
    scanned, unrolled = (checkpoint.load_component(ckpt, "clip", scan_layers=s) for s in (True, False))
    assert not unrolled.cfg.text.scan_layers and not unrolled.cfg.vision.scan_layers
    ids = np.array([[512, 70, 80, EOT, 0, 0]], np.int32)
    px = np.random.default_rng(3).standard_normal((2, 28, 28, 3)).astype(np.float32)
    assert max_rel_err(unrolled.text_embeds(ids), scanned.text_embeds(ids)) <= 1e-6
    assert max_rel_err(unrolled.image_embeds(px), scanned.image_embeds(px)) <= 1e-6


def test_frame_preprocessing_matches_clip_image_processor():
    from transformers import CLIPImageProcessor

    frames = (np.random.default_rng(0).random((2, 45, 70, 3)) * 255).astype(np.uint8)  # landscape, odd sizes
    proc = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    want = proc(images=list(frames), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    assert np.max(np.abs(preprocess(frames, 28) - want)) <= 1e-5
    tall = frames.transpose(0, 2, 1, 3).copy()  # portrait
    want = proc(images=list(tall), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
    assert np.max(np.abs(preprocess(tall, 28) - want)) <= 1e-5


def test_evaluate_reports_clip_text_alignment_computed_with_torch(tmp_path, clip_pair):
    ref, ckpt = clip_pair
    frames = np.stack([face_image(at=(96, 160 + 4 * i)) for i in range(3)])
    (tmp_path / "videos").mkdir(), (tmp_path / "refs").mkdir()
    np.save(tmp_path / "videos" / "clip1.npy", frames.astype(np.float32) / 255.0)
    np.save(tmp_path / "videos" / "clip2.npy", frames.astype(np.float32) / 255.0)
    for n in ("clip1", "clip2"):
        iio.imwrite(tmp_path / "refs" / f"{n}.png", face_image(at=(96, 160)))
    prompt = "a man reading a book"
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"id": "clip1", "prompt": prompt}) + "\n")
    rc = evaluate.main(["--videos", str(tmp_path / "videos"), "--refs", str(tmp_path / "refs"), "--face-models",
                        str(make_pack(tmp_path / "pack")), "--prompts", str(tmp_path / "prompts.jsonl"),
                        "--clip", str(ckpt), "--out", str(tmp_path / "r.json"), "--quiet", "--batch-size", "2"])
    rep = json.loads((tmp_path / "r.json").read_text())
    from transformers import CLIPImageProcessor

    px = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})(
        images=list(frames), return_tensors="pt").pixel_values
    ids = _tokenizer()([prompt], padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        img, txt = _feats(ref.get_image_features(pixel_values=px)), _feats(ref.get_text_features(input_ids=ids))
    cos = (img / np.linalg.norm(img, axis=-1, keepdims=True)) @ (txt[0] / np.linalg.norm(txt[0]))
    want = 100 * np.maximum(cos, 0)
    by_name = {v["name"]: v for v in rep["videos"]}
    assert rc == 0 and "clip_text_alignment" not in rep["absent"]
    assert max_rel_err(by_name["clip1"]["per_frame"]["clip_text_alignment"], want) <= 1e-5
    assert by_name["clip1"]["clip_text_alignment"] == pytest.approx(want.mean(), rel=1e-5)
    assert by_name["clip2"]["clip_text_alignment"] is None and "no prompt" in by_name["clip2"]["absent"]["clip_text_alignment"]
    assert rep["mean"]["clip_text_alignment"] == pytest.approx(want.mean(), rel=1e-5)
    assert rep["mean"]["videos_counted"]["clip_text_alignment"] == 1


def test_a_clip_folder_without_its_tokenizer_is_refused_before_writing(tmp_path, clip_pair):
    ref, _ = clip_pair
    ref.save_pretrained(tmp_path / "hf")  # weights and config, no tokenizer files
    with pytest.raises(CheckpointError, match="needs its tokenizer"):
        convert(tmp_path / "hf", tmp_path / "ckpt", ["clip"])
    assert not (tmp_path / "ckpt").exists()


def test_real_clip_vit_l14_has_its_published_parameter_count(manifests_dir):
    vision = json.loads((manifests_dir / "clip_vit_l14_vision_config.json").read_text())
    cfg = CLIPConfig.from_dict({"text_config": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                    num_attention_heads=12), "vision_config": vision,
                                "projection_dim": 768})
    shapes = checkpoint.param_shapes(checkpoint.abstract_model("clip", cfg))
    assert sum(int(np.prod(s)) for s, _ in shapes.values()) == 427_616_513  # openai/clip-vit-large-patch14
