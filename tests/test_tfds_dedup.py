"""The Beam build drops duplicate items before any media is read: the deduplicating shuffle carries
references (a parquet row, a tar member's offset), and the bytes are read after it, one container
at a time (mm_jax/data/tfds/pipeline.py ``unique_items``)."""
import io
import tarfile

import numpy as np
import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamPipeline
from apache_beam.testing.util import assert_that, equal_to

from mm_jax.data.layouts import LaionFace
from mm_jax.data.tfds.pipeline import NAMESPACE, _has_bytes, check_reference, unique_items


def _blob(i: int) -> bytes:
    return bytes(np.random.default_rng(i).integers(0, 256, 64 + i, dtype=np.uint8))


@pytest.fixture(scope="module")
def laion(tmp_path_factory):
    """A parquet whose key 000 is listed twice, and a tar whose member 002.png comes twice."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("dedup")
    pq.write_table(pa.table({"key": ["000", "001", "000"], "caption": ["a man", "a woman", "a man"],
                             "jpg": [_blob(0), _blob(1), _blob(0)]}), root / "00000.parquet")
    with tarfile.open(root / "00001.tar", "w") as tar:
        for name, data in (("002.png", _blob(2)), ("002.txt", b"a girl"), ("003.png", _blob(3)),
                           ("003.txt", b"a boy"), ("002.png", _blob(2)), ("002.txt", b"a girl")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return root


def test_duplicates_are_dropped_before_the_media_bytes_are_read(laion):
    layout = LaionFace()
    p = BeamPipeline()
    refs, items, _ = unique_items(p, layout, layout.units(laion))
    assert_that(refs | "Bytes in refs" >> beam.Map(lambda kv: _has_bytes(kv[1])), equal_to([False] * 6),
                label="the shuffle carries no bytes")
    assert_that(items | "Members" >> beam.Map(lambda kv: (kv[1]["member"], kv[1]["data"])),
                equal_to([("000.jpg", _blob(0)), ("001.jpg", _blob(1)), ("002.png", _blob(2)), ("003.png", _blob(3))]),
                label="each item once, with its bytes")
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]
    assert {c.key.metric.name: c.committed for c in counters} == {"skipped/duplicate": 2}


def test_a_reference_holding_bytes_is_refused_before_the_shuffle():
    assert check_reference(("k", {"path": "a.tar", "offset": 512, "size": 10})) == ("k", {"path": "a.tar",
                                                                                          "offset": 512, "size": 10})
    with pytest.raises(ValueError, match="k: an item reference holds bytes before deduplication"):
        check_reference(("k", {"path": "a.parquet", "data": b"\xff\xd8"}))
