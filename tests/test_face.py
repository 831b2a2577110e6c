"""Face front end on stand-in ONNX models: decoding and NMS (vs insightface), alignment (vs a known
transform and insightface's norm_crop), embeddings (vs insightface's ArcFaceONNX), model-pack errors."""
import shutil

import numpy as np
import pytest

from mm_jax.demo.standin_faces import (KPS_OFFSETS, face_image, make_detector, make_landmark, make_pack,
                                       make_random_detector, make_recognizer)
from mm_jax.face import (ARCFACE_TEMPLATE, CLIP_MEAN, CLIP_STD, FaceAnalyzer, FaceModels, ImageSizeError, NoFaceError,
                         nms, similarity_transform)


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp("pack") / "buffalo_stub")


@pytest.fixture(scope="module")
def analyzer(pack):
    return FaceAnalyzer(pack)


def _insightface_scrfd(path, thresh):
    from insightface.model_zoo.scrfd import SCRFD

    ref = SCRFD(str(path))
    ref.prepare(-1, input_size=(640, 640), det_thresh=thresh)
    return ref


def test_detection_decodes_one_face_where_insightface_does(pack, analyzer):
    img = face_image(at=(96, 160))  # 240x320 -> 640x480 canvas, scale 2: anchor (320, 192) at stride 8
    boxes, kps = analyzer.detect(img[..., ::-1].copy())
    assert len(boxes) == 1
    np.testing.assert_allclose(boxes[0, :4], [160 - 8, 96 - 8, 160 + 8, 96 + 8], atol=1e-4)  # 2 strides / scale 2
    np.testing.assert_allclose(kps[0], np.array([160, 96]) + KPS_OFFSETS * 4, atol=1e-4)
    rb, rk = _insightface_scrfd(pack / "det_10g.onnx", 0.5).detect(img[..., ::-1].copy(), input_size=(640, 640))
    np.testing.assert_allclose(boxes, rb, atol=1e-4)
    np.testing.assert_allclose(kps, rk, atol=1e-4)


def test_detection_and_nms_match_insightface_on_a_random_detector(tmp_path):
    make_random_detector(tmp_path / "det.onnx")  # boxes 4 strides wide: neighbours overlap, NMS has work
    make_recognizer(tmp_path / "rec.onnx")
    img = np.random.default_rng(0).integers(0, 256, (200, 300, 3)).astype(np.uint8)  # wide: letterboxed
    boxes, kps = FaceAnalyzer(tmp_path, det_thresh=0.8).detect(img)
    unsuppressed, _ = FaceAnalyzer(tmp_path, det_thresh=0.8, nms_thresh=0.999).detect(img)
    assert len(boxes) < len(unsuppressed) / 2
    widths = boxes[:, 2] - boxes[:, 0]  # 4 strides / scale 640/300: ~15, ~30, ~60 for strides 8, 16, 32
    assert all(np.any(np.abs(widths / (4 * s * 300 / 640) - 1) < 0.15) for s in (8, 16, 32))
    rb, rk = _insightface_scrfd(tmp_path / "det.onnx", 0.8).detect(img, input_size=(640, 640))
    np.testing.assert_allclose(boxes, rb, atol=1e-3)
    np.testing.assert_allclose(kps, rk, atol=1e-3)


def test_nms_keeps_the_best_of_overlapping_boxes():
    dets = np.array([[0, 0, 10, 10, 0.9], [1, 1, 11, 11, 0.8], [20, 20, 30, 30, 0.7], [0, 0, 10, 10, 0.95]], np.float32)
    assert nms(dets, 0.4) == [3, 2]  # boxes 0 and 1 overlap box 3 (IoU 1 and 0.70 with +1 areas)
    assert nms(dets[[0, 1]], 0.75) == [0, 1]  # IoU 0.70 <= 0.75 keeps both


def test_similarity_transform_maps_landmarks_back_onto_the_template():
    # landmarks = template scaled by 2, rotated by 90 degrees, shifted by t; aligning must undo it:
    # M = [R(-90)/2 | -R(-90) t / 2]
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])
    t = np.array([300.0, -40.0])
    kps = 2.0 * ARCFACE_TEMPLATE @ rot.T + t
    m = similarity_transform(kps, ARCFACE_TEMPLATE)
    inv = rot.T / 2.0
    np.testing.assert_allclose(m, np.hstack([inv, (-inv @ t)[:, None]]), atol=1e-4)


