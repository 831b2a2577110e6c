"""The TFDS builders on Apache Beam (DirectRunner) against today's builder on the same synthetic
source, the loaders through tfds.data_source against the shard-folder path, corrupt inputs, a
killed build, the prepare CLI and the demo's TFDS path (the layouts: tests/test_layouts.py)."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from mm_jax import config
from mm_jax.data.build import build_dataset
from mm_jax.data.loader import make_loader
from mm_jax.data.prepare import main as prepare_main
from mm_jax.data.prepare import pipeline_args, prepare
from mm_jax.data.record_sources import find_tfds_dir
from mm_jax.data.records import decode_record
from mm_jax.data.transform import decode_jpeg
from mm_jax.demo.assets import standin_faces, synthetic_dataset
from mm_jax.demo.synthetic import make_demo_source
from mm_jax.demo.tiny_checkpoint import build_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One synthetic source (clips, images, an undecodable file, a caption without a class word)
    built both ways: today's builder (shards) and the Beam DirectRunner (TFDS)."""
    root = tmp_path_factory.mktemp("tfds")
    src = make_demo_source(root / "src", num_clips=4, num_images=2, frames=9, height=64, width=64, seed=3)
    (root / "src" / "broken.mp4").write_bytes(b"not a video")
    with open(root / "src" / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "broken.mp4", "caption": "a man runs"}) + "\n")
        f.write(json.dumps({"file": "scenery.png", "caption": "a sunset over the sea"}) + "\n")
        f.write('{"file": "image_0000.png", "caption": "a man\n')  # a line cut short: counted, not fatal
    (root / "src" / "scenery.png").write_bytes((root / "src" / "image_0004.png").read_bytes())
    pack = standin_faces(root)
    shards = build_dataset(src, root / "shards", pack, progress=False)
    tfds_summary = prepare("mm_faces_manifest", src, root / "tfds", pack, workers=0, progress=False)
    return root, pack, shards, tfds_summary, build_tokenizer(root / "tok")


def _shard_records(folder: Path) -> list[dict]:
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for p in sorted(folder.glob("*.array_record")):
        r = ArrayRecordReader(str(p))
        out += [decode_record(x) for x in r.read_all()]
        r.close()
    return out


def _tfds_records(data_dir: Path, split: str) -> list[dict]:
    """The split's examples as record fields (typed features decoded, ``features.from_features``)."""
    import tensorflow_datasets as tfds

    from mm_jax.data.tfds.features import from_features

    ds = tfds.builder_from_directory(str(find_tfds_dir(data_dir))).as_data_source(split=split)
    return [from_features(ds[i]) for i in range(len(ds))]


