"""Face front end on stand-in ONNX models: decoding and NMS (vs insightface), alignment, embeddings, errors."""
import numpy as np
import pytest

from mm_jax.face import ARCFACE_TEMPLATE, FaceAnalyzer, NoFaceError, nms, similarity_transform
from tests.face_models import KPS_OFFSETS, face_image, make_pack


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp("pack") / "buffalo_stub")


def test_detection_decodes_one_face_where_insightface_does(pack):
    from insightface.model_zoo.scrfd import SCRFD

    img = face_image(at=(96, 160))  # 240x320 -> 640x480 canvas, scale 2: anchor (320, 192) at stride 8
    fa = FaceAnalyzer(pack)
    boxes, kps = fa.detect(img[..., ::-1].copy())
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0, :4], [160 - 8, 96 - 8, 160 + 8, 96 + 8], atol=1e-4)  # 2 strides / scale 2
    np.testing.assert_allclose(kps[0], np.array([160, 96]) + KPS_OFFSETS * 4, atol=1e-4)
    ref = SCRFD(str(pack / "det_10g.onnx"))
    ref.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    rb, rk = ref.detect(img[..., ::-1].copy(), input_size=(640, 640))
    np.testing.assert_allclose(boxes, rb, atol=1e-4)
    np.testing.assert_allclose(kps, rk, atol=1e-4)


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [20, 20, 30, 30, 0.7], [0, 0, 10, 10, 0.95]], np.float32)
    assert nms(dets, 0.4) == [3, 2]


def test_similarity_transform_recovers_a_known_rotation_scale_shift():
    theta, s, t = np.pi / 2, 2.0, np.array([5.0, -3.0])
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    src = ARCFACE_TEMPLATE
    dst = (s * rot @ src.T).T + t
    m = similarity_transform(src, dst)
    np.testing.assert_allclose(m, np.hstack([s * rot, t[:, None]]), atol=1e-4)


def test_analyze_gives_a_unit_embedding_and_a_clip_crop(pack):
    res = FaceAnalyzer(pack).analyze(face_image())
    assert res.embedding.shape == (512,) and abs(np.linalg.norm(res.embedding) - 1) < 1e-5
    assert res.clip_crop.shape == (224, 224, 3) and res.clip_crop.dtype == np.float32
    assert res.num_faces == 1


def test_largest_of_several_faces_wins_with_a_warning(pack):
    img = face_image(at=(96, 160))
    img[38:43, 38:43] = 255  # a second bright square centred on (40, 40)
    with pytest.warns(UserWarning, match="2 faces found"):
        res = FaceAnalyzer(pack).analyze(img)
    assert res.num_faces == 2


def test_no_face_names_the_image(pack, tmp_path):
    import imageio.v3 as iio

    p = tmp_path / "empty.png"
    iio.imwrite(p, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(NoFaceError, match="no face found in .*empty.png"):
        FaceAnalyzer(pack).analyze(p)


def test_unreadable_image_and_bad_model_folder_are_explained(pack, tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*x.jpg"):
        FaceAnalyzer(pack).analyze(tmp_path / "x.jpg")
    with pytest.raises(FileNotFoundError, match="found no an SCRFD detector.*buffalo_l"):
        (tmp_path / "only_rec").mkdir()
        (tmp_path / "only_rec" / "w600k_r50.onnx").write_bytes((pack / "w600k_r50.onnx").read_bytes())
        FaceAnalyzer(tmp_path / "only_rec")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        FaceAnalyzer(tmp_path / "nope")
