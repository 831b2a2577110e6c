"""ConsisID's face encoder on a tiny face folder laid out as published (tests/tiny_consisid_faces.py):
the torch-free reader equals ``torch.load``, the folder check names what is missing, ``analyze`` /
``embed`` give the three ``ConsisIDPipeline`` arrays from the raw antelopev2 embedding and the EVA
tower, the no-face paths. Parity with diffusers' ``consisid_utils``: tests/torch_refs/test_consisid_identity.py."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from mm_jax import torch_pickle


def _tensors():
    import torch

    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    return collections.OrderedDict(
        fp32=base, transposed=base.t(), offset_view=base[1:4, 2:6], fp16=base.half(), bf16=base.bfloat16(),
        bf16_strided=base.bfloat16()[:, 1::2], int64=torch.arange(5), scalar=torch.tensor(3.0),
        empty=torch.zeros(0, 3), bool=base > 0)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_pickle_reads_what_torch_load_reads(tmp_path, zip_format):
    import torch

    sd = _tensors()
    path = tmp_path / "w.pth"
    torch.save({"state_dict": sd, "epoch": 3, "meta": ["a", (1, 2.5)]}, path, _use_new_zipfile_serialization=zip_format)
    want = torch.load(path, weights_only=True)
    got = torch_pickle.load(path)
    assert got["epoch"] == 3 and got["meta"] == ["a", (1, 2.5)]
    assert isinstance(got["state_dict"], collections.OrderedDict) and list(got["state_dict"]) == list(sd)
    for k, v in want["state_dict"].items():
        ours = got["state_dict"][k]
        assert ours.shape == tuple(v.shape), k
        assert str(ours.dtype) == str(v.dtype).removeprefix("torch."), k
        np.testing.assert_array_equal(ours.astype(np.float32), v.float().numpy(), err_msg=k)
    assert torch_pickle.state_dict(path).keys() == sd.keys()  # unwrapped from 'state_dict'


def test_torch_pickle_refuses_anything_but_tensors(tmp_path):
    import torch

    path = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "f": collections.Counter("ab")}, path)
    with pytest.raises(torch_pickle.TorchPickleError, match="refusing to unpickle collections.Counter"):
        torch_pickle.load(path)
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(torch_pickle.TorchPickleError, match="neither a zip nor a legacy"):
        torch_pickle.load(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="no such file"):
        torch_pickle.load(tmp_path / "absent.pth")
