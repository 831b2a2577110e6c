"""The shard builder (python -m mm_jax.data.build) on generated clips/images with stand-in face
models: counts and skipped files by reason, resume without duplicates, an empty or missing source,
and one face analyzer per pack and detector size."""
import json
import shutil

import numpy as np
import pytest

from mm_jax.data.build import BuildError, build_dataset
from mm_jax.data.records import decode_record
from mm_jax.text import CLASS_WORDS
from tests.data_fixtures import build_once


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_once(tmp_path_factory)


def test_build_counts_records_and_names_the_skipped_files(built):
    root, s, _ = built
    assert s["records"] == 8 and s["kinds"] == {"video": 5, "image": 3}
    assert s["skipped"]["unreadable"]["files"] == [str(root / "src" / "broken.mp4")]
    assert s["skipped"]["no_face"]["files"] == [str(root / "src" / "dark.png")]
    assert s["skipped"]["no_class_word"]["files"] == [str(root / "src" / "scenery.png")]
    assert sorted(s["shards"]) == ["image-00000.array_record", "video-00000.array_record"]
    assert json.loads((root / "out" / "summary.json").read_text())["records"] == 8


def test_rebuilding_resumes_without_duplicates_and_drops_partial_shards(built):
    root, _, _ = built
    out = root / "out_resume"
    shutil.copytree(root / "out", out)
    (out / "video-00001.array_record.tmp").write_bytes(b"half a shard from a killed run")
    s = build_dataset(root / "src", out, root / "standin_faces", progress=False)
    assert s["records"] == 8 and s["processed"] == 11
    assert not list(out.glob("*.tmp")) and len(list(out.glob("*.array_record"))) == 2


def test_building_from_an_empty_or_missing_source_is_an_error_that_writes_nothing(built, tmp_path):
    root, _, _ = built
    (tmp_path / "empty").mkdir()
    with pytest.raises(BuildError, match="no images or videos"):
        build_dataset(tmp_path / "empty", tmp_path / "out", root / "standin_faces", progress=False)
    with pytest.raises(BuildError, match="no such folder or manifest"):
        build_dataset(tmp_path / "missing", tmp_path / "out", root / "standin_faces", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_second_face_pack_or_detector_size_in_one_process_gets_its_own_analyzer(built, tmp_path):
    """The builder used to keep the first analyzer for the whole process, whatever was asked later."""
    from mm_jax.data import build
    from mm_jax.data.example import ExampleOptions
    from mm_jax.demo.standin_faces import make_detector, make_recognizer

    root, _, _ = built
    other = tmp_path / "other_pack"
    other.mkdir()
    make_detector(other / "det_10g.onnx", box=6.0)
    make_recognizer(other / "w600k_r50.onnx", seed=5)  # another identity space
    item = next(it for it in build.list_items(root / "src") if it["path"].endswith("clip_0000.mp4"))
    records, analyzers = {}, {}
    for name, pack, det_size in (("first", root / "standin_faces", 640), ("other", other, 640),
                                 ("smaller", root / "standin_faces", 320)):
        options = ExampleOptions(face_models=str(pack), max_frames=9, min_similarity=-1.0, det_size=det_size,
                                 jpeg_quality=90, class_words=CLASS_WORDS)
        _, outcome = build._work((item, options))
        assert outcome.status == "ok"
        records[name] = decode_record(outcome.record, name)
        analyzers[name] = build._MAKER.analyzer()
    assert not np.allclose(records["first"]["target_embedding"], records["other"]["target_embedding"], atol=1e-3)
    assert analyzers["smaller"].input_size == (320, 320)
    assert analyzers["other"].models.folder == other
