"""The I2V first-frame preprocessing equals diffusers' ``VideoProcessor.preprocess`` (Lanczos stretch
to the output size, [-1, 1]), and an I2V checkpoint is told from its configs."""
from __future__ import annotations

import numpy as np
import pytest

from mm_jax import components, presets
from mm_jax import image_conditioning as ic


def _configs(in_channels: int):
    """The published 5B DiT config with ``in_channels`` and the CogVideoX VAE config (16 latent channels)."""
    dit = components.get("transformer").config_from_dict(dict(presets.load("cogvideox5b_transformer"),
                                                               in_channels=in_channels))
    return dit, components.get("vae").config_from_dict(presets.load("cogvideox_vae"))


def test_load_image_equals_diffusers_preprocess_for_an_image_of_another_size_and_aspect(tmp_path):
    from diffusers.video_processor import VideoProcessor
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), np.uint8)).save(tmp_path / "a.png")
    ours = ic.load_image(tmp_path / "a.png", 64, 96)
    ref = VideoProcessor(vae_scale_factor=8).preprocess(Image.open(tmp_path / "a.png"), height=64, width=96)
    assert ours.shape == (1, 1, 64, 96, 3) and tuple(ref.shape) == (1, 3, 64, 96)
    assert np.max(np.abs(ours[0, 0] - ref[0].permute(1, 2, 0).numpy())) <= 1e-6


def test_an_rgba_image_is_converted_with_a_warning(tmp_path):
    from PIL import Image

    Image.new("RGBA", (16, 16), (255, 0, 0, 10)).save(tmp_path / "a.png")
    with pytest.warns(UserWarning, match="image mode RGBA: converted to RGB"):
        x = ic.load_image(tmp_path / "a.png", 16, 16)
    assert np.allclose(x[0, 0, 0, 0], [1.0, -1.0, -1.0])


@pytest.mark.parametrize("in_channels,kind", [(16, "t2v"), (32, "i2v")])
def test_the_kind_follows_the_transformer_input_channels_against_the_vae_latents(in_channels, kind):
    assert ic.kind(*_configs(in_channels)) == kind


def test_other_input_channels_are_an_error():
    with pytest.raises(ValueError, match="in_channels 24 fits neither text-to-video \\(16"):
        ic.kind(*_configs(24))
