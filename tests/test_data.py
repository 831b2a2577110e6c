"""Building a training set from generated clips/images (stand-in face models) and loading both
stages: counts and skips, resume, the batch contract, determinism, one global stream whatever
the process count (rows, states), dropout,
and clear errors for corrupt records, empty folders and wrong frame counts."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mm_jax import config
from mm_jax.data.build import BuildError, build_dataset
from mm_jax.data.loader import make_loader
from mm_jax.data.records import CorruptRecordError, decode_record
from mm_jax.demo.assets import standin_faces
from mm_jax.demo.synthetic import make_demo_source
from mm_jax.demo.tiny_checkpoint import build_tokenizer
from mm_jax.text import CLASS_WORDS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    src = make_demo_source(root / "src", num_clips=5, num_images=3, frames=9, height=64, width=64, seed=1)
    (root / "src" / "broken.mp4").write_bytes(b"not a video")
    import imageio.v3 as iio

    iio.imwrite(root / "src" / "dark.png", np.full((64, 64, 3), 10, np.uint8))
    with open(root / "src" / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "broken.mp4", "caption": "a man runs"}) + "\n")
        f.write(json.dumps({"file": "dark.png", "caption": "a woman waves"}) + "\n")
        f.write(json.dumps({"file": "scenery.png", "caption": "a sunset over the sea"}) + "\n")
    shutil.copy(root / "src" / "image_0005.png", root / "src" / "scenery.png")
    (root / "src" / "clip_0000.txt").write_text("ignored: captions.jsonl wins")
    pack = standin_faces(root)
    summary = build_dataset(src, root / "out", pack, progress=False)
    tok = build_tokenizer(root / "tok")
    return root, summary, tok


def _cfg(path, stage="video", **over):
    cfg = config.load(f"configs/{stage}.py:tiny", [f"data.path={path}"])
    for k, v in over.items():
        cfg.data[k] = v
    return cfg.data


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


def test_video_and_image_batches_follow_the_contract(built):
    root, _, tok = built
    b = next(make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=0))
    assert b["pixels"].shape == (2, 9, 64, 64, 3) and b["pixels"].dtype == np.float32
    assert -1.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
    assert b["face_mask"].shape == (2, 9, 64, 64) and set(np.unique(b["face_mask"])) <= {0.0, 1.0}
    assert b["input_ids"].shape == (2, 32) and b["input_ids"].dtype == np.int32
    assert b["class_index"].dtype == np.int32 and b["e_id"].shape == (2, 512) and b["has_id"].dtype == bool
    assert b["ref_pixels"].shape == (2, 224, 224, 3)
    # the face square is white: inside the mask the pixels are brighter than the dark background outside
    m = b["face_mask"] > 0
    assert m.any() and b["pixels"].mean(-1)[m].mean() > b["pixels"].mean(-1)[~m].mean() + 0.5
    img = next(make_loader(_cfg(root / "out", "image"), tokenizer=tok, global_batch_size=4, seed=0))
    assert img["pixels"].shape == (4, 1, 64, 64, 3) and img["face_mask"].shape == (4, 1, 64, 64)


def test_same_seed_same_batches_and_a_restored_state_continues_exactly(built):
    root, _, tok = built
    a = make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=5)
    b = make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=5)
    first = [next(a) for _ in range(3)]
    for x in first:
        y = next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    state = a.get_state()
    after = [next(a) for _ in range(2)]
    c = make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=5)
    c.set_state(state)
    for x in after:
        y = next(c)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    other = next(make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=6))
    assert not np.array_equal(other["pixels"], first[0]["pixels"])


def _same(x, y):
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def _joined(*parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_the_rows_of_two_processes_put_together_are_the_one_process_batch_across_epochs(built):
    """5 video records, global batch 4: batches 1, 2 and 3 straddle epoch boundaries (positions 5, 10, 15)."""
    from array_record.python.array_record_module import ArrayRecordReader

    root, _, tok = built
    one = make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=2, process_index=0,
                      process_count=1)
    halves = [make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=2, rows=r)
              for r in ((0, 2), (2, 4))]
    by_default = make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=2, process_index=1,
                             process_count=2)
    assert halves[0].batch_size == 2 and by_default.rows == (2, 4)
    batches = []
    for _ in range(4):
        whole, low, high = next(one), next(halves[0]), next(halves[1])
        assert whole["pixels"].shape[0] == 4 and low["pixels"].shape[0] == 2
        assert _same(whole, _joined(low, high)) and _same(high, next(by_default))
        batches.append(whole)
    # the global stream's first epoch (positions 0-4) holds every record once, the second a new order
    everything = set()
    for path in sorted((root / "out").glob("video-*.array_record")):
        r = ArrayRecordReader(str(path))
        everything |= {decode_record(x)["ref_embedding"].tobytes() for x in r.read_all()}
        r.close()
    ids = [e.tobytes() for b in batches for e in b["e_id"]]
    assert len(everything) == 5 and set(ids[:5]) == everything and set(ids[5:10]) == everything
    assert ids[:5] != ids[5:10]


def test_a_state_saved_by_two_processes_restores_on_one_and_the_reverse(built):
    root, _, tok = built
    mk = lambda **kw: make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=4, **kw)
    low, high = mk(rows=(0, 2)), mk(rows=(2, 4))
    for _ in range(2):
        next(low), next(high)
    state = low.get_state()
    assert state == high.get_state() == {"global_batch": 2, "global_batch_size": 4}
    one = mk(process_index=0, process_count=1)
    one.set_state(state)
    for _ in range(2):
        assert _same(next(one), _joined(next(low), next(high)))
    back = mk(rows=(2, 4))  # and a 1-process state restores in a 2-process loader
    back.set_state(one.get_state())
    assert _same(next(back), {k: v[2:] for k, v in next(one).items()})
    with pytest.raises(ValueError, match="saved with global batch 8, this run's is 4"):
        one.set_state({"global_batch": 3, "global_batch_size": 8})
    with pytest.raises(ValueError, match=r"rows=\(2, 5\): must be \(start, stop\) with 0 <= start < stop <= the "
                                         r"global batch 4"):
        mk(rows=(2, 5))


def test_a_state_of_the_earlier_per_process_loader_resumes_at_its_batch_count_with_a_warning(built):
    root, _, tok = built
    mk = lambda: make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=4, process_index=0,
                             process_count=1)
    ref = mk()
    expected = [next(ref) for _ in range(4)][3]
    for old in ({"next_index": 3}, {"next_index_in_cycle": 1, "next_index_in_datasets": 3,
                                    "iterators_in_use_indices": [0, 1],
                                    "iterators_in_use_states": [{"next_index": 2}, {"next_index": 1}],
                                    "exhausted": [0, 0], "future_states": {}}):
        ld = mk()
        with pytest.warns(UserWarning, match="cannot be continued exactly: resuming at global batch 3"):
            ld.set_state(old)
        assert _same(next(ld), expected)
    with pytest.raises(ValueError, match="cannot resume the data stream from it"):
        mk().set_state({"something": 1})


def test_condition_dropout_rates_match_the_config(built):
    root, _, tok = built
    ld = make_loader(_cfg(root / "out", "image", drop_text=0.2, drop_id=0.2, drop_both=0.2), tokenizer=tok,
                     global_batch_size=8, seed=0)
    batches = [next(ld) for _ in range(50)]
    n = 400
    no_id = sum(int((~b["has_id"]).sum()) for b in batches) / n
    no_text = sum(int((b["class_index"] < 0).sum()) for b in batches) / n
    both = sum(int(((~b["has_id"]) & (b["class_index"] < 0)).sum()) for b in batches) / n
    sigma = (0.4 * 0.6 / n) ** 0.5
    assert abs(no_id - 0.4) < 4 * sigma and abs(no_text - 0.4) < 4 * sigma
    assert abs(both - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5


def test_worker_processes_give_the_same_rows_and_restore_the_same_state(built):
    root, _, tok = built
    a = make_loader(_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=3, process_index=0,
                    process_count=1)
    b = make_loader(_cfg(root / "out", num_workers=2), tokenizer=tok, global_batch_size=4, seed=3, rows=(2, 4))
    whole = [next(a) for _ in range(3)]
    assert _same(next(b), {k: v[2:] for k, v in whole[0].items()})
    b.set_state({"global_batch": 2, "global_batch_size": 4})
    assert _same(next(b), {k: v[2:] for k, v in whole[2].items()})
    assert b.get_state() == {"global_batch": 3, "global_batch_size": 4}
    b.close()


def test_worker_processes_outlive_a_preemption_signal(built):
    """SLURM's ``--signal=USR1`` reaches every process of the job: the data workers ignore it (and
    SIGTERM), so the trainer can still load batches while it saves its preemption checkpoint."""
    import os
    import signal
    import time

    import psutil

    root, _, tok = built
    ld = make_loader(_cfg(root / "out", num_workers=1), tokenizer=tok, global_batch_size=2, seed=3)
    first = next(ld)
    workers = [c for c in psutil.Process().children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert workers
    for w in workers:
        os.kill(w.pid, signal.SIGUSR1)
        os.kill(w.pid, signal.SIGTERM)
    time.sleep(1.0)
    dead = [w.pid for w in workers if not w.is_running() or w.status() == psutil.STATUS_ZOMBIE]
    assert not dead, dead
    assert [next(ld)["class_index"].shape for _ in range(3)] == [first["class_index"].shape] * 3
    ld.close()


def test_worker_processes_die_with_a_killed_trainer(built):
    """kill -9 of the process that owns the loader (a preempted host, the kill -9 test of the
    multi-process training) does not leave its Grain workers running as orphans."""
    import signal
    import time

    import psutil

    root, _, tok = built
    code = (f"import os, time\nfrom mm_jax.data.loader import make_loader\nfrom tests.test_data import _cfg\n"
            f"loader = make_loader(_cfg({str(root / 'out')!r}, num_workers=2), tokenizer={str(root / 'tok')!r}, "
            f"global_batch_size=2, seed=3)\nfor _ in range(3):\n    next(loader)\nprint('ready', flush=True)\n"
            f"time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    assert p.stdout.readline().strip() == "ready"
    workers = [c for c in psutil.Process(p.pid).children(recursive=True) if "spawn_main" in " ".join(c.cmdline())]
    assert len(workers) == 2
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, [w.pid for w in alive]


def test_a_worker_loader_leaves_no_shared_memory_for_the_resource_tracker(built):
    root, _, tok = built
    code = (f"from mm_jax.data.loader import make_loader\nfrom tests.test_data import _cfg\n"
            f"def train():\n"  # as in mm_jax.train: a batch is still referenced when the loader closes
            f"    loader = make_loader(_cfg({str(root / 'out')!r}, num_workers=1), tokenizer={str(root / 'tok')!r}, "
            f"global_batch_size=2, seed=3)\n    for _ in range(8):\n        batch = next(loader)\n"
            f"    loader.close()\ntrain()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert "leaked shared_memory" not in run.stderr, run.stderr[-2000:]


def test_corrupt_records_empty_folders_and_bad_frame_counts_are_clear_errors(built, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    root, _, tok = built
    w = ArrayRecordWriter(str(tmp_path / "video-00000.array_record"), "group_size:1")
    w.write(b"MMR1garbage")
    w.close()
    with pytest.raises(CorruptRecordError, match="shard video-00000.array_record, record 0"):
        next(make_loader(_cfg(tmp_path, shuffle=False), tokenizer=tok, global_batch_size=1, seed=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no video ArrayRecord shards"):
        make_loader(_cfg(tmp_path / "empty"), tokenizer=tok, global_batch_size=1, seed=0)
    for frames in (8, 13):  # not 4k+1; 4k+1 but 4 latent frames, which decode to 16
        with pytest.raises(ValueError, match=f"data.frames={frames}: not a frame count the VAE encodes and decodes "
                                             f"exactly.*valid: 1, 9, 17, 25, 33, 41, 49"):
            make_loader(_cfg(root / "out", frames=frames), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="has 9 frames; data.frames=17"):
        next(make_loader(_cfg(root / "out", frames=17), tokenizer=tok, global_batch_size=1, seed=0))


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
    from mm_jax.data.records import decode_record
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


def test_the_private_grain_members_the_loader_drains_exist():
    """Loader.close waits for Grain's queued shared-memory unlinks through members Grain does not make
    public (see mm_jax/data/loader.py); grain is pinned, and this fails first when an upgrade moves them."""
    import importlib.metadata

    from grain.multiprocessing import SharedMemoryArray

    from mm_jax.data.loader import GRAIN_PRIVATE_MEMBERS

    assert importlib.metadata.version("grain") == "0.2.18"
    for name in GRAIN_PRIVATE_MEMBERS:
        assert hasattr(SharedMemoryArray, name), name
    assert callable(SharedMemoryArray._disable_async_del)


@pytest.fixture(scope="module")
def long_clips(built):
    """Two 17-frame clips: data.frames=9 at data.frame_stride=2 spans them, so every loader starts at frame 0."""
    root, _, _ = built
    src = make_demo_source(root / "long_src", num_clips=2, frames=17, height=64, width=64, seed=3)
    build_dataset(src, root / "long", root / "standin_faces", progress=False)
    return root / "long"


PRE = dict(frames=9, frame_stride=2, height=48, width=64)  # what the tests' config reads


def _fake_precomputed(src, dst, **over):
    """``src``'s video records with stand-in latents and a ``precomputed`` dict as --precompute writes it
    (PRE, frame indices 0, 2, ..., 16), ``over`` replacing its values (None: the key is absent)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from mm_jax.data.records import encode_record

    dst.mkdir()
    settings = dict(PRE, frame_indices=list(range(0, 17, 2)), max_text_length=32, checkpoint="ckpt")
    settings.update(over)
    settings = {k: v for k, v in settings.items() if v is not None}
    rng = np.random.default_rng(0)
    for path in sorted(src.glob("video-*.array_record")):
        r_in = ArrayRecordReader(str(path))
        w = ArrayRecordWriter(str(dst / path.name), "group_size:1")
        for x in r_in.read_all():
            r = decode_record(x)
            r.update(latents=rng.normal(size=(3, 6, 8, 4)).astype(np.float32),
                     latents_std=np.ones((3, 6, 8, 4), np.float32),
                     text_embedding=rng.normal(size=(32, 32)).astype(np.float32), precomputed=settings)
            w.write(encode_record(r))
        w.close()
        r_in.close()
    np.save(dst / "null_text.npy", np.zeros((32, 32), np.float32))
    return dst