def test_alignment_equals_insightface_norm_crop_at_112_and_224():
    from insightface.utils import face_align

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (300, 400, 3)).astype(np.uint8)
    kps = (ARCFACE_TEMPLATE * 1.7 + [120.0, 60.0] + rng.normal(0, 2.0, (5, 2))).astype(np.float32)
    for size in (112, 224):
        with pytest.warns(FutureWarning):  # skimage 0.26 deprecates SimilarityTransform.estimate
            ref_m = face_align.estimate_norm(kps, size)
        np.testing.assert_allclose(similarity_transform(kps, ARCFACE_TEMPLATE * size / 112), ref_m, atol=1e-4)
        ours = FaceAnalyzer.align(img, kps, size).astype(int)
        with pytest.warns(FutureWarning):
            ref = face_align.norm_crop(img, kps, size).astype(int)
        assert np.abs(ours - ref).max() <= 1  # float32 vs float64 matrix: at most one grey level


@pytest.mark.parametrize("mxnet", [False, True], ids=["onnx_export", "mxnet_export"])
def test_embeddings_equal_insightface_arcface_and_are_unit_norm(tmp_path, mxnet):
    import onnxruntime as ort
    from insightface.model_zoo.arcface_onnx import ArcFaceONNX

    make_detector(tmp_path / "det.onnx")
    make_recognizer(tmp_path / "rec.onnx", mxnet=mxnet)
    fa = FaceAnalyzer(tmp_path)
    assert (fa.models.rec_mean, fa.models.rec_std) == ((0.0, 1.0) if mxnet else (127.5, 127.5))
    crops = list(np.random.default_rng(2).integers(0, 256, (3, 112, 112, 3)).astype(np.uint8))
    ours = fa.embed_crops(crops, batch_size=2)
    ref = ArcFaceONNX(str(tmp_path / "rec.onnx"), ort.InferenceSession(str(tmp_path / "rec.onnx"),
                                                                      providers=["CPUExecutionProvider"]))
    want = ref.get_feat(crops)
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    assert ours.shape == (3, 512)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(ours, want, atol=1e-5)


def test_analyze_gives_unit_e_id_and_the_clip_normalized_224_crop(analyzer):
    img = face_image()
    res = analyzer.analyze(img)
    assert res.num_faces == 1 and res.score > 0.5
    assert res.embedding.shape == (512,) and abs(np.linalg.norm(res.embedding) - 1) < 1e-5
    assert res.clip_crop.shape == (224, 224, 3) and res.clip_crop.dtype == np.float32
    crop_rgb = FaceAnalyzer.align(img[..., ::-1].copy(), res.kps, 224)[..., ::-1]
    np.testing.assert_allclose(res.clip_crop, (crop_rgb / 255.0 - CLIP_MEAN) / CLIP_STD, atol=1e-5)
    np.testing.assert_allclose(res.embedding, analyzer.embed_crops([FaceAnalyzer.align(img[..., ::-1].copy(), res.kps, 112)])[0], atol=1e-6)


def test_analyze_crops_the_reference_at_the_image_encoders_size(pack):
    img = face_image()
    res = FaceAnalyzer(pack, clip_size=336).analyze(img)
    assert res.clip_crop.shape == (336, 336, 3)
    crop_rgb = FaceAnalyzer.align(img[..., ::-1].copy(), res.kps, 336)[..., ::-1]
    np.testing.assert_allclose(res.clip_crop, (crop_rgb / 255.0 - CLIP_MEAN) / CLIP_STD, atol=1e-5)
    with pytest.raises(ValueError, match="clip_size=0"):
        FaceAnalyzer(pack, clip_size=0)


def test_largest_face_wins_over_the_highest_score_with_a_warning(tmp_path):
    make_detector(tmp_path / "det.onnx", box=6.0, box_gain=-4.0)  # dimmer blob -> lower score, larger box
    make_recognizer(tmp_path / "rec.onnx")
    img = face_image(at=(96, 160))
    img[38:43, 38:43] = 200  # a dimmer square centred on (40, 40)
    with pytest.warns(UserWarning, match="2 faces found"):
        res = FaceAnalyzer(tmp_path).analyze(img)
    assert res.num_faces == 2
    np.testing.assert_allclose((res.bbox[:2] + res.bbox[2:]) / 2, [40, 40], atol=1e-3)


