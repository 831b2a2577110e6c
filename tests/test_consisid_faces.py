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


# -- the face encoder on the tiny folder --------------------------------------------------------------

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tests.tiny_consisid_faces import make_face_folder

    return make_face_folder(tmp_path_factory.mktemp("face_encoder"))


@pytest.fixture(scope="module")
def encoder(folder):
    from mm_jax.consisid_faces import FaceEncoder

    return FaceEncoder(folder)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 240x320 PNG: dark texture with one bright square (the stand-in SCRFD's face)."""
    from PIL import Image

    from mm_jax.demo.standin_faces import face_image

    path = tmp_path_factory.mktemp("photos") / "face.png"
    Image.fromarray(face_image(at=(96, 160), size=6)).save(path)
    return path


@pytest.fixture(scope="module")
def result(encoder, photo):
    prepared = encoder.analyze(photo)
    return prepared, encoder.embed(prepared)


def test_a_folder_missing_files_names_each_and_the_layout(tmp_path):
    from mm_jax.consisid_faces import FaceEncoder

    (tmp_path / "parsing_bisenet.pth").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        FaceEncoder(tmp_path)
    msg = str(e.value)
    for name in ("detection_Resnet50_Final.pth", "EVA02_CLIP_L_336_psz14_s6B.pt",
                 "models/antelopev2/scrfd_10g_bnkps.onnx", "models/antelopev2/glintr100.onnx"):
        assert name in msg.split("expected")[0]
    assert "parsing_bisenet.pth" not in msg.split("expected")[0] and "face_encoder/" in msg
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FaceEncoder(tmp_path / "absent")


@pytest.mark.slow  # shares one ~30 s CPU setup: RetinaFace-R50 and BiSeNet compiled at their real size
def test_identity_is_raw_antelope_and_unit_eva_vector_with_five_hidden_states(folder, result):
    import torch

    from mm_jax.consisid_face import FACE_SIZE
    from mm_jax.face import FaceAnalyzer
    from mm_jax.models import eva_clip, retinaface as rf
    from tests.tiny_consisid_faces import EVA_TINY, LANDMARKS_PX
    from tools.convert_weights import eva_clip as ec

    prepared, ident = result
    assert prepared.antelope_found and prepared.source.endswith("face.png")
    assert ident.image.shape == (FACE_SIZE, FACE_SIZE, 3) and ident.image.dtype == np.uint8
    assert ident.id_cond.shape == (1, 512 + EVA_TINY["embed_dim"]) and ident.id_vit_hidden.shape == (5, 1, 10, 32)
    # RetinaFace: the firing stride-32 anchor nearest the centre of the 320x240 photo, landmarks around it
    anchor = (np.array(prepared.face.box[:2]) + np.array(prepared.face.box[2:4])) / 2
    assert prepared.face.box[2] - prepared.face.box[0] == pytest.approx(rf.MIN_SIZES[2][0], abs=1e-3)
    assert np.all((anchor - 16) % 32 == 0) and np.abs(anchor - [160, 120]).max() <= 16
    np.testing.assert_allclose(prepared.face.landmarks, anchor + LANDMARKS_PX, atol=1e-3)
    # the raw (not unit) glintr100 embedding of the largest antelopev2 face
    from PIL import Image

    raw = FaceAnalyzer(folder / "models/antelopev2", normalize=False).analyze(np.asarray(Image.open(prepared.source)))
    np.testing.assert_array_equal(ident.id_cond[0, :512], raw.embedding)
    assert abs(np.linalg.norm(raw.embedding) - 1) > 0.1
    # the EVA vector, unit length, and the hidden states: the tower read by torch.load and the converter
    sd = {k: v.numpy() for k, v in torch.load(folder / "EVA02_CLIP_L_336_psz14_s6B.pt", weights_only=True).items()}
    tower = ec.to_module(*ec.convert_state_dict(sd))
    feats, hidden = tower(eva_clip.preprocess(prepared.face.grey[None], EVA_TINY["image_size"]))
    feats = np.asarray(feats) / np.linalg.norm(np.asarray(feats))
    np.testing.assert_allclose(ident.id_cond[0, 512:], feats[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ident.id_vit_hidden, np.asarray(hidden), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(ident.id_cond[0, 512:]) == pytest.approx(1, abs=1e-6)
    # the pipeline image: the colour crop, white where parsing says background
    white = (prepared.face.grey == 1).all(-1)
    assert 0 < white.mean() < 1
    assert (ident.image[white] == 255).all()
    np.testing.assert_array_equal(ident.image[~white], prepared.face.crop_bgr[..., ::-1][~white])


@pytest.mark.slow  # shares one ~30 s CPU setup: RetinaFace-R50 and BiSeNet compiled at their real size
def test_without_an_antelope_face_glintr100_embeds_the_aligned_crop(encoder):
    import cv2

    from mm_jax.demo.standin_faces import face_image

    dark = face_image(size=0) // 2  # no bright square: the stand-in SCRFD finds nothing
    with pytest.warns(UserWarning, match="antelopev2 found no face"):
        prepared = encoder.analyze(dark)
    assert not prepared.antelope_found
    small = cv2.resize(prepared.face.crop_bgr, (112, 112), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(prepared.antelope, encoder.faces.embed_crops([small])[0])


@pytest.mark.slow  # shares one ~30 s CPU setup: RetinaFace-R50 and BiSeNet compiled at their real size
def test_no_retinaface_face_is_a_no_face_error_naming_the_photo(folder, photo, tmp_path):
    import shutil

    import torch

    from mm_jax.consisid_faces import FaceEncoder
    from mm_jax.face import NoFaceError
    from tests.tiny_consisid_faces import retinaface_state_dict

    blind = shutil.copytree(folder, tmp_path / "blind")
    torch.save(retinaface_state_dict(detects=False), blind / "detection_Resnet50_Final.pth")
    with pytest.raises(NoFaceError, match=r"face\.png: RetinaFace found no face with score > 0\.97"):
        FaceEncoder(blind).analyze(photo)


def test_converter_refuses_a_consisid_folder_whose_face_encoder_lacks_files(tmp_path, capsys):
    import json

    from mm_jax.consisid_faces import FILES
    from tools.convert_weights import from_torch

    src = tmp_path / "ConsisID-preview"
    src.mkdir()
    (src / "model_index.json").write_text(json.dumps({"_class_name": "ConsisIDPipeline"}))
    assert from_torch.main(["--src", str(src), "--dst", str(tmp_path / "no_faces")]) == 0  # face files elsewhere
    (src / "face_encoder").mkdir()
    (src / "face_encoder" / FILES["eva_clip"]).write_bytes(b"")
    assert from_torch.main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "ConsisIDPipeline" in err and "face_encoder" in err
    named = err.split("expected")[0]
    assert all(f in named for k, f in FILES.items() if k != "eva_clip") and FILES["eva_clip"] not in named
    assert not (tmp_path / "out").exists()
    for rel in FILES.values():  # complete: the check passes (the face files are read as published, not converted)
        (src / "face_encoder" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "face_encoder" / rel).write_bytes(b"")
    assert from_torch.main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 0


@pytest.mark.slow  # shares the tiny folder of the encoder tests
def test_a_photo_too_thin_for_antelopev2_is_named(encoder):
    from mm_jax.face import ImageSizeError

    with pytest.raises(ImageSizeError, match=r"<array>: image of 1x2000 pixels .* would be 0x1024"):
        encoder.analyze(np.zeros((1, 2000, 3), np.uint8))  # the long side shrinks to 1024 first
    with pytest.raises(ImageSizeError, match=r"<array>: image of 1x900 pixels .* too thin for the detector"):
        encoder.analyze(np.zeros((1, 900, 3), np.uint8))