def _equal(a, b) -> bool:
    """A TFDS field ``a`` equals the record's ``b``; TFDS decodes the JPEGs, the record holds their bytes."""
    if isinstance(b, bytes) and isinstance(a, np.ndarray):
        return np.array_equal(a, decode_jpeg(b))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    if isinstance(a, list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_beam_records_equal_todays_builder_field_for_field(built):
    root, _, shards, s, _ = built
    ours = {r["source"]: r for k in ("image", "video") for r in _tfds_records(root / "tfds", k)}
    ref = {r["source"]: r for r in _shard_records(root / "shards")}
    assert len(ref) == shards["records"] == 6 and set(ours) == set(ref)
    for source, r in ref.items():
        assert set(ours[source]) == set(r), source
        for field, value in r.items():
            assert _equal(ours[source][field], value), (source, field)
    assert s["records"] == {"image": 2, "video": 4}
    assert {k: v["files"] for k, v in s["skipped"].items()} == {k: v["files"] for k, v in shards["skipped"].items()}


def test_the_dataset_has_typed_features_that_tfds_decodes_without_tensorflow(built):
    import importlib.util

    import tensorflow_datasets as tfds

    root = built[0]
    b = tfds.builder_from_directory(str(find_tfds_dir(root / "tfds")))
    f = b.info.features
    assert isinstance(f["frames"], tfds.features.Sequence) and isinstance(f["frames"].feature, tfds.features.Image)
    assert isinstance(f["ref_crop"], tfds.features.Image) and isinstance(f["caption"], tfds.features.Text)
    assert f["boxes"].shape == (None, 4) and f["ref_embedding"].shape == (512,)
    x = b.as_data_source(split="video")[0]
    assert importlib.util.find_spec("tensorflow") is None
    assert len(x["frames"]) == len(x["boxes"]) == 9 and x["frames"][0].shape == (64, 64, 3)
    assert x["ref_crop"].shape == (224, 224, 3) and x["ref_crop"].dtype == np.uint8 and b"a " in x["caption"]


def test_a_corrupt_file_is_skipped_and_counted_with_its_reason_and_nothing_else_is_lost(built):
    root, _, _, s, _ = built
    assert s["skipped"]["unreadable"]["files"] == [str(root / "src" / "broken.mp4")]
    assert s["counters"]["skipped/unreadable"] == 1 and s["counters"]["records/video"] == 4
    assert s["records"] == {"image": 2, "video": 4}  # every other clip and image of the source


def test_a_broken_listing_line_is_skipped_and_counted_by_both_builders(built):
    root, _, shards, s, _ = built
    line = f"{root / 'src' / 'captions.jsonl'}:{len((root / 'src' / 'captions.jsonl').read_text().splitlines())}"
    assert s["skipped"]["bad_listing"]["files"] == [line] == shards["skipped"]["bad_listing"]["files"]
    assert s["counters"]["skipped/bad_listing"] == 1 and s["records"] == {"image": 2, "video": 4}


def test_captions_without_a_class_word_are_counted_by_the_build(built):
    root, _, shards, s, _ = built
    assert s["skipped"]["no_class_word"]["files"] == [str(root / "src" / "scenery.png")]
    assert s["captions"] == {"without_class_word": 1, "rewritten": {}, "dropped": 1} == shards["captions"]


def _cfg(path, stage="video", **over):
    cfg = config.load(f"configs/{stage}.py:tiny", [f"data.path={path}"])
    for k, v in over.items():
        cfg.data[k] = v
    return cfg.data


@pytest.fixture(scope="module")
def same_order_shards(built, tmp_path_factory):
    """The shard builder's records in the TFDS order: the same records, the other path."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from mm_jax.data.records import encode_record

    root = built[0]
    by_source = {r["source"]: r for r in _shard_records(root / "shards")}
    folder = tmp_path_factory.mktemp("same_order")
    for kind in ("image", "video"):
        w = ArrayRecordWriter(str(folder / f"{kind}-00000.array_record"), "group_size:1")
        for r in _tfds_records(root / "tfds", kind):
            w.write(encode_record(by_source[r["source"]]))
        w.close()
    return folder


@pytest.mark.parametrize("stage,batch", [("video", 2), ("image", 2)])
def test_grain_through_tfds_data_source_gives_the_shard_folder_batches_for_the_same_seed(built, same_order_shards,
                                                                                         stage, batch):
    root, _, _, _, tok = built
    for pi, pc in ((0, 1), (1, 2)):
        a = make_loader(_cfg(root / "tfds", stage), tokenizer=tok, global_batch_size=batch * pc, seed=7,
                        process_index=pi, process_count=pc)
        b = make_loader(_cfg(same_order_shards, stage), tokenizer=tok, global_batch_size=batch * pc, seed=7,
                        process_index=pi, process_count=pc)
        for _ in range(4):
            x, y = next(a), next(b)
            assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
        state = a.get_state()
        after = [next(a) for _ in range(2)]
        c = make_loader(_cfg(root / "tfds", stage, format="tfds"), tokenizer=tok, global_batch_size=batch * pc,
                        seed=7, process_index=pi, process_count=pc)
        c.set_state(state)
        for x in after:
            y = next(c)
            assert all(np.array_equal(x[k], y[k]) for k in x)


def test_a_grain_worker_process_reads_the_tfds_dataset_with_the_same_batches(built):
    root, _, _, _, tok = built
    a = make_loader(_cfg(root / "tfds"), tokenizer=tok, global_batch_size=2, seed=3)
    b = make_loader(_cfg(root / "tfds", num_workers=1), tokenizer=tok, global_batch_size=2, seed=3)
    for _ in range(2):
        x, y = next(a), next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    b.close()


def test_a_tfds_folder_without_the_stage_split_or_dataset_is_a_clear_error(built, tmp_path):
    root, _, _, _, tok = built
    with pytest.raises(FileNotFoundError, match="no TFDS dataset"):
        make_loader(_cfg(tmp_path, format="tfds"), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="data.format='tf': must be"):
        make_loader(_cfg(root / "tfds", format="tf"), tokenizer=tok, global_batch_size=1, seed=0)


# -- a corrupt container in a Beam build -----------------------------------------------------------
def _png(rgb: np.ndarray) -> bytes:
    import imageio.v3 as iio

    return iio.imwrite("<bytes>", rgb, extension=".png")


def test_a_corrupt_tar_shard_is_counted_and_the_other_shards_are_built(built, tmp_path):
    import imageio.v3 as iio

    root, pack = built[0], built[1]
    (tmp_path / "wds").mkdir()
    good = tmp_path / "wds" / "00000.tar"
    with tarfile.open(good, "w") as tar:
        for i in (4, 5):
            for name, data in ((f"{i}.png", _png(iio.imread(root / "src" / f"image_000{i}.png"))),
                               (f"{i}.txt", b"a woman smiles")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (tmp_path / "wds" / "00001.tar").write_bytes(good.read_bytes()[:700] + b"\x00garbage" * 50)
    s = prepare("mm_laion_face", tmp_path / "wds", tmp_path / "out", pack, workers=0, progress=False)
    assert s["records"] == {"image": 2}
    assert s["skipped"]["unreadable_file"]["files"] == [str(tmp_path / "wds" / "00001.tar")]


# -- interrupted builds, the CLI, the demo ----------------------------------------------------------
def _prepare_cmd(src, out, pack) -> list[str]:
    return [sys.executable, "-m", "mm_jax.data.prepare", "--src", str(src), "--out", str(out), "--face-models",
            str(pack), "--workers", "0", "--quiet"]


@pytest.mark.slow
def test_killing_a_build_and_rerunning_gives_a_complete_duplicate_free_dataset(built, tmp_path):
    root, pack = built[0], built[1]
    out, tmp = tmp_path / "out", tmp_path / "tmp"
    tmp.mkdir()
    # prepare's progress files (one byte per processed item) lie under TMPDIR: kill once 2 items are done
    proc = subprocess.Popen(_prepare_cmd(root / "src", out, pack), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env={**os.environ, "TMPDIR": str(tmp)})
    deadline = time.time() + 120
    while time.time() < deadline and sum(f.stat().st_size for f in tmp.glob("mm_prepare_*/*")) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(out.glob("mm_faces_manifest/incomplete.*")), "the build finished before it could be killed"
    assert find_tfds_dir(out) is None  # readers see no dataset, not part of one
    rerun = subprocess.run(_prepare_cmd(root / "src", out, pack), cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert not list(out.glob("mm_faces_manifest/incomplete.*"))
    sources = [r["source"] for k in ("image", "video") for r in _tfds_records(out, k)]
    expected = [r["source"] for k in ("image", "video") for r in _tfds_records(root / "tfds", k)]
    assert len(sources) == len(set(sources)) and sorted(sources) == sorted(expected)


def test_prepare_cli_errors_name_the_problem_and_exit_2(built, tmp_path, capsys):
    root, pack = built[0], built[1]
    assert prepare_main(["--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--face-models",
                         str(pack), "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert prepare_main(["--src", str(root / "src"), "--out", str(tmp_path / "o"), "--face-models",
                         str(tmp_path), "--quiet"]) == 2
    assert "--face-models" in capsys.readouterr().err
    assert prepare_main(["--builder", "mm_clips_csv", "--src", str(root / "src" / "captions.jsonl"), "--out",
                         str(tmp_path / "o"), "--face-models", str(pack), "--quiet"]) == 2
    assert "no clip column" in capsys.readouterr().err
    # a complete dataset is reused as it is, and refused when asked for other settings
    assert prepare_main(["--src", str(root / "src"), "--out", str(root / "tfds"), "--face-models", str(pack),
                         "--quiet"]) == 0
    assert prepare_main(["--src", str(root / "src"), "--out", str(root / "tfds"), "--face-models", str(pack),
                         "--min-similarity", "0.9", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--workers", "-1"], "--workers -1: must be >= 0"),
    (["--max-frames", "0"], "--max-frames 0: must be >= 1"),
    (["--min-similarity", "2"], "--min-similarity 2.0: must be in [-1, 1]"),
    (["--det-size", "100"], "--det-size 100: must be a positive multiple of 32"),
    (["--jpeg-quality", "101"], "--jpeg-quality 101: must be in [1, 100]"),
])
def test_prepare_refuses_out_of_range_settings_by_flag_before_writing(extra, message, tmp_path, capsys):
    assert prepare_main(["--src", str(tmp_path), "--out", str(tmp_path / "o"), "--face-models", str(tmp_path),
                         "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_prepare_refuses_a_url_source_with_what_to_do_instead(tmp_path, capsys):
    assert prepare_main(["--src", "gs://bucket/laion", "--out", str(tmp_path / "o"), "--face-models", str(tmp_path),
                         "--quiet"]) == 2
    assert "--src gs://bucket/laion: sources are read from a filesystem path" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_beam_options_follow_the_tfds_build_syntax():
    assert pipeline_args("runner=DataflowRunner,project=p, region=r", 4) == [
        "--runner=DataflowRunner", "--project=p", "--region=r"]
    # a comma inside a value (a list option) does not start a new option; leading dashes are allowed
    assert pipeline_args("runner=DataflowRunner,experiments=use_runner_v2,upload_graph,--max_num_workers=8", 0) == [
        "--runner=DataflowRunner", "--experiments=use_runner_v2,upload_graph", "--max_num_workers=8"]
    assert pipeline_args("", 4)[1:3] == ["--direct_running_mode=multi_processing", "--direct_num_workers=4"]
    assert pipeline_args("", 0)[1:] == ["--direct_running_mode=in_memory"]


def test_the_demo_builds_its_data_through_the_tfds_path(built, tmp_path):
    import ml_collections

    root, pack, _, _, tok = built
    synthetic = ml_collections.ConfigDict(dict(num_clips=3, num_images=0, frames=9, height=64, width=64))
    out = synthetic_dataset(tmp_path, synthetic, pack, seed=0, data_format="tfds")
    assert find_tfds_dir(out) is not None and not list(out.glob("*.array_record"))
    b = next(make_loader(_cfg(out, format="tfds"), tokenizer=tok, global_batch_size=2, seed=0))
    assert b["pixels"].shape == (2, 9, 64, 64, 3) and b["e_id"].shape == (2, 512)
