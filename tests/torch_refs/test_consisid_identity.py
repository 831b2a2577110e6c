"""The whole ConsisID identity of a photo, ``mm_jax.consisid_faces.FaceEncoder`` vs diffusers'
``consisid_utils.process_face_embeddings_infer``, from one face folder written with ``torch.save``:
facexlib's RetinaFace-R50 and BiSeNet (random weights calibrated on the photo, as in
test_consisid_face.py), a tiny ``consisid_eva_clip`` tower (21 layers, width 32, 42 px) under
``visual.``, and the stand-in antelopev2 pack, which the reference runs through insightface's own
``FaceAnalysis`` and ``model_zoo``. Our side reads the folder as published, without torch."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import max_rel_err
from tests.torch_refs import facexlib_nets as nets

pytestmark = pytest.mark.slow  # ~1 min of CPU: full-size ResNet-50 and BiSeNet in torch and in JAX

EVA_TINY = dict(image_size=42, layers=21, width=32, head_width=16, mlp_ratio=2.6667, patch_size=14,
                eva_model_name="eva-clip-l-14-336", drop_path_rate=0, xattn=True, fusedLN=True, rope=True,
                pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True)
EVA_EMBED = 24


def _eva_tower(seed: int = 0):
    import torch
    from consisid_eva_clip.model import _build_vision_tower

    torch.manual_seed(seed)
    tower = _build_vision_tower(EVA_EMBED, EVA_TINY).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random
        for name, p in tower.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if name.endswith(("norm1.weight", "norm2.weight", "ln.weight", "norm.weight"))
                    else noise)
    return tower


def _photo(antelope_finds: bool) -> np.ndarray:
    """RGB uint8: insightface's Tom Hanks photo (112 px) on a 160x200 grey canvas. The stand-in
    SCRFD fires where the image is bright: with a white square added it finds ~45 faces, two of
    them of equal largest area (the reference keeps the last); with the photo dimmed to 60 %, none."""
    face = nets.photo("Tom_Hanks_54745.png")[..., ::-1]
    canvas = np.full((160, 200, 3), 60, np.uint8)
    canvas[24:136, 44:156] = face
    if not antelope_finds:
        return (canvas * 0.6).astype(np.uint8)
    canvas[8:16, 8:16] = 255
    return canvas


def _write_folder(folder, rgb):
    import cv2
    import torch

    from mm_jax.consisid_faces import ANTELOPE, FILES
    from tests.tiny_consisid_faces import make_antelope

    bgr = np.ascontiguousarray(rgb[..., ::-1])
    det = nets.retinaface_ref(bgr)
    big = cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_CUBIC) / 255.0
    x = torch.from_numpy(((big - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32).transpose(2, 0, 1))
    parse = nets.bisenet_ref(x[None])
    eva = _eva_tower()
    folder.mkdir(parents=True)
    torch.save(det.state_dict(), folder / FILES["retinaface"])
    torch.save(parse.state_dict(), folder / FILES["bisenet"])
    whole = {f"visual.{k}": v for k, v in eva.state_dict().items()}
    whole.update({"text.token_embedding.weight": torch.zeros(4, 8), "logit_scale": torch.tensor(4.6)})
    torch.save(whole, folder / FILES["eva_clip"])
    make_antelope(folder / ANTELOPE)
    return det, parse, eva


def _reference(folder, det, parse, eva, rgb, landmarks=None):
    """diffusers' process_face_embeddings_infer with the folder's models (facexlib's helper built
    offline); with ``landmarks``, facexlib's detection step returns those instead of its own."""
    import facexlib.detection.retinaface as fx_rf
    import facexlib.utils.face_restoration_helper as frh
    import insightface
    import torch
    from consisid_eva_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from diffusers.pipelines.consisid import consisid_utils as cu
    from insightface.app import FaceAnalysis

    cpu = ["CPUExecutionProvider"]
    app = FaceAnalysis(name="antelopev2", root=str(folder), providers=cpu)
    app.prepare(ctx_id=-1, det_size=(640, 640))
    rec = insightface.model_zoo.get_model(str(folder / "models/antelopev2/glintr100.onnx"), providers=cpu)
    rec.prepare(ctx_id=-1)
    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(frh, "init_detection_model", lambda *a, **k: det)
        mp.setattr(frh, "init_parsing_model", lambda *a, **k: None)
        mp.setattr(fx_rf, "py_cpu_nms", nets.torchvision_nms)  # torchvision.ops.nms cannot load here
        helper = frh.FaceRestoreHelper(upscale_factor=1, face_size=512, crop_ratio=(1, 1),
                                       det_model="retinaface_resnet50", save_ext="png", device="cpu")
        helper.face_parse = parse
        if landmarks is not None:
            def given(*a, **k):
                helper.all_landmarks_5 = [np.asarray(landmarks)]
                return 1

            helper.get_face_landmarks_5 = given
        with torch.no_grad():
            id_cond, hidden, image, _ = cu.process_face_embeddings_infer(
                helper, eva, rec, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, app, "cpu", torch.float32, rgb, True)
    finally:
        mp.undo()
    return dict(id_cond=id_cond.numpy(), id_vit_hidden=torch.stack(hidden).numpy(), image=np.asarray(image),
                landmarks=helper.all_landmarks_5[0], crop=helper.cropped_faces[0])


