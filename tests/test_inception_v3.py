"""Inception v3 port without torchvision (its equality with torchvision is tests/torch_refs/test_inception_v3.py):
the converter's key set equals the published file's (torchvision's names, AuxLogits/fc dropped), its strictness
(missing, unexpected, misshapen keys named), the loaded values land transposed where they belong, and the face
FID is the squared L2 distance of features, averaged over frames (0.0 without frames)."""
import numpy as np
import pytest
from flax import nnx

from mm_jax.metrics import face_fid as ff
from mm_jax.models.inception_v3 import InceptionV3Config, InceptionV3Features
from tools.convert_weights import inception_v3 as conv
from tools.convert_weights.safetensors_io import CheckpointError

# tensors of inception_v3_google-0cc3c7bd.pth without AuxLogits/fc/num_batches_tracked: 94 BasicConv2d x
# (conv weight + BN weight, bias, running_mean, running_var)
N_TENSORS = 94 * 5


@pytest.fixture(scope="module")
def abstract():
    return nnx.eval_shape(lambda: InceptionV3Features(rngs=nnx.Rngs(0)))


def _state_dict(model, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in conv.expected_keys(model).items()}
    sd["fc.weight"], sd["fc.bias"] = np.zeros((1000, 2048), np.float32), np.zeros((1000,), np.float32)
    sd["AuxLogits.conv0.conv.weight"] = np.zeros((128, 768, 1, 1), np.float32)
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.zeros((), np.int64)
    return sd


def test_expected_keys_are_torchvisions_names_and_shapes(abstract):
    keys = conv.expected_keys(abstract)
    assert len(keys) == N_TENSORS
    assert keys["Conv2d_1a_3x3.conv.weight"] == [32, 3, 3, 3]
    assert keys["Mixed_6b.branch7x7_2.conv.weight"] == [128, 128, 1, 7]
    assert keys["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == [384]
    assert keys["Mixed_7c.branch_pool.conv.weight"] == [192, 2048, 1, 1]
    # torchvision's 27,161,264 parameters minus fc (2,049,000) and AuxLogits (3,326,696 incl. its fc)
    n_params = sum(int(np.prod(s)) for k, s in keys.items() if not k.endswith(("running_mean", "running_var")))
    assert n_params == 27_161_264 - 2_049_000 - 3_326_696


def test_converter_drops_aux_fc_and_loads_transposed():
    model = nnx.eval_shape(lambda: InceptionV3Features(rngs=nnx.Rngs(0)))  # every tensor filled by the load
    sd = _state_dict(model)
    assert conv.load_state_dict(model, sd) == N_TENSORS
    kernel = np.asarray(model.Mixed_6b.branch7x7_2.conv.kernel.get_value())
    np.testing.assert_array_equal(kernel, sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(np.asarray(model.Mixed_5b.branch_pool.bn.mean.get_value()),
                                  sd["Mixed_5b.branch_pool.bn.running_mean"])


def test_converter_names_every_missing_unexpected_and_misshapen_key(abstract):
    sd = _state_dict(abstract)
    del sd["Mixed_5c.branch5x5_2.bn.running_var"]
    sd["Mixed_6a.branch3x3.conv.weight"] = np.zeros((384, 288, 1, 1), np.float32)
    sd["Mixed_8a.conv.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(CheckpointError) as e:
        conv.load_state_dict(abstract, sd)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing key Mixed_5c.branch5x5_2.bn.running_var" in msg
    assert "shape mismatch for Mixed_6a.branch3x3.conv.weight: expected [384, 288, 3, 3]" in msg
    assert "unexpected key Mixed_8a.conv.weight" in msg


def test_safetensors_copy_loads_without_torch(abstract, tmp_path):
    sd = _state_dict(abstract, seed=1)
    out = tmp_path / "inception_v3.safetensors"
    assert conv.save_kept(sd, out) == N_TENSORS  # AuxLogits, fc and the BN counter left out
    model = conv.load(out)
    np.testing.assert_array_equal(np.asarray(model.Conv2d_1a_3x3.conv.kernel.get_value()),
                                  sd["Conv2d_1a_3x3.conv.weight"].transpose(2, 3, 1, 0))


def test_converter_cli_refuses_absent_file(tmp_path, capsys):
    assert conv.main([str(tmp_path / conv.FILE_NAME)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_config_and_input_checks(abstract):
    with pytest.raises(ValueError, match="channels_7x7"):
        InceptionV3Config(channels_7x7=(128, 160))
    with pytest.raises(ValueError, match="at least 75x75"):
        abstract(np.zeros((1, 74, 80, 3), np.float32))


class _MeanColour:
    """A stand-in feature extractor: the per-channel mean of its (B, 299, 299, 3) input."""

    def __call__(self, x):
        assert x.shape[1:] == (299, 299, 3) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
        return x.astype(np.float64).mean(axis=(1, 2))


def test_face_fid_is_mean_squared_l2_of_features_over_frames():
    flat = [np.full((224, 224, 3), v, np.uint8) for v in ((0, 0, 0), (255, 0, 0), (0, 51, 102))]
    fids = ff.frame_fids(_MeanColour(), flat[0], flat[1:])
    np.testing.assert_allclose(fids, [1.0, 0.2 ** 2 + 0.4 ** 2], rtol=1e-6)
    assert ff.face_fid(_MeanColour(), flat[0], flat[1:]) == pytest.approx((1.0 + 0.2) / 2, rel=1e-6)
    assert ff.face_fid(_MeanColour(), flat[0], []) == 0.0
    with pytest.raises(ValueError, match="uint8 RGB"):
        ff.load_image(np.zeros((224, 224), np.uint8))
