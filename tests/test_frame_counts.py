"""The frame-count rule: the counts ``mm_jax.frame_counts`` derives are the ones the VAE (ours and
diffusers') encodes and decodes exactly, and every entry point refuses the others by name."""
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mm_jax import frame_counts
from mm_jax.models.vae import AutoencoderKLCogVideoX, VAEConfig

TINY = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
            sample_height=64, sample_width=64)


def _output_shape(method: str, x_shape, **runtime):
    """The output shape of our VAE's ``encode``/``decode`` at tiny widths, traced abstractly (no weights
    are made: eager initialization of even a tiny VAE takes a minute on 2 cores)."""
    abstract = nnx.eval_shape(lambda: AutoencoderKLCogVideoX(VAEConfig(**TINY, **runtime), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    run = lambda st, x: getattr(nnx.merge(graphdef, st), method)(x)
    return jax.eval_shape(run, state, jax.ShapeDtypeStruct(x_shape, jnp.float32))


def test_cogvideox_counts_are_1_9_17_up_to_49():
    """The issue's list for CogVideoX (temporal compression 4, decode batches of 2)."""
    assert frame_counts.valid_frame_counts(49) == [1, 9, 17, 25, 33, 41, 49]
    assert not any(frame_counts.is_valid(t) for t in (5, 13, 21, 29, 37, 45, 2, 8, 10, 48, 0))


@pytest.mark.parametrize("decode_batch", [2, 3])
def test_decoded_frame_counts_equal_our_vae_decoder_output(decode_batch):
    for f in range(1, 8):
        out = _output_shape("decode", (1, f, 2, 2, 4), decode_frame_batch=decode_batch)
        assert out.shape[1] == frame_counts.decoded_frames(f, decode_batch=decode_batch), (f, out.shape)


@pytest.mark.parametrize("encode_batch", [8, 4])
def test_encoded_frame_counts_equal_our_vae_encoder_output(encode_batch):
    for t in (1, 5, 9, 13, 17, 21, 25, 33):
        post = _output_shape("encode", (1, t, 16, 16, 3), encode_frame_batch=encode_batch)
        assert post.mean.shape[1] == frame_counts.encoded_frames(t, encode_batch=encode_batch), (t, post.mean.shape)


def test_decoded_frame_counts_equal_the_diffusers_vae():
    """The reference decodes 2 latent frames (5 pixel frames' worth) to 8 frames, as the issue saw."""
    import torch
    from diffusers import AutoencoderKLCogVideoX as TorchVAE

    ref = TorchVAE(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("CogVideoXDownBlock3D",) * 4,
                   up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                   norm_num_groups=4, temporal_compression_ratio=4, sample_height=64, sample_width=64).eval()
    with torch.no_grad():
        for f in range(1, 6):
            frames = ref.decode(torch.zeros(1, 4, f, 2, 2)).sample.shape[2]
            assert frames == frame_counts.decoded_frames(f), (f, frames)
    assert frame_counts.decoded_frames(2) == 8


def test_the_rule_follows_the_vae_settings_rather_than_a_list():
    assert frame_counts.valid_frame_counts(30, ratio=2) == [1, 5, 9, 13, 17, 21, 25, 29]  # odd latent counts
    assert frame_counts.valid_frame_counts(40, decode_batch=3) == [1, 9, 17, 25]
    assert frame_counts.valid_frame_counts(49, **frame_counts.from_vae_config(VAEConfig())) == [1, 9, 17, 25, 33, 41, 49]


@pytest.mark.parametrize("frames,why", [(5, "its 2 latent frames decode to 8 frames"),
                                        (13, "its 4 latent frames decode to 16 frames"), (10, ""), (0, "")])
def test_a_bad_count_is_refused_naming_the_field_and_listing_the_valid_ones(frames, why):
    with pytest.raises(ValueError) as e:
        frame_counts.check(frames, "sample.frames")
    msg = str(e.value)
    assert msg.startswith(f"sample.frames={frames}: not a frame count the VAE encodes and decodes exactly")
    assert why in msg and "valid: 1, 9, 17, 25, 33, 41, 49, ..." in msg


def test_sample_settings_and_the_loader_refuse_counts_that_do_not_round_trip():
    from mm_jax.frame_counts import check_frames
    from mm_jax.pipeline import SampleSettings

    for frames in (5, 13, 21):
        with pytest.raises(ValueError, match=f"frames={frames}: not a frame count"):
            SampleSettings(prompt="a man", frames=frames, height=64, width=64).validate()
        with pytest.raises(ValueError, match=f"data.frames={frames}: not a frame count"):
            check_frames("video", frames)
    SampleSettings(prompt="a man", frames=17, height=64, width=64).validate()
    check_frames("video", 17)