@pytest.fixture(scope="module", params=[True, False], ids=["antelope_face", "antelope_none"])
def runs(request, tmp_path_factory):
    import warnings

    from mm_jax.consisid_faces import FaceEncoder

    rgb = _photo(request.param)
    folder = tmp_path_factory.mktemp("consisid") / "face_encoder"
    nets_ = _write_folder(folder, rgb)
    want = _reference(folder, *nets_, rgb)
    enc = FaceEncoder(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = enc.analyze(rgb)
    ours = enc.embed(prepared)
    # the reference once more, its detector's landmarks replaced by ours (~1e-5 px away, see below)
    want_given_ours = _reference(folder, *nets_, rgb, landmarks=prepared.face.landmarks)
    return request.param, want, want_given_ours, prepared, ours, [str(w.message) for w in caught]


def test_antelope_path_is_the_one_the_reference_takes(runs):
    found, want, _, prepared, ours, messages = runs
    assert prepared.antelope_found == found
    assert any("antelopev2 found no face" in m for m in messages) != found
    if found:  # the largest face (ties to the last) owes nothing to RetinaFace: exact end to end
        assert max_rel_err(ours.id_cond[:, :512], want["id_cond"][:, :512]) == 0
    # otherwise glintr100 embeds the aligned crop: compared on the same crop below


def test_landmarks_and_crop_match_facexlib_within_warp_rounding(runs):
    # our RetinaFace heads differ from facexlib's by ~1e-6 relative, which moves the landmarks by ~1e-5 px;
    # cv2's fixed-point bilinear warp (1/32 px grid, 10-bit weights) then rounds a few crop pixels the
    # other way by one grey level, and BiSeNet's argmax flips a few labels next to them
    _, want, _, prepared, ours, _ = runs
    lm_err = np.abs(prepared.face.landmarks - want["landmarks"]).max()
    crop_diff = np.abs(prepared.face.crop_bgr.astype(int) - want["crop"]).max(-1)
    image_off = int((ours.image != want["image"]).any(-1).sum())
    print(f"landmarks max abs err {lm_err:.2e} px; crop pixels off {int((crop_diff > 0).sum())}; image pixels off "
          f"{image_off} of {crop_diff.size}")
    assert lm_err <= 1e-3
    assert crop_diff.max() <= 1 and (crop_diff > 0).mean() <= 0.005
    assert image_off / crop_diff.size <= 0.01


def test_whole_identity_equals_consisid_utils_given_the_same_landmarks(runs):
    _, _, want, prepared, ours, _ = runs
    np.testing.assert_array_equal(prepared.face.crop_bgr, want["crop"])
    np.testing.assert_array_equal(ours.image, want["image"])
    assert ours.id_cond.shape == want["id_cond"].shape == (1, 512 + EVA_EMBED)
    assert ours.id_vit_hidden.shape == want["id_vit_hidden"].shape == (5, 1, 10, 32)
    errs = {k: max_rel_err(getattr(ours, k), want[k]) for k in ("id_cond", "id_vit_hidden")}
    errs["eva"] = max_rel_err(ours.id_cond[:, 512:], want["id_cond"][:, 512:])
    print("whole identity max rel err", errs)
    assert max(errs.values()) <= 1e-5, errs
