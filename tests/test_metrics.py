"""Face metrics as pure functions, against values computed by hand from the definitions in
mm_jax/metrics/face_metrics.py."""
import numpy as np
import pytest

from mm_jax.metrics.face_metrics import (face_shape, fm_inter_per_pair, fm_ref_per_frame, iod, mean_over_videos,
                                         video_face_metrics)

# eyes 2 apart: iod 2; landmark mean (0, 0.4)
FACE = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 2.0], [1.0, -1.0]])


def test_face_shape_is_centred_and_in_units_of_the_inter_ocular_distance():
    assert iod(FACE) == pytest.approx(2.0)
    np.testing.assert_allclose(face_shape(FACE), (FACE - [0.0, 0.4]) / 2.0)


def test_fm_ref_ignores_translation_and_scale():
    moved = 3.5 * FACE + [100.0, -20.0]
    np.testing.assert_allclose(fm_ref_per_frame(moved[None], FACE), [0.0], atol=1e-12)


def test_fm_ref_of_a_moved_nose_by_hand():
    frame = FACE.copy()
    frame[2, 0] += 1.0  # nose 1 px right: the mean moves (0.2, 0), so shape points move by
    # (1 - 0.2)/2 = 0.4 (nose) and 0.2/2 = 0.1 (the other four), each along x
    expected = (0.4 + 4 * 0.1) / 5
    np.testing.assert_allclose(fm_ref_per_frame(frame[None], FACE), [expected], atol=1e-12)


def test_fm_ref_counts_a_head_roll():
    rot = np.array([[0.0, -1.0], [1.0, 0.0]])  # 90 degrees
    frame = FACE @ rot.T
    s = face_shape(FACE)
    expected = np.linalg.norm(s @ rot.T - s, axis=1).mean()  # = sqrt(2) * mean |s_k|
    np.testing.assert_allclose(fm_ref_per_frame(frame[None], FACE), [expected], atol=1e-12)
    assert expected == pytest.approx(np.sqrt(2) * np.linalg.norm(s, axis=1).mean())


def test_fm_inter_is_displacement_over_mean_inter_ocular_distance():
    kps = np.stack([FACE, FACE + [3.0, 4.0], 2.0 * (FACE + [3.0, 4.0])])
    # pair 1: every point moves 5, iod 2 -> 2.5; pair 2: point p moves |p + (3, 4)|, iods 2 and 4 -> mean 3
    second = np.linalg.norm(FACE + [3.0, 4.0], axis=1).mean() / 3.0
    np.testing.assert_allclose(fm_inter_per_pair(kps), [2.5, second], atol=1e-12)


def test_video_metrics_count_faceless_frames_as_zero_and_skip_them_in_fm():
    ref_emb = np.array([1.0, 0.0])
    emb = np.array([[1.0, 0.0], [0.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    found = np.array([True, False, True, True])
    kps = np.stack([FACE, FACE * 0, FACE + [1.0, 0.0], FACE + [1.0, 2.0]])
    m = video_face_metrics(emb, found, kps, ref_emb, FACE)
    assert m["id_sim"] == pytest.approx((1.0 + 0 + 0.6 + 0.0) / 4)
    assert m["id_sim_detected"] == pytest.approx((1.0 + 0.6 + 0.0) / 3)
    assert m["frames_without_face"] == [1] and m["face_fraction"] == 0.75
    assert m["fm_ref"] == pytest.approx(0.0) and m["fm_ref_frames"] == 3
    assert m["fm_inter_pairs"] == 1 and m["fm_inter"] == pytest.approx(2.0 / 2.0)  # only frames 2 -> 3
    assert m["per_frame"]["fm_ref"][1] is None


def test_a_video_without_faces_has_zero_id_similarity_and_no_fm():
    m = video_face_metrics(np.zeros((3, 4)), np.zeros(3, bool), np.zeros((3, 5, 2)), np.ones(4), FACE)
    assert m["id_sim"] == 0.0 and m["face_fraction"] == 0.0
    assert m["id_sim_detected"] is None and m["fm_ref"] is None and m["fm_inter"] is None


def test_mean_over_videos_skips_undefined_values_and_counts():
    mean = mean_over_videos([{"face_fraction": 1.0, "id_sim": 0.8, "id_sim_detected": 0.8, "fm_ref": 0.2, "fm_inter": None},
                             {"face_fraction": 0.0, "id_sim": 0.0, "id_sim_detected": None, "fm_ref": None, "fm_inter": None}])
    assert mean["id_sim"] == pytest.approx(0.4) and mean["fm_ref"] == pytest.approx(0.2) and mean["fm_inter"] is None
    assert mean["videos_counted"] == {"face_fraction": 2, "id_sim": 2, "id_sim_detected": 1, "fm_ref": 1, "fm_inter": 0}
