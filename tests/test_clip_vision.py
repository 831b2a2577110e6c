"""The Flax CLIP ViT tower equals transformers' CLIPVisionModel on the penultimate hidden states."""
import numpy as np
import pytest
import torch

from mm_jax import checkpoint
from tests.conftest import (assert_checkpoint_round_trips, assert_params_hold_the_torch_tensors,
                            assert_stacks_have_a_leading_layers_axis, max_rel_err, randomize_torch_params)
from tools.convert_weights.from_torch import check_manifest, convert


def _converted_pair(tmp_path, hidden_act, **overrides):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    ref = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=56, patch_size=14,
                                           hidden_act=hidden_act)).eval()
    randomize_torch_params(ref, 0)
    ref.save_pretrained(tmp_path / "src")
    return ref, checkpoint.load_component(convert(tmp_path / "src", tmp_path / "ckpt"), "image_encoder", **overrides)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_penultimate_hidden_states_match_transformers(tmp_path, hidden_act):
    ref, ours = _converted_pair(tmp_path, hidden_act)
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(pixel_values=x, output_hidden_states=True).hidden_states  # L + 1 = 4 entries
    got = ours(x.permute(0, 2, 3, 1).numpy())
    assert got.shape == (2, 1 + 16, 32)
    assert max_rel_err(got, want[-2].numpy()) <= 1e-5
    every = ours(x.permute(0, 2, 3, 1).numpy(), all_hidden=True)
    assert len(every) == len(want) == 4
    assert max(max_rel_err(a, b.numpy()) for a, b in zip(every, want)) <= 1e-5


def test_unrolled_layers_give_the_scanned_hidden_states(tmp_path):
    ref, scanned = _converted_pair(tmp_path / "a", "quick_gelu")
    _, unrolled = _converted_pair(tmp_path / "b", "quick_gelu", scan_layers=False)
    x = np.random.default_rng(2).standard_normal((2, 56, 56, 3)).astype(np.float32)
    assert max_rel_err(unrolled(x), scanned(x)) <= 1e-6
    assert all(max_rel_err(a, b) <= 1e-6 for a, b in zip(unrolled(x, all_hidden=True), scanned(x, all_hidden=True)))


def test_encoder_layers_are_one_stack_and_the_converted_checkpoint_round_trips(tmp_path):
    ref, ours = _converted_pair(tmp_path, "quick_gelu")
    assert_stacks_have_a_leading_layers_axis("image_encoder", ours, {"encoder/layers": 3})
    sd = ref.state_dict()
    assert assert_params_hold_the_torch_tensors("image_encoder", ours, sd) == len(sd)
    fc2 = next(k for k in sd if k.endswith("encoder.layers.2.mlp.fc2.weight"))  # with or without vision_model.
    np.testing.assert_array_equal(np.asarray(ours.encoder.layers.mlp.fc2.kernel.get_value()[2]), sd[fc2].numpy().T)
    assert_checkpoint_round_trips("image_encoder", ours, tmp_path / "again")


def test_the_penultimate_forward_does_not_copy_the_layers_it_runs():
    # scanning a slice of the stack (layers 0..L-2) made XLA materialize the slice: temporaries of
    # the size of the weights (1.16 GiB for CLIP-L in float32, 51 MiB without)
    import jax
    from flax import nnx

    from mm_jax.models.clip_vision import CLIPVisionConfig

    cfg = CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4,
                           image_size=28, patch_size=14)
    graphdef, state = nnx.split(checkpoint.abstract_model("image_encoder", cfg))
    px = jax.ShapeDtypeStruct((1, 28, 28, 3), np.float32)
    mem = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x)).lower(state, px).compile().memory_analysis()
    assert mem.temp_size_in_bytes < 0.25 * mem.argument_size_in_bytes, (mem.temp_size_in_bytes, mem.argument_size_in_bytes)


def test_pixels_of_another_size_are_refused(tmp_path):
    _, ours = _converted_pair(tmp_path, "quick_gelu")
    with pytest.raises(ValueError, match=r"takes \(B, 56, 56, 3\)"):
        ours(np.zeros((1, 42, 42, 3), np.float32))


def test_manifest_of_clip_vit_l14_maps_exactly(manifests_dir):
    assert check_manifest(manifests_dir / "clip_vit_l14_vision.json") == 303_179_776
