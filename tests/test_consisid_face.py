"""ConsisID face preprocessing pieces that need no torch: the numpy NMS keeps what torchvision's
kernel keeps, the priors are facexlib's layout, and the facexlib converter is strict."""
import functools

import numpy as np
import pytest

from mm_jax import consisid_face as cf
from mm_jax.models import retinaface as rf
from tests.torch_refs.facexlib_nets import torchvision_nms
from tools.convert_weights import facexlib as fx
from tools.convert_weights.safetensors_io import CheckpointError


def test_nms_keeps_what_torchvisions_kernel_keeps():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2)).astype(np.float32)
    wh = rng.uniform(5, 40, (300, 2)).astype(np.float32)
    dets = np.concatenate([xy, xy + wh, rng.uniform(0, 1, (300, 1)).astype(np.float32)], 1)
    for thresh in (0.2, 0.4, 0.7):
        keep = cf.nms(dets, thresh)
        assert keep.tolist() == torchvision_nms(dets, thresh)
        assert 10 < len(keep) < 300


def test_priors_follow_facexlibs_level_row_column_size_order():
    p = rf.priors(112, 160)  # levels 14x20, 7x10, 4x5; 2 sizes each
    assert p.shape == ((14 * 20 + 7 * 10 + 4 * 5) * 2, 4) and p.dtype == np.float32
    np.testing.assert_allclose(p[:4], [[4 / 160, 4 / 112, 16 / 160, 16 / 112], [4 / 160, 4 / 112, 32 / 160, 32 / 112],
                                       [12 / 160, 4 / 112, 16 / 160, 16 / 112], [12 / 160, 4 / 112, 32 / 160, 32 / 112]])
    np.testing.assert_allclose(p[-1], [144 / 160, 112 / 112, 512 / 160, 512 / 112])


@functools.lru_cache(maxsize=None)
def _facexlib_state_dict(name):
    """Our module's tensors under facexlib's keys and layouts (what the converter must accept)."""
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(fx.build(name), (nnx.Param, nnx.BatchStat)))
    return {fx.torch_key(name, p): (np.asarray(v.get_value()).transpose(3, 2, 0, 1) if p[-1] == "kernel"
                                    else np.asarray(v.get_value())) for p, v in flat}


def test_bisenet_converter_names_every_missing_unexpected_and_misshapen_key():
    sd = dict(_facexlib_state_dict("bisenet"))
    assert "cp.resnet.layer2.0.downsample.1.running_var" in sd and "ffm.convblk.conv.weight" in sd
    full = dict(sd, **{"cp.resnet.bn1.num_batches_tracked": np.array(3)})
    assert fx.load_state_dict(fx.build("bisenet", seed=1), "bisenet", full) == len(sd)
    bad = dict(sd)
    del bad["cp.arm16.bn_atten.running_mean"]
    bad["cp.extra.weight"] = np.zeros(3, np.float32)
    bad["conv_out.conv_out.weight"] = np.zeros((18, 256, 1, 1), np.float32)
    with pytest.raises(CheckpointError) as e:
        fx.load_state_dict(fx.build("bisenet"), "bisenet", bad, source="parsing_bisenet.pth")
    msg = str(e.value)
    assert "3 problem(s)" in msg and "missing key cp.arm16.bn_atten.running_mean (expected shape [128])" in msg
    assert "unexpected key cp.extra.weight" in msg
    assert "shape mismatch for conv_out.conv_out.weight: expected [19, 256, 1, 1], found [18, 256, 1, 1]" in msg


def test_retinaface_converter_strips_dataparallel_prefix():
    sd = dict(_facexlib_state_dict("retinaface"))
    assert {"body.layer1.0.downsample.0.weight", "fpn.output1.0.weight", "ssh3.conv7x7_3.1.running_mean",
            "LandmarkHead.2.conv1x1.bias"} <= sd.keys()
    ours = fx.build("retinaface", seed=1)
    assert fx.load_state_dict(ours, "retinaface", {"module." + k: v for k, v in sd.items()}) == len(sd)
    np.testing.assert_array_equal(np.asarray(ours.fpn.output1.conv.kernel.get_value()),
                                  sd["fpn.output1.0.weight"].transpose(2, 3, 1, 0))


def test_converter_cli_reads_pth_files_and_refuses_unknown_names(tmp_path, capsys):
    import torch

    path = tmp_path / "parsing_bisenet.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in _facexlib_state_dict("bisenet").items()}, path)
    assert fx.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "OK:" in out and "-> bisenet (13,300,416 params)" in out
    other = tmp_path / "other.pth"
    other.write_bytes(path.read_bytes())
    assert fx.main([str(other)]) == 2
    assert "expected files named detection_Resnet50_Final.pth or parsing_bisenet.pth" in capsys.readouterr().err
