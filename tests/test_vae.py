"""The Flax CogVideoX VAE equals diffusers' AutoencoderKLCogVideoX: frame batching, tiling, images."""
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import load_file, save_file

from mm_jax import checkpoint
from mm_jax.models import vae as vae_lib
from tests.conftest import fake_devices_env, max_rel_err, randomize_torch_params
from tools.convert_weights.from_torch import check_manifest, convert
from tools.convert_weights.safetensors_io import CheckpointError

TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
            norm_num_groups=4, temporal_compression_ratio=4, sample_height=64, sample_width=64,
            down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(**TINY).eval()
    randomize_torch_params(ref, 0, scale=0.15)
    src = tmp_path_factory.mktemp("vae") / "vae"
    ref.save_pretrained(src)
    ckpt = convert(src, tmp_path_factory.mktemp("ck") / "ckpt")
    return ref, ckpt, src


def _video(t, h, w, seed=0):
    return torch.rand(1, 3, t, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _cl(x):  # torch (B, C, T, H, W) -> ours (B, T, H, W, C)
    return x.permute(0, 2, 3, 4, 1).numpy()


@pytest.mark.parametrize("frames", [17, 1])  # batches 9+8 (odd first batch), and a single image
def test_encode_matches_diffusers(pair, frames):
    ref, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae")
    x = _video(frames, 32, 32)
    with torch.no_grad():
        post = ref.encode(x).latent_dist
    mine = jax.jit(lambda v: ours.encode(v))(_cl(x))
    assert max_rel_err(mine.mean, _cl(post.mean)) <= 1e-4
    assert max_rel_err(mine.logvar, _cl(post.logvar)) <= 1e-4


@pytest.mark.parametrize("latent_frames", [5, 4, 1])  # batches 3+2 (odd), 2+2 (even), an image
def test_decode_matches_diffusers(pair, latent_frames):
    ref, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae")
    z = torch.randn(1, 4, latent_frames, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z).sample
    got = jax.jit(lambda v: ours.decode(v))(_cl(z))
    assert got.shape == _cl(want).shape
    assert max_rel_err(got, _cl(want)) <= 1e-4


def test_decode_with_nnx_conv_computing_the_causal_convs_matches_diffusers(pair, monkeypatch):
    # the path other backends take: nnx.Conv's own 3D conv instead of the CPU's temporal taps
    from mm_jax.models import vae_layers

    ref, ckpt, _ = pair
    monkeypatch.setattr(vae_layers, "TEMPORAL_TAPS_BACKENDS", ())
    ours = checkpoint.load_component(ckpt, "vae")
    z = torch.randn(1, 4, 5, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref.decode(z).sample
    assert max_rel_err(jax.jit(lambda v: ours.decode(v))(_cl(z)), _cl(want)) <= 1e-4


def test_vae_parameters_carry_logical_axes_and_no_layers_axis(pair):
    _, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae")
    axes = {".".join(map(str, k)): v.get_metadata().get("out_sharding")
            for k, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert axes["decoder.up_blocks.1.resnets.0.conv1.conv.kernel"] == (None, None, None, "conv_in", "conv_out")
    assert axes["encoder.down_blocks.0.downsamplers.0.conv.kernel"] == (None, None, "conv_in", "conv_out")
    assert axes["decoder.norm_out.norm_layer.scale"] == ("norm",)
    assert all(a and "layers" not in a for a in axes.values())


@pytest.mark.slow  # over 30 s on 2 CPU cores
def test_tiled_decode_and_encode_match_diffusers(pair):
    """Tiles of 48x40 pixels (6x5 latents): strides 40x32 pixels / 5x4 latents, blends 8x8 pixels /
    1x1 latents: a geometry whose tiles align, as the 5B's (240x360) do."""
    ref, ckpt, _ = pair
    ref.enable_tiling(tile_sample_min_height=48, tile_sample_min_width=40)
    try:
        ours = checkpoint.load_component(ckpt, "vae", use_tiling=True, tile_sample_min_height=48,
                                         tile_sample_min_width=40)
        z = torch.randn(1, 4, 3, 8, 10, generator=torch.Generator().manual_seed(2))  # 2x3 latent tiles: 6|3 x 5|5|2
        x = _video(9, 64, 72, seed=3)  # 2x3 pixel tiles: 48|24 x 40|40|8
        with torch.no_grad():
            want_dec = ref.decode(z).sample
            want_enc = ref.encode(x).latent_dist.mean
    finally:
        ref.disable_tiling()
    assert want_dec.shape[-2:] == (64, 80) and want_enc.shape[-2:] == (8, 9)
    assert max_rel_err(jax.jit(ours.decode)(_cl(z)), _cl(want_dec)) <= 1e-4
    assert max_rel_err(jax.jit(lambda v: ours.encode(v).mean)(_cl(x)), _cl(want_enc)) <= 1e-4


def test_one_padded_tile_shape_decodes_as_a_body_per_tile_shape(pair):
    """The tiled decode runs every tile through one decoder body: the edge tiles (here 6|3 x 5|5|2
    latents, 4 shapes) are zero-padded to 6x5 and the padding masked out of every GroupNorm's
    statistics and every conv's input. The video equals the decode with one body per tile shape
    (each edge tile at its own size, as the reference crops it) within fp32 1e-5."""
    _, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae", use_tiling=True, tile_sample_min_height=48, tile_sample_min_width=40)
    z = np.random.default_rng(4).standard_normal((1, 3, 8, 10, 4)).astype(np.float32)
    geometry = ours.decode_tiles()
    per_shape = jax.jit(lambda z: ours._tiled(z, type(ours)._decode_frames, *geometry, padded=False))(z)
    one = jax.jit(ours.decode)(z)
    assert one.shape == per_shape.shape == (1, 9, 64, 80, 3)
    assert max_rel_err(one, per_shape) <= 1e-5


def test_tiles_that_do_not_align_decode_untiled_at_the_input_size_with_a_warning(pair):
    """32x32 tiles on this VAE (stride 3 latents = 24 pixels, but each tile is cropped to 27x26):
    the reference would return 70x68 frames for 8x8 latents; ours warns and decodes without tiles."""
    _, ckpt, _ = pair
    tiled = checkpoint.load_component(ckpt, "vae", use_tiling=True, tile_sample_min_height=32, tile_sample_min_width=32)
    plain = checkpoint.load_component(ckpt, "vae")
    z = np.random.default_rng(1).standard_normal((1, 1, 8, 8, 4)).astype(np.float32)
    with pytest.warns(UserWarning, match="do not align"):
        got = np.asarray(tiled.decode(z))
    assert got.shape == (1, 1, 64, 64, 3)
    np.testing.assert_array_equal(got, np.asarray(plain.decode(z)))


def test_tiled_decode_spread_over_8_devices_equals_one_device(pair):
    """5 tiles of 2 shapes on 8 devices and on 3 (tests/sharded_vae_check.py): every shape group is
    one shard_map, its tile count padded to the device count, and the video equals one device's."""
    _, ckpt, _ = pair
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "tests" / "sharded_vae_check.py"), str(ckpt)],
                       env=fake_devices_env(), cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count("max_rel_err=") == 2
    print(r.stdout)


def test_scaling_factor_is_applied_once_each_way(pair):
    ref, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae")
    sf = ref.config.scaling_factor  # the pipelines: latents = mode * sf; pixels = decode(latents / sf)
    x = _cl(_video(1, 16, 16))
    z = np.random.default_rng(0).standard_normal((1, 1, 2, 2, 4)).astype(np.float32)
    enc = jax.jit(lambda v: (vae_lib.encode_video(ours, v), ours.encode(v).mean))
    dec = jax.jit(lambda v: (vae_lib.decode_latents(ours, v), ours.decode(v / sf)))
    np.testing.assert_allclose(*(lambda a, b: (a, b * sf))(*enc(x)), rtol=1e-6)
    np.testing.assert_allclose(*dec(z), rtol=1e-6)


def test_bad_frame_count_and_size_are_explained(pair):
    _, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae")
    with pytest.raises(ValueError, match="4k\\+1 frames"):
        ours.encode(np.zeros((1, 6, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 8"):
        ours.encode(np.zeros((1, 5, 20, 16, 3), np.float32))


def test_manifest_of_the_real_vae_maps_exactly(manifests_dir):
    assert check_manifest(manifests_dir / "cogvideox_vae.json") == 215_583_907


def test_converter_round_trip_keeps_every_parameter(pair):
    ref, ckpt, _ = pair
    ours = checkpoint.load_component(ckpt, "vae")
    sd = ref.state_dict()
    mine = {".".join(map(str, k)): np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(ours, nnx.Param))}
    assert len(mine) == len(sd)
    w = sd["decoder.up_blocks.1.resnets.0.conv1.conv.weight"].numpy()  # (out, in, kt, kh, kw)
    np.testing.assert_array_equal(mine["decoder.up_blocks.1.resnets.0.conv1.conv.kernel"], w.transpose(2, 3, 4, 1, 0))


def _bad_copy(src, dst, edit):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(next(src.glob("*.safetensors")))
    edit(sd)
    save_file(sd, dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_converter_rejects_a_vae_with_a_wrong_shape(pair, tmp_path):
    _, _, src = pair
    key = "encoder.conv_in.conv.bias"
    bad = _bad_copy(src, tmp_path / "bad", lambda sd: sd.__setitem__(key, sd[key][:-1].clone()))
    with pytest.raises(CheckpointError, match=r"shape mismatch for encoder\.conv_in\.conv\.bias: expected \[8\], found \[7\]"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converter_rejects_a_vae_missing_a_key(pair, tmp_path):
    _, _, src = pair
    bad = _bad_copy(src, tmp_path / "bad", lambda sd: sd.pop("decoder.up_blocks.3.resnets.0.conv_shortcut.weight"))
    with pytest.raises(CheckpointError, match=r"missing key decoder\.up_blocks\.3\.resnets\.0\.conv_shortcut\.weight"):
        convert(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_causal_conv_is_one_3d_conv_when_compiling_for_tpu_and_taps_on_cpu():
    # the planner compiles a TPU program from this CPU host: it must hold what a TPU runs
    import jax.numpy as jnp

    from mm_jax import parallel
    from mm_jax.models.vae_layers import CausalConv3d
    from mm_jax.plan import TARGETS, targets

    conv = CausalConv3d(4, 8, 3, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((1, 3, 8, 8, 4), jnp.float32)

    def convs():
        jaxpr = jax.make_jaxpr(lambda x: conv(x)[0])(x)
        return [len(e.params["window_strides"]) for e in jaxpr.eqns if e.primitive.name == "conv_general_dilated"]

    assert convs() == [2, 2, 2]  # CPU: one 2D conv per temporal tap
    with jax.set_mesh(parallel.make_mesh({"data": 1}, devices=targets.devices(TARGETS["v5e-1"]))):
        assert convs() == [3]


def _conv_windows(jaxpr) -> list[tuple]:
    """The kernel window of every convolution in ``jaxpr`` and the jaxprs nested in it (scan bodies)."""
    out = []
    for e in jaxpr.eqns:
        if e.primitive.name == "conv_general_dilated":
            rank = len(e.params["window_strides"])
            out.append(tuple(e.invars[1].aval.shape[:rank]))
        for p in e.params.values():
            for sub in p if isinstance(p, (tuple, list)) else (p,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    out += _conv_windows(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    out += _conv_windows(sub)
    return out


def test_the_decoder_lowers_each_resnet_body_once_under_a_scan():
    """Consecutive resnets of one body (the mid block's with the first up block's, and within each
    up block) run under one lax.scan, so a TPU compile lowers their 3x3x3 convolutions once: the
    tiny decoder compiled for v5e-1 holds 12 3D convolutions, not the 22 of one per resnet."""
    import jax.numpy as jnp

    from mm_jax import parallel
    from mm_jax.plan import TARGETS, targets

    dec = vae_lib.Decoder3D(vae_lib.VAEConfig(**TINY), rngs=nnx.Rngs(0))
    z = jax.ShapeDtypeStruct((1, 2, 8, 8, 4), jnp.float32)
    with jax.set_mesh(parallel.make_mesh({"data": 1}, devices=targets.devices(TARGETS["v5e-1"]))):
        windows = _conv_windows(jax.make_jaxpr(lambda z: dec(z)[0])(z).jaxpr)
    assert windows.count((3, 3, 3)) == 12