def test_precomputed_latents_load_with_the_face_mask_of_the_frames_they_encode(built, long_clips, tmp_path):
    root, _, tok = built
    data = _fake_precomputed(long_clips, tmp_path / "pre")
    kw = dict(tokenizer=tok, global_batch_size=2, seed=0, process_index=0, process_count=1)
    pre = next(make_loader(_cfg(data, precomputed=True, shuffle=False, **PRE), **kw))
    pixels = next(make_loader(_cfg(long_clips, shuffle=False, **PRE), **kw))  # 17 frames, span 17: start 0
    assert pre["latents"].shape == (2, 3, 6, 8, 4) and "pixels" not in pre
    assert pre["face_mask"].shape == (2, 9, 48, 64) and np.array_equal(pre["face_mask"], pixels["face_mask"])
    stride1 = next(make_loader(_cfg(long_clips, shuffle=False, frames=9, frame_stride=1, height=48, width=64), **kw))
    assert not np.array_equal(stride1["face_mask"], pixels["face_mask"])  # the face moves: the stride matters


@pytest.mark.parametrize("field,recorded", [("frames", 17), ("frame_stride", 1), ("frame_stride", None),
                                            ("height", 64), ("width", 48)])
def test_precomputed_latents_of_other_settings_are_refused_naming_the_field(built, long_clips, tmp_path, field,
                                                                            recorded):
    root, _, tok = built
    data = _fake_precomputed(long_clips, tmp_path / "pre", **{field: recorded})
    ld = make_loader(_cfg(data, precomputed=True, **PRE), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=rf"video-00000.array_record, record \d: latents precomputed with "
                                         rf"{field}={recorded}, but data.{field}={PRE[field]}; set "
                                         rf"data.{field}={recorded} or rebuild with python -m mm_jax.data.build "
                                         rf"--precompute --frames 9 --frame-stride 2 --height 48 --width 64"):
        next(ld)


