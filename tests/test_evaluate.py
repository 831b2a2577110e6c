"""``python -m mm_jax.evaluate`` end to end on the stand-in face models (a bright square is a face;
its 5 landmarks sit at fixed offsets from the square, so moving the square moves them by as much).
On a 240x320 frame the detector runs at scale 2: landmarks = (col, row) + 4 * KPS_OFFSETS, so the
inter-ocular distance is 4 px and a square moved by d px gives FM_inter = d / 4."""
import csv
import json

import imageio.v3 as iio
import numpy as np
import pytest

from mm_jax import evaluate
from mm_jax.face import FaceAnalyzer
from mm_jax.metrics.video_eval import ABSENT
from mm_jax.demo.standin_faces import KPS_OFFSETS, face_image, make_pack

AT = (96, 160)  # multiples of 4: the square covers a stride-8 sample point of the 2x canvas


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    return make_pack(tmp_path_factory.mktemp("pack") / "buffalo_stub")


def _dark(seed=0):
    return (np.random.default_rng(seed).random((240, 320, 3)) * 40).astype(np.uint8)


def _case(root, name, frames, ref=None):
    """videos/<name>.npy (floats in [0, 1], as mm_jax.sample writes them) and refs/<name>.png."""
    (root / "videos").mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    np.save(root / "videos" / f"{name}.npy", np.stack(frames).astype(np.float32) / 255.0)
    iio.imwrite(root / "refs" / f"{name}.png", face_image(at=AT) if ref is None else ref)


def _run(root, pack, *extra, capsys=None):
    rc = evaluate.main(["--videos", str(root / "videos"), "--refs", str(root / "refs"), "--face-models", str(pack),
                        "--out", str(root / "report.json"), "--quiet", *extra])
    rep = json.loads((root / "report.json").read_text()) if rc == 0 else None
    return rc, rep


def test_identical_frames_give_id_similarity_one_and_no_motion(tmp_path, pack):
    _case(tmp_path, "same", [face_image(at=AT)] * 4)
    rc, rep = _run(tmp_path, pack)
    v = rep["videos"][0]
    assert rc == 0 and v["frames"] == 4 and v["face_fraction"] == 1.0
    assert v["id_sim"] == pytest.approx(1.0, abs=1e-6)
    assert v["fm_inter"] == pytest.approx(0.0, abs=1e-9) and v["fm_inter_pairs"] == 3
    assert v["fm_ref"] == pytest.approx(0.0, abs=1e-6)


def test_known_landmark_shift_gives_fm_inter_by_hand(tmp_path, pack):
    path = [AT, (96, 164), (96, 172), (100, 176)]  # moves of 4 px, 8 px, (4, 4) px
    _case(tmp_path, "moving", [face_image(at=a) for a in path])
    rc, rep = _run(tmp_path, pack)
    v = rep["videos"][0]
    iod = 4.0  # (0.5 - -0.5) strides of 8 canvas px, at scale 2
    assert iod == pytest.approx(np.linalg.norm(KPS_OFFSETS[1] - KPS_OFFSETS[0]) * 8 / 2)
    assert v["fm_inter"] == pytest.approx(np.mean([4 / iod, 8 / iod, np.sqrt(32) / iod]), abs=1e-5)
    # the stand-in's landmark layout never changes shape, so by definition FM_ref is 0
    assert v["fm_ref"] == pytest.approx(0.0, abs=1e-6)


def test_fm_ref_ignores_the_reference_photos_size_and_position(tmp_path, pack):
    big_ref = face_image(h=480, w=640, at=(200, 400), seed=3)  # scale 1: iod 8 px, elsewhere in the frame
    _case(tmp_path, "ref_elsewhere", [face_image(at=AT)] * 2, ref=big_ref)
    rc, rep = _run(tmp_path, pack)
    assert rc == 0 and rep["videos"][0]["fm_ref"] == pytest.approx(0.0, abs=1e-6)


def test_frames_without_a_face_count_zero_and_are_reported(tmp_path, pack):
    frames = [face_image(at=AT), _dark(1), face_image(at=AT), face_image(at=(96, 164))]
    _case(tmp_path, "gap", frames)
    rc, rep = _run(tmp_path, pack)
    v = rep["videos"][0]
    sims = v["per_frame"]["id_sim"]
    assert v["frames_without_face"] == [1] and v["face_fraction"] == 0.75 and sims[1] == 0.0
    assert v["id_sim"] == pytest.approx(sum(sims) / 4) and v["id_sim_detected"] == pytest.approx(sum(sims) / 3)
    assert v["fm_inter_pairs"] == 1 and v["fm_inter"] == pytest.approx(4 / 4.0, abs=1e-5)  # only frames 2 -> 3
    assert v["fm_ref_frames"] == 3


def test_a_video_with_no_face_is_reported_not_crashed_on(tmp_path, pack, capsys):
    _case(tmp_path, "empty", [_dark(i) for i in range(3)])
    _case(tmp_path, "face", [face_image(at=AT)] * 2)
    rc, rep = _run(tmp_path, pack)
    empty = next(v for v in rep["videos"] if v["name"] == "empty")
    assert rc == 0 and empty["id_sim"] == 0.0 and empty["face_fraction"] == 0.0
    assert empty["fm_ref"] is None and empty["fm_inter"] is None and empty["frames_without_face"] == [0, 1, 2]
    assert rep["mean"]["id_sim"] == pytest.approx(0.5, abs=1e-6)  # (0 + 1) / 2
    assert rep["mean"]["videos_counted"]["fm_ref"] == 1
    assert "empty: no face in 3 of 3 frames" in capsys.readouterr().err


