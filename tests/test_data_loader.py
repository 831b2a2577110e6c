"""The Grain loaders on a built shard folder: the batch contract of both stages, determinism and
restored states, one global stream whatever the process count (rows, states), condition dropout,
and clear errors for corrupt records, empty folders and wrong frame counts."""

import numpy as np
import pytest

from mm_jax.data.loader import make_loader
from mm_jax.data.records import CorruptRecordError, decode_record
from tests.data_fixtures import build_once, data_cfg, joined, same_batch


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_once(tmp_path_factory)


def test_video_and_image_batches_follow_the_contract(built):
    root, _, tok = built
    b = next(make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=0))
    assert b["pixels"].shape == (2, 9, 64, 64, 3) and b["pixels"].dtype == np.float32
    assert -1.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
    assert b["face_mask"].shape == (2, 9, 64, 64) and set(np.unique(b["face_mask"])) <= {0.0, 1.0}
    assert b["input_ids"].shape == (2, 32) and b["input_ids"].dtype == np.int32
    assert b["class_index"].dtype == np.int32 and b["e_id"].shape == (2, 512) and b["has_id"].dtype == bool
    assert b["ref_pixels"].shape == (2, 224, 224, 3)
    # the face square is white: inside the mask the pixels are brighter than the dark background outside
    m = b["face_mask"] > 0
    assert m.any() and b["pixels"].mean(-1)[m].mean() > b["pixels"].mean(-1)[~m].mean() + 0.5
    img = next(make_loader(data_cfg(root / "out", "image"), tokenizer=tok, global_batch_size=4, seed=0))
    assert img["pixels"].shape == (4, 1, 64, 64, 3) and img["face_mask"].shape == (4, 1, 64, 64)


def test_same_seed_same_batches_and_a_restored_state_continues_exactly(built):
    root, _, tok = built
    a = make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=5)
    b = make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=5)
    first = [next(a) for _ in range(3)]
    for x in first:
        y = next(b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    state = a.get_state()
    after = [next(a) for _ in range(2)]
    c = make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=5)
    c.set_state(state)
    for x in after:
        y = next(c)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    other = next(make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=6))
    assert not np.array_equal(other["pixels"], first[0]["pixels"])


def test_the_rows_of_two_processes_put_together_are_the_one_process_batch_across_epochs(built):
    """5 video records, global batch 4: batches 1, 2 and 3 straddle epoch boundaries (positions 5, 10, 15)."""
    from array_record.python.array_record_module import ArrayRecordReader

    root, _, tok = built
    one = make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=2, process_index=0,
                      process_count=1)
    halves = [make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=2, rows=r)
              for r in ((0, 2), (2, 4))]
    by_default = make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=2, process_index=1,
                             process_count=2)
    assert halves[0].batch_size == 2 and by_default.rows == (2, 4)
    batches = []
    for _ in range(4):
        whole, low, high = next(one), next(halves[0]), next(halves[1])
        assert whole["pixels"].shape[0] == 4 and low["pixels"].shape[0] == 2
        assert same_batch(whole, joined(low, high)) and same_batch(high, next(by_default))
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
    mk = lambda **kw: make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=4, seed=4, **kw)
    low, high = mk(rows=(0, 2)), mk(rows=(2, 4))
    for _ in range(2):
        next(low), next(high)
    state = low.get_state()
    assert state == high.get_state() == {"global_batch": 2, "global_batch_size": 4}
    one = mk(process_index=0, process_count=1)
    one.set_state(state)
    for _ in range(2):
        assert same_batch(next(one), joined(next(low), next(high)))
    back = mk(rows=(2, 4))  # and a 1-process state restores in a 2-process loader
    back.set_state(one.get_state())
    assert same_batch(next(back), {k: v[2:] for k, v in next(one).items()})
    with pytest.raises(ValueError, match="saved with global batch 8, this run's is 4"):
        one.set_state({"global_batch": 3, "global_batch_size": 8})
    with pytest.raises(ValueError, match=r"rows=\(2, 5\): must be \(start, stop\) with 0 <= start < stop <= the "
                                         r"global batch 4"):
        mk(rows=(2, 5))


def test_a_state_of_the_earlier_per_process_loader_resumes_at_its_batch_count_with_a_warning(built):
    root, _, tok = built
    mk = lambda: make_loader(data_cfg(root / "out"), tokenizer=tok, global_batch_size=2, seed=4, process_index=0,
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
        assert same_batch(next(ld), expected)
    with pytest.raises(ValueError, match="cannot resume the data stream from it"):
        mk().set_state({"something": 1})


def test_condition_dropout_rates_match_the_config(built):
    root, _, tok = built
    ld = make_loader(data_cfg(root / "out", "image", drop_text=0.2, drop_id=0.2, drop_both=0.2), tokenizer=tok,
                     global_batch_size=8, seed=0)
    batches = [next(ld) for _ in range(50)]
    n = 400
    no_id = sum(int((~b["has_id"]).sum()) for b in batches) / n
    no_text = sum(int((b["class_index"] < 0).sum()) for b in batches) / n
    both = sum(int(((~b["has_id"]) & (b["class_index"] < 0)).sum()) for b in batches) / n
    sigma = (0.4 * 0.6 / n) ** 0.5
    assert abs(no_id - 0.4) < 4 * sigma and abs(no_text - 0.4) < 4 * sigma
    assert abs(both - 0.2) < 4 * (0.2 * 0.8 / n) ** 0.5


def test_corrupt_records_empty_folders_and_bad_frame_counts_are_clear_errors(built, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    root, _, tok = built
    w = ArrayRecordWriter(str(tmp_path / "video-00000.array_record"), "group_size:1")
    w.write(b"MMR1garbage")
    w.close()
    with pytest.raises(CorruptRecordError, match="shard video-00000.array_record, record 0"):
        next(make_loader(data_cfg(tmp_path, shuffle=False), tokenizer=tok, global_batch_size=1, seed=0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no video ArrayRecord shards"):
        make_loader(data_cfg(tmp_path / "empty"), tokenizer=tok, global_batch_size=1, seed=0)
    for frames in (8, 13):  # not 4k+1; 4k+1 but 4 latent frames, which decode to 16
        with pytest.raises(ValueError, match=f"data.frames={frames}: not a frame count the VAE encodes and decodes "
                                             f"exactly.*valid: 1, 9, 17, 25, 33, 41, 49"):
            make_loader(data_cfg(root / "out", frames=frames), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match="has 9 frames; data.frames=17"):
        next(make_loader(data_cfg(root / "out", frames=17), tokenizer=tok, global_batch_size=1, seed=0))


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
