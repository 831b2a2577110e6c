"""Our RetinaFace-R50 equals facexlib's ``RetinaFace('resnet50')``: the raw heads on a real photo
(1e-5) and the decoded, thresholded, NMS-ed detections of ``detect_faces``."""
import numpy as np
import pytest

from tests.conftest import max_rel_err
from tests.torch_refs import facexlib_nets as nets

pytestmark = pytest.mark.slow  # ~40 s of CPU: a full-size ResNet-50 in torch and in JAX

SIZE = (160, 112)  # (W, H) of the downscaled t1.jpg: small enough for CPU CI, six real faces
THRESHOLD = 0.9


@pytest.fixture(scope="module")
def detector_run(monkeypatch_module):
    import cv2
    import torch
    import facexlib.detection.retinaface as fx_rf

    from mm_jax import consisid_face as cf

    img = cv2.resize(nets.photo("t1.jpg"), SIZE, interpolation=cv2.INTER_AREA)
    ref = nets.retinaface_ref(img)
    ours = nets.converted("retinaface", ref, prefix="module.")  # the published file's DataParallel keys
    monkeypatch_module.setattr(fx_rf, "py_cpu_nms", nets.torchvision_nms)  # torchvision.ops.nms cannot load here
    with torch.no_grad():
        want_heads = [t[0].numpy() for t in ref(nets.bgr_input(img))]
        want_dets = ref.detect_faces(img, THRESHOLD)
    x = img.astype(np.float32) - np.array([104.0, 117.0, 123.0], np.float32)
    got_heads = [np.asarray(t[0]) for t in ours(x[None])]
    return dict(img=img, want_heads=want_heads, want_dets=want_dets, got_heads=got_heads,
                got_dets=cf.detect_faces(ours, img, THRESHOLD),
                decoded_from_ref=cf.decode_detections(*want_heads, *img.shape[:2], THRESHOLD))


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_retinaface_heads_match_facexlib(detector_run):
    errs = [max_rel_err(g, w) for g, w in zip(detector_run["got_heads"], detector_run["want_heads"])]
    print("loc/conf/landmarks max rel err", errs)
    assert [g.shape for g in detector_run["got_heads"]] == [(740, 4), (740, 2), (740, 10)]
    assert max(errs) <= 1e-5
    scores = detector_run["want_heads"][1][:, 1]
    assert 0.05 < scores.mean() < 0.95 and (scores > 0.97).sum() >= 10  # not saturated, some pass ConsisID's cut


def test_decoding_the_reference_heads_gives_detect_faces_rows(detector_run):
    want, got = detector_run["want_dets"], detector_run["decoded_from_ref"]
    print("detections", want.shape, "decode from ref heads max abs err", np.abs(got - want).max())
    assert want.shape[0] >= 5 and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-4)


def test_detect_faces_matches_facexlib_on_a_photo(detector_run):
    want, got = detector_run["want_dets"], detector_run["got_dets"]
    print("detections", want.shape, "max abs err (pixels, scores)", np.abs(got - want).max())
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, 4], want[:, 4], atol=1e-5)      # scores
    np.testing.assert_allclose(got[:, :4], want[:, :4], atol=1e-3)    # box corners, pixels (4.6e-4 measured)
    np.testing.assert_allclose(got[:, 5:], want[:, 5:], atol=1e-3)    # landmarks, pixels