def test_embed_frames_marks_frames_without_a_face(analyzer):
    frames = [face_image(seed=0), np.zeros((64, 64, 3), np.uint8), face_image(at=(60, 200), seed=1)]
    emb, found = analyzer.embed_frames(frames)
    assert emb.shape == (3, 512) and found.tolist() == [True, False, True]
    assert np.all(emb[1] == 0)
    np.testing.assert_allclose(emb[2], analyzer.analyze(frames[2]).embedding, atol=1e-6)


def test_embeddings_take_the_recognizers_width_even_when_no_frame_has_a_face(tmp_path):
    """A 256-wide recognizer: a batch of faceless frames gives (N, 256) zeros, so batches with and
    without faces concatenate, and the video metrics run."""
    from mm_jax.metrics.video_eval import evaluate_video

    make_detector(tmp_path / "det_10g.onnx")
    make_recognizer(tmp_path / "w256.onnx", width=256)
    fa = FaceAnalyzer(tmp_path)
    assert fa.models.embedding_dim == 256
    dark = np.zeros((64, 64, 3), np.uint8)
    faces = fa.analyze_frames([dark, dark])
    assert faces.embedding.shape == (2, 256) and not faces.found.any()
    assert fa.embed_crops([]).shape == (0, 256)
    ref = fa.analyze(face_image(h=64, w=64, at=(32, 32)))
    assert ref.embedding.shape == (256,)
    face = face_image(h=64, w=64, at=(32, 32))
    video = np.stack([dark, dark, face, face])  # batch 1 without faces, batch 2 with
    m = evaluate_video(video, ref, fa, batch_size=2)
    assert m["per_frame"]["found"] == [False, False, True, True]
    np.testing.assert_allclose(m["per_frame"]["id_sim"], [0.0, 0.0, 1.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 5000, 3), (5000, 4, 3), (0, 10, 3)])
def test_an_image_too_thin_for_the_detector_is_a_named_error(analyzer, shape):
    img = np.full(shape, 255, np.uint8)
    size = f"{shape[0]}x{shape[1]} pixels"
    with pytest.raises(ImageSizeError, match=size):
        analyzer.detect(img[..., ::-1].copy())
    with pytest.raises(ImageSizeError, match=f"thin.png: image of {size}"):
        analyzer.analyze(img, name="thin.png")
    assert issubclass(ImageSizeError, ValueError)  # the CLIs report it with exit code 2


def test_a_long_but_detectable_image_still_works(analyzer):
    img = face_image(h=40, w=4000, at=(20, 100))  # 100:1 fits a 640 input as 6x640
    boxes, _ = analyzer.detect(img[..., ::-1].copy())
    assert boxes.shape[1] == 5


