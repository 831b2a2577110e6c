"""Every source layout (mm_jax.data.layouts) read from a tiny fixture written here: LAION-Face
parquet and tars, SFHQ, OpenVid / Panda CSVs, ConsisID's three forms, OpenS2V, the progress
bar's item counts, and broken listing entries kept as counted skips."""
import csv
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from mm_jax.data.example import ExampleMaker, ExampleOptions
from mm_jax.data.layouts import LAYOUTS
from mm_jax.data.records import decode_record
from mm_jax.demo.assets import standin_faces
from mm_jax.demo.synthetic import make_demo_source


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(root, face pack): a synthetic source at root/src (clips and images) and stand-in face models."""
    root = tmp_path_factory.mktemp("layouts")
    make_demo_source(root / "src", num_clips=4, num_images=2, frames=9, height=64, width=64, seed=3)
    return root, standin_faces(root)


def _items(name: str, src, **options) -> list[dict]:
    layout = LAYOUTS[name](**options)
    return [it for u in layout.units(src) for it in layout.media_items(u)]


def _png(rgb: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", rgb, extension=".png")


def test_laion_face_parquet_and_webdataset_shards_are_read(source, tmp_path):
    import imageio.v3 as iio
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = source[0] / "src"
    img = [iio.imread(src / f"image_000{i}.png") for i in (4, 5)]
    (tmp_path / "laion").mkdir()
    pq.write_table(pa.table({"key": ["000", "001"], "caption": ["a man smiles", "a woman waves"],
                             "jpg": [_png(img[0]), _png(img[1])]}), tmp_path / "laion" / "00000.parquet")
    with tarfile.open(tmp_path / "laion" / "00001.tar", "w") as tar:
        for key, data in (("002.png", _png(img[1])), ("002.txt", b"a girl reads"), ("003.png", _png(img[0])),
                          ("003.json", json.dumps({"caption": "a boy sings"}).encode())):
            info = tarfile.TarInfo(key)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    items = _items("laion_face", tmp_path / "laion")
    assert [(it["member"], it["caption"]) for it in items] == [("000.jpg", "a man smiles"), ("001.jpg", "a woman waves"),
                                                             ("002.png", "a girl reads"), ("003.png", "a boy sings")]
    maker = ExampleMaker(ExampleOptions(face_models=str(source[1])))
    decoded = [decode_record(maker(it).record) for it in items]
    assert [d["kind"] for d in decoded] == ["image"] * 4 and decoded[2]["source"].endswith("00001.tar#002.png")
    assert all(d["face_found"].all() for d in decoded)
    # the progress bar's total: parquet row groups say their rows, a tar does not until it is read
    layout = LAYOUTS["laion_face"]()
    assert layout.count(layout.units(tmp_path / "laion" / "00000.parquet")) == 2
    assert layout.count(layout.units(tmp_path / "laion")) is None


def test_a_listed_source_gives_the_progress_bar_its_item_count(source):
    layout = LAYOUTS["manifest"]()
    units = layout.units(source[0] / "src")
    assert layout.count(units) == len(list(_items("manifest", source[0] / "src"))) > 0


def test_sfhq_folder_with_a_captions_file_is_read(tmp_path):
    (tmp_path / "images" / "part1").mkdir(parents=True)
    for n in ("SFHQ_pt1_00000001.jpg", "SFHQ_pt1_00000002.jpg"):
        (tmp_path / "images" / "part1" / n).write_bytes(b"x")
    with open(tmp_path / "caps.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image_name", "text"], ["SFHQ_pt1_00000001.jpg", "a woman with red hair"]])
    items = _items("sfhq", tmp_path / "images", captions=str(tmp_path / "caps.csv"))
    assert [(Path(it["path"]).name, it["caption"]) for it in items] == [("SFHQ_pt1_00000001.jpg", "a woman with red hair"),
                                                                       ("SFHQ_pt1_00000002.jpg", "")]


def test_openvid_and_panda_csv_rows_become_clips_with_their_spans(source, tmp_path):
    from mm_jax.video_io import read_video

    src = source[0] / "src"
    with open(tmp_path / "OpenVid-1M.csv", "w", newline="") as f:
        csv.writer(f).writerows([["video", "caption", "aesthetic score", "frame", "fps", "seconds"],
                                 ["clip_0000.mp4", "a man walks", "5.1", "9", "8", "1.1"]])
    items = _items("clips_csv", tmp_path / "OpenVid-1M.csv", video_root=str(src))
    assert items == [{"path": str(src / "clip_0000.mp4"), "caption": "a man walks", "ref": None}]
    with open(tmp_path / "panda.csv", "w", newline="") as f:
        csv.writer(f).writerows([["videoID", "url", "timestamp", "caption", "matching_score"],
                                 ["clip_0001", "https://example.invalid/x",
                                  "[['0:00:00.000', '0:00:00.375'], ['0:00:00.500', '0:00:01.125']]",
                                  "['a woman sits.', 'a woman stands.']", "[0.5, 0.4]"]])
    items = _items("clips_csv", tmp_path / "panda.csv", video_root=str(src))
    assert [(it["caption"], it["span"]) for it in items] == [("a woman sits.", [0.0, 0.375]),
                                                             ("a woman stands.", [0.5, 1.125])]
    maker = ExampleMaker(ExampleOptions(face_models=str(source[1])))
    whole = read_video(src / "clip_0001.mp4")  # 9 frames at 8 fps: t = 0, 0.125, ..., 1.0
    for it, frames in zip(items, (whole[0:3], whole[4:9])):
        r = decode_record(maker(it).record)
        assert len(r["frames"]) == len(frames) and r["source"].endswith(".mp4@{:.3f}-{:.3f}s".format(*it["span"]))


def test_consisid_layout_is_read_and_cut_to_its_annotated_face_frames(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "dataname_1.json").write_text(json.dumps(
        [{"path": "/authors/disk/videos/v1.mp4", "cap": "a man talks", "fps": 25, "duration": 4.0},
         {"path": "videos/v2.mp4", "cap": "a woman laughs", "fps": 25, "duration": 3.0}]))
    (tmp_path / "dataname_1" / "refine_bbox_jsons").mkdir(parents=True)
    box = {"box": {"x1": 1, "y1": 2, "x2": 30, "y2": 40}, "confidence": 0.9, "new_track_id": 1}
    (tmp_path / "dataname_1" / "refine_bbox_jsons" / "v1.json").write_text(json.dumps(
        {"3": {"face": [box], "head": [box]}, "4": {"head": [box]}, "17": {"face": [box]}}))
    items = _items("consisid", tmp_path)
    root = tmp_path / "dataname_1" / "videos"
    assert items == [{"path": str(root / "v1.mp4"), "caption": "a man talks", "ref": None, "frames": [3, 18]},
                     {"path": str(root / "v2.mp4"), "caption": "a woman laughs", "ref": None}]


def test_consisid_total_train_data_listing_with_the_authors_paths_is_found_under_the_source(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "set_a.json").write_text(json.dumps([{"path": "/x/set_a/videos/v1.mp4", "cap": "a man"}]))
    (tmp_path / "captions" / "set_b.json").write_text("[{\"path\": ")  # corrupt: counted, set_a still read
    (tmp_path / "set_a" / "refine_bbox_jsons").mkdir(parents=True)
    (tmp_path / "set_a" / "videos").mkdir()
    (tmp_path / "set_a" / "refine_bbox_jsons" / "v1.json").write_text(json.dumps({"2": {"face": [{}]}, "5": {"face": [{}]}}))
    (tmp_path / "total_train_data.txt").write_text(
        "/authors/disk/set_a/videos,/authors/disk/captions/set_a.json,/authors/disk/set_a\n"
        "/authors/disk/set_b/videos,/authors/disk/captions/set_b.json,/authors/disk/set_b\n"
        "only,two\n")
    (tmp_path / "set_b" / "videos").mkdir(parents=True)
    items = _items("consisid", tmp_path)
    assert items[0] == {"path": str(tmp_path / "set_a" / "videos" / "v1.mp4"), "caption": "a man", "ref": None,
                        "frames": [2, 6]}
    assert [(it["path"], bool(it["invalid"])) for it in items[1:]] == [
        (str(tmp_path / "captions" / "set_b.json"), True), (f"{tmp_path / 'total_train_data.txt'}:3", True)]
    maker = ExampleMaker(ExampleOptions(face_models="unused"))
    assert {maker(it).reason for it in items[1:]} == {"bad_listing"}


def test_consisid_captions_inside_each_dataset_folder_are_read(tmp_path):
    (tmp_path / "set_a" / "captions").mkdir(parents=True)
    (tmp_path / "set_a" / "captions" / "set_a_captions.json").write_text(json.dumps(
        [{"path": "videos/v1.mp4", "cap": "a woman sings"}]))
    assert _items("consisid", tmp_path) == [{"path": str(tmp_path / "set_a" / "videos" / "v1.mp4"),
                                            "caption": "a woman sings", "ref": None}]


def test_sfhq_jsonl_captions_with_a_broken_line_keep_the_other_captions(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(b"x")
    (tmp_path / "caps.jsonl").write_text('{"file": "a.jpg", "caption": "a man"}\n{"file": \n')
    items = _items("sfhq", tmp_path / "images", captions=str(tmp_path / "caps.jsonl"))
    assert [(Path(it["path"]).name, it["caption"], "invalid" in it) for it in items] == [
        ("a.jpg", "a man", False), ("caps.jsonl:2", "", True)]


def test_opens2v_without_a_merged_caption_takes_a_face_captioners_caption(tmp_path):
    (tmp_path / "part1.json").write_text(json.dumps({"c1": {"metadata": {
        "path": "c1.mp4", "face_cap_qwen": "", "face_cap_glm": ["A man waves."], "face_cap_Aria": "x"}}}))
    assert _items("opens2v", tmp_path / "part1.json")[0]["caption"] == "A man waves."


def test_opens2v_regular_pair_json_is_read_and_cut_to_face_cut(tmp_path):
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "part1.json").write_text(json.dumps({"clip_a_step6": {
        "metadata": {"path": "clip_a.mp4", "cap": ["Three women talk on a lawn."], "cut": [0, 95],
                     "face_cut": [5, 90], "fps": 29.97},
        "annotation": {"ann_frame_data": {"ann_frame_idx": 0, "annotations": []}}}}))
    items = _items("opens2v", tmp_path / "json", video_root=str(tmp_path / "clips"))
    assert items == [{"path": str(tmp_path / "clips" / "clip_a.mp4"), "caption": "Three women talk on a lawn.",
                      "ref": None, "frames": [5, 90]}]