def test_unpaired_names_are_an_error_naming_the_files(tmp_path, pack, capsys):
    _case(tmp_path, "alice", [face_image(at=AT)])
    np.save(tmp_path / "videos" / "bob.npy", np.zeros((1, 8, 8, 3), np.float32))
    iio.imwrite(tmp_path / "refs" / "carol.jpg", face_image(at=AT))
    rc, rep = _run(tmp_path, pack)
    err = capsys.readouterr().err
    assert rc == 2 and "bob.npy" in err and "carol.jpg" in err and "alice" not in err
    assert not (tmp_path / "report.json").exists()


def test_a_reference_without_a_face_is_an_error_naming_it(tmp_path, pack, capsys):
    _case(tmp_path, "noref", [face_image(at=AT)], ref=_dark(5))
    rc, _ = _run(tmp_path, pack)
    err = capsys.readouterr().err
    assert rc == 2 and "noref.png" in err and "no face" in err


def test_manifest_pairs_files_and_carries_prompts(tmp_path, pack):
    _case(tmp_path, "clip1", [face_image(at=AT)] * 2)
    iio.imwrite(tmp_path / "refs" / "person_a.png", face_image(at=AT))
    lines = [{"video": "videos/clip1.npy", "ref": "refs/person_a.png", "prompt": "a man waves"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rc = evaluate.main(["--manifest", str(tmp_path / "m.jsonl"), "--face-models", str(pack),
                        "--out", str(tmp_path / "r.json"), "--quiet"])
    v = json.loads((tmp_path / "r.json").read_text())["videos"][0]
    assert rc == 0 and v["name"] == "clip1" and v["ref"].endswith("person_a.png") and v["prompt"] == "a man waves"


def test_a_manifest_entry_with_a_missing_file_is_named(tmp_path, pack, capsys):
    (tmp_path / "m.jsonl").write_text(json.dumps({"video": "nope.mp4", "ref": "r.png"}) + "\n")
    rc = evaluate.main(["--manifest", str(tmp_path / "m.jsonl"), "--face-models", str(pack),
                        "--out", str(tmp_path / "r.json"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "entry 1" in err and "nope.mp4" in err


def test_json_csv_and_plots_exist_and_agree(tmp_path, pack):
    _case(tmp_path, "a", [face_image(at=AT), face_image(at=(96, 164))])
    _case(tmp_path, "b", [face_image(at=AT), _dark()])
    rc, rep = _run(tmp_path, pack, "--csv", str(tmp_path / "r.csv"), "--plots", str(tmp_path / "plots"))
    with open(tmp_path / "r.csv") as f:
        rows = list(csv.DictReader(f))
    assert rc == 0 and [r["name"] for r in rows] == ["a", "b", "mean"]
    for row, v in zip(rows, rep["videos"] + [rep["mean"]]):
        for k in ("face_fraction", "id_sim", "id_sim_detected", "fm_ref", "fm_inter"):
            assert (row[k] == "") == (v[k] is None)
            if v[k] is not None:
                assert float(row[k]) == pytest.approx(v[k], rel=1e-12)
    assert rows[1]["frames_without_face"] == "1"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["a.png", "b.png"]
    a, b = (iio.imread(tmp_path / "plots" / f"{n}.png") for n in "ab")
    assert a.shape == b.shape == (320, 640, 3)
    red = lambda img: np.sum((img[..., 0] > 180) & (img[..., 1] < 80) & (img[..., 2] < 80))
    assert red(a) == 0 and red(b) > 10  # b's frame 1 has no face: drawn as a red cross


def test_optional_metrics_are_null_with_the_reason(tmp_path, pack):
    _case(tmp_path, "a", [face_image(at=AT)])
    _, rep = _run(tmp_path, pack)
    assert set(rep["absent"]) == {"clip_text_alignment", "dynamic_degree"} == set(ABSENT)
    assert all(rep["videos"][0][k] is None for k in ABSENT) and all(rep["absent"].values())


def test_batch_size_and_video_format_do_not_change_the_numbers(tmp_path, pack):
    frames = [face_image(at=(96, 160 + 4 * i)) for i in range(5)] + [_dark()]
    _case(tmp_path, "v", frames)
    _, rep1 = _run(tmp_path, pack, "--batch-size", "2")
    (tmp_path / "videos" / "v.npy").unlink()
    (tmp_path / "videos" / "v").mkdir()  # the same frames as a folder of PNGs
    for i, f in enumerate(frames):
        iio.imwrite(tmp_path / "videos" / "v" / f"frame_{i:04d}.png", f)
    _, rep2 = _run(tmp_path, pack, "--batch-size", "32")
    for k in ("id_sim", "fm_ref", "fm_inter", "face_fraction"):
        assert rep1["videos"][0][k] == pytest.approx(rep2["videos"][0][k], abs=1e-6)


def test_analyze_frames_gives_each_frames_largest_face_and_landmarks(pack):
    an = FaceAnalyzer(pack)
    frames = [face_image(at=AT), _dark(), face_image(at=(120, 200))]
    faces = an.analyze_frames(frames)
    assert faces.found.tolist() == [True, False, True]
    np.testing.assert_allclose(faces.kps[2], np.array([200, 120]) + 4 * KPS_OFFSETS, atol=1e-4)
    _, kps = an.detect(frames[0][..., ::-1].copy())
    np.testing.assert_allclose(faces.kps[0], kps[0], atol=1e-6)
    emb, found = an.embed_frames(frames)
    np.testing.assert_array_equal(emb, faces.embedding)
    assert np.all(faces.kps[1] == 0) and np.all(emb[1] == 0)


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--help"])
    assert e.value.code == 0