def test_no_face_names_the_image(analyzer, tmp_path):
    import imageio.v3 as iio

    p = tmp_path / "empty.png"
    iio.imwrite(p, np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(NoFaceError, match="no face found in .*empty.png"):
        analyzer.analyze(p)
    assert issubclass(NoFaceError, ValueError)


def test_unreadable_or_missing_image_is_named(analyzer, tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*x.jpg: not a decodable image"):
        analyzer.analyze(tmp_path / "x.jpg")
    with pytest.raises(ValueError, match="cannot read image .*gone.jpg: no such file"):
        analyzer.analyze(tmp_path / "gone.jpg")


def test_pack_is_found_by_signature_under_models_name_and_skips_landmark_models(pack, tmp_path):
    root = tmp_path / "root"
    d = root / "models" / "antelope_stub"
    d.mkdir(parents=True)
    shutil.copy(pack / "det_10g.onnx", d / "scrfd_10g_bnkps.onnx")
    shutil.copy(pack / "w600k_r50.onnx", d / "glintr100.onnx")
    make_landmark(d / "1k3d68.onnx")  # first by name, 192x192 single output: must not become the recognizer
    models = FaceModels.load(root)
    assert models.recognizer.get_inputs()[0].shape[2:] == [112, 112]
    assert len(models.detector.get_outputs()) == 9


def test_bad_model_folders_are_explained(pack, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope: no such folder; expected .*buffalo_l"):
        FaceModels.load(tmp_path / "nope")
    (tmp_path / "only_rec").mkdir()
    shutil.copy(pack / "w600k_r50.onnx", tmp_path / "only_rec")
    with pytest.raises(ValueError, match="only_rec: no SCRFD detector among .*w600k_r50.onnx.*antelopev2"):
        FaceModels.load(tmp_path / "only_rec")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "det_10g.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="det_10g.onnx cannot be loaded by onnxruntime"):
        FaceModels.load(tmp_path / "broken")
    for name in ("a", "b"):
        shutil.copytree(pack, tmp_path / "two" / "models" / name)
    with pytest.raises(ValueError, match=r"several model packs \['models/a', 'models/b'\]"):
        FaceModels.load(tmp_path / "two")
    with pytest.raises(ValueError, match="det_thresh=1.5"):
        FaceAnalyzer(pack, det_thresh=1.5)


# -- a real detector on real photos ------------------------------------------------------------------
# The scrfd==0.3.0 source distribution on PyPI ships a real SCRFD-2.5G (insightface's bnkps export,
# fixed 640x640 input) and real photos; scikit-image ships a real portrait (data.astronaut()).
SCRFD_SDIST = "scrfd==0.3.0"


@pytest.fixture(scope="session")
def real_scrfd(tmp_path_factory):
    """(pack folder with the real detector + a stand-in recognizer, folder of the sdist's photos),
    fetched with pip's own client from the package index (the same source as the install)."""
    import subprocess
    import sys
    import tarfile

    root = tmp_path_factory.mktemp("scrfd")
    run = subprocess.run([sys.executable, "-m", "pip", "download", SCRFD_SDIST, "--no-deps", "--no-binary", ":all:",
                          "-d", str(root), "-q"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"pip download {SCRFD_SDIST} failed:\n{run.stderr[-2000:]}"
    with tarfile.open(next(root.glob("scrfd-*.tar.gz"))) as tar:
        members = [m for m in tar.getmembers() if "/models/" in m.name or "/images/" in m.name]
        tar.extractall(root, members=members, filter="data")
    src = next(root.glob("scrfd-*/"))
    pack = root / "pack"
    pack.mkdir()
    shutil.copy(src / "models" / "scrfd.onnx", pack / "scrfd.onnx")
    make_recognizer(pack / "w600k_r50.onnx")
    return pack, src / "images"


def test_real_scrfd_finds_exactly_the_faces_insightface_finds_on_real_photos(real_scrfd):
    import skimage.data
    from insightface.model_zoo.scrfd import SCRFD

    from mm_jax.face import read_image

    pack, images = real_scrfd
    ours = FaceAnalyzer(pack)
    ref = SCRFD(str(pack / "scrfd.onnx"))
    ref.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    photos = {p.name: read_image(p) for p in sorted(images.glob("*")) if p.suffix in (".png", ".jpg")}
    photos["astronaut"] = read_image(skimage.data.astronaut())
    found = {}
    for name, img in photos.items():
        boxes, kps = ours.detect(img)
        rb, rk = ref.detect(img, input_size=(640, 640))
        assert boxes.shape == rb.shape and kps.shape == rk.shape, name
        np.testing.assert_allclose(boxes, rb, atol=1e-3, err_msg=name)
        np.testing.assert_allclose(kps, rk, atol=1e-3, err_msg=name)
        found[name] = boxes
    assert len(found["solvay_conference_1927.jpg"]) == 29  # the 29 attendees of the 1927 Solvay conference
    assert len(found["astronaut"]) == 1 and len(found["newton.png"]) == 1 and len(found["gauss.png"]) == 1
    # the scrfd package's own test truths (tests/truth_faces.py, integer pixels)
    np.testing.assert_allclose(found["newton.png"][0, :4], [334, 89, 438, 232], atol=1.5)
    np.testing.assert_allclose(found["gauss.png"][0, :4], [376, 203, 654, 568], atol=1.5)


def test_real_scrfd_reference_photo_gives_one_aligned_identity(real_scrfd):
    import skimage.data

    pack, _ = real_scrfd
    res = FaceAnalyzer(pack).analyze(skimage.data.astronaut(), name="astronaut")
    assert res.num_faces == 1 and res.score > 0.5
    assert abs(np.linalg.norm(res.embedding) - 1) < 1e-5 and res.clip_crop.shape == (224, 224, 3)
    left_eye, right_eye = res.kps[0], res.kps[1]
    assert left_eye[0] < right_eye[0] and abs(left_eye[1] - right_eye[1]) < 15  # an upright face