def test_precomputed_latents_of_other_frames_are_refused(built, long_clips, tmp_path):
    root, _, tok = built
    data = _fake_precomputed(long_clips, tmp_path / "pre", frame_indices=list(range(9)))  # an older precompute
    ld = make_loader(_cfg(data, precomputed=True, **PRE), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"latents precomputed from frames \[0, 1, 2, 3, 4, 5, 6, 7, 8\], but the "
                                         r"loader masks frames \[0, 2, 4, 6, 8, 10, 12, 14, 16\]"):
        next(ld)


@pytest.mark.slow  # builds the tiny checkpoint (about 40 s on 2 cores)
def test_precompute_encodes_the_frames_and_size_the_loader_reads(built, long_clips, tmp_path):
    """The real ``precompute`` at frame_stride 2 and 48x64: its latents are the VAE posterior of the
    loader's own pixels for those settings, and the record says which frames and size it encoded."""
    import jax
    import jax.numpy as jnp

    from mm_jax import checkpoint
    from mm_jax.data.precompute import precompute
    from mm_jax.demo.tiny_checkpoint import build_tiny_checkpoint

    from array_record.python.array_record_module import ArrayRecordReader

    root, _, tok = built
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "pre"
    shutil.copytree(long_clips, data)
    precompute(data, ckpt, max_text_length=32, progress=False, **PRE)
    reader = ArrayRecordReader(str(data / "video-00000.array_record"))
    records = [decode_record(x) for x in reader.read_all()]
    reader.close()
    assert all(r["precomputed"] == dict(PRE, frame_indices=[0, 2, 4, 6, 8, 10, 12, 14, 16], max_text_length=32,
                                        checkpoint=str(ckpt)) for r in records)
    kw = dict(tokenizer=tok, global_batch_size=2, seed=0, process_index=0, process_count=1)
    pixels = next(make_loader(_cfg(long_clips, shuffle=False, **PRE), **kw))["pixels"]
    pre = next(make_loader(_cfg(data, shuffle=False, precomputed=True, **PRE), **kw))
    vae = checkpoint.load_component(ckpt, "vae")
    expected = np.asarray(jax.jit(lambda x: vae.encode(x).mean)(jnp.asarray(pixels)) * vae.cfg.scaling_factor)
    assert pre["latents"].shape == expected.shape == (2, 3, 6, 8, vae.cfg.latent_channels)
    np.testing.assert_allclose(pre["latents"], expected, rtol=1e-5, atol=1e-5)
