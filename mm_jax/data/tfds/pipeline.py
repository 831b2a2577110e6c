"""The Beam pipeline of a build: units -> item references -> deduplicated -> media read -> records.

    units | ExpandUnit (layout.items on the workers: references, no media bytes) | GroupByKey on
    the item key (drops duplicates, spreads the work; only references are shuffled) | for a
    layout with containers (LAION-Face parquet rows / tar members): GroupByKey on the container
    and ReadMedia (layout.read: the container opened once, only the kept items' bytes read) |
    MakeRecords (ExampleMaker: faces, reference, cosine filter; face models loaded once per
    worker process in DoFn.setup) | Partition by kind -> one PCollection per split

Counters (Beam metrics, namespace "mm_jax"): records/<kind>, skipped/<reason> (an unexpected
error counts as skipped/error), skipped/unreadable_file (a container or listing file that could
not be read; what was read before the error is kept), skipped/duplicate, and the caption checks
captions/without_class_word, captions/rewritten/<rule>, captions/dropped. Each skipped item is
also written to ``skipped-*.jsonl`` ({"path", "reason"}) beside the dataset.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from mm_jax.data.example import ExampleMaker, ExampleOptions
from mm_jax.data.sources import item_key, item_kind, source_name
from mm_jax.data.tfds.features import to_features

NAMESPACE = "mm_jax"
SKIPPED = "skipped"
_MAKERS = Shared()  # one ExampleMaker (and so one set of face models) per worker process
_ENCODERS = Shared()  # one set of frozen encoders (VAE, T5) per worker process, with --precompute


def _count(name: str, n: int = 1) -> None:
    Metrics.counter(NAMESPACE, name).inc(n)


class ExpandUnit(beam.DoFn):
    """unit -> (key, item) for each item of the unit; an unreadable file is counted and logged."""

    def __init__(self, layout):
        self.layout = layout

    def process(self, unit: dict):
        try:
            for item in self.layout.items(unit):
                yield item_key(item), item
        except Exception as e:  # a corrupt container or listing file: the other files go on
            _count("skipped/unreadable_file")
            where = next((str(v) for k, v in unit.items() if k in ("parquet", "tar", "csv", "json", "root")), "?")
            yield beam.pvalue.TaggedOutput(SKIPPED, {"path": where, "reason": f"unreadable_file: {type(e).__name__}: {e}"})


def _has_bytes(v) -> bool:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return True
    if isinstance(v, dict):
        return any(_has_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_has_bytes(x) for x in v)
    return False


def check_reference(kv):
    """The shuffle before the media is read carries references only: media bytes there are a bug
    (a layout's ``items`` that read the media instead of referencing it)."""
    if _has_bytes(kv[1]):
        raise ValueError(f"{kv[0]}: an item reference holds bytes before deduplication; layouts yield references "
                         f"and read media in Layout.read")
    return kv


class ReadMedia(beam.DoFn):
    """(container, [(key, ref)]) -> (key, item with its media bytes), the container read once;
    an unreadable container skips its items as unreadable_file."""

    def __init__(self, layout):
        self.layout = layout

    def process(self, container_refs):
        container, pairs = container_refs
        pairs = sorted(pairs, key=lambda kv: kv[0])  # a stable order within the container
        try:
            items = list(self.layout.read([ref for _, ref in pairs]))
        except Exception as e:
            for _, ref in pairs:
                _count("skipped/unreadable_file")
                yield beam.pvalue.TaggedOutput(SKIPPED, {"path": source_name(ref),
                                                         "reason": f"unreadable_file: {type(e).__name__}: {e}"})
            return
        for (key, _), item in zip(pairs, items):
            yield key, item


def first_of_key(kv):
    """(key, [items]) -> (key, item): the same source listed twice is built once."""
    key, items = kv
    items = list(items)
    if len(items) > 1:
        _count("skipped/duplicate", len(items) - 1)
    return key, items[0]


class MakeRecords(beam.DoFn):
    """(key, item) -> (kind, (key, example)); skips go to the SKIPPED output as {"path", "reason"}.
    ``progress_dir``: a local folder where each instance appends one byte per item (the DirectRunner
    progress bar of ``mm_jax.data.prepare`` counts them)."""

    def __init__(self, options: ExampleOptions, progress_dir: str | None = None):
        self.options = options
        self.progress_dir = progress_dir

    def setup(self):
        tag = hashlib.sha1(repr(self.options).encode()).hexdigest()
        self._maker = _MAKERS.acquire(lambda: _loaded(ExampleMaker(self.options)), tag=tag)
        self._progress = None
        if self.progress_dir:
            self._progress = open(Path(self.progress_dir) / f"{os.getpid()}-{id(self)}", "ab", buffering=0)

    def teardown(self):
        if getattr(self, "_progress", None):
            self._progress.close()

    def process(self, key_item):
        key, item = key_item
        o = self._maker(item)
        if not o.caption.had_class_word:
            _count("captions/without_class_word")
            _count(f"captions/rewritten/{o.caption.rule}" if o.caption.rule else "captions/dropped")
        if self._progress:
            self._progress.write(b".")
        if o.status == "ok":
            _count(f"records/{o.kind}")
            yield o.kind, (key, o.example)
        else:
            _count("skipped/" + (o.reason if not o.reason.startswith("error") else "error"))
            yield beam.pvalue.TaggedOutput(SKIPPED, {"path": source_name(item), "reason": o.reason})


class Precompute(beam.DoFn):
    """(kind, (key, record)) -> the same with the frozen encoders' outputs (``precompute.Encoders``,
    loaded once per worker process), the step ``--precompute`` adds after the records are made."""

    def __init__(self, settings):
        self.settings = settings

    def setup(self):
        from mm_jax.data.precompute import Encoders

        tag = hashlib.sha1(repr(self.settings).encode()).hexdigest()
        self._encoders = _ENCODERS.acquire(lambda: Encoders(self.settings), tag=tag)

    def process(self, kind_record):
        kind, (key, record) = kind_record
        yield kind, (key, self._encoders(record))


class WriteNullText(beam.DoFn):
    """path -> ``null_text.npy`` there: the empty prompt's T5 embedding (caption dropout)."""

    def __init__(self, settings):
        self.settings = settings

    def process(self, path: str):
        import io

        import numpy as np
        from etils import epath

        from mm_jax.data.precompute import Encoders

        tag = hashlib.sha1(repr(self.settings).encode()).hexdigest()
        buf = io.BytesIO()
        np.save(buf, _ENCODERS.acquire(lambda: Encoders(self.settings), tag=tag).null_text())
        epath.Path(path).write_bytes(buf.getvalue())
        yield path


def _loaded(maker: ExampleMaker) -> ExampleMaker:
    maker.analyzer()  # load the face models now, once per process, not on the first item
    return maker


def unique_items(pipeline, layout, units: list[dict]):
    """-> (refs, items, skipped): ``refs`` the (key, reference) pairs that the deduplicating shuffle
    takes (no media bytes: ``check_reference``), ``items`` the (key, item) pairs that survive it,
    with their media read (``ReadMedia``) where the layout has containers, and the PCollections of
    skipped entries."""
    expanded = (pipeline | "Units" >> beam.Create(units) | "Reshuffle units" >> beam.Reshuffle()
                | "Expand" >> beam.ParDo(ExpandUnit(layout)).with_outputs(SKIPPED, main="items"))
    refs = expanded.items | "References only" >> beam.Map(check_reference)
    unique = refs | "Deduplicate" >> beam.GroupByKey() | "First" >> beam.Map(first_of_key)
    skipped = [expanded[SKIPPED]]
    if layout.READS_CONTAINERS:
        own, inside = unique | "Own file or container" >> beam.Partition(
            lambda kv, n: int(layout.container(kv[1]) is not None), 2)
        read = (inside | "By container" >> beam.Map(lambda kv: (layout.container(kv[1]), kv))
                | "Group by container" >> beam.GroupByKey()
                | "Read media" >> beam.ParDo(ReadMedia(layout)).with_outputs(SKIPPED, main="items"))
        unique = (own, read.items) | "With media" >> beam.Flatten()
        skipped.append(read[SKIPPED])
    return refs, unique, skipped


def build_splits(pipeline, layout, units: list[dict], kinds: tuple[str, ...], options: ExampleOptions,
                 skipped_path: str, progress_dir: str | None = None, precompute=None,
                 null_text_path: str | None = None) -> dict:
    """The split PCollections {kind: (key, example)} for ``GeneratorBasedBuilder._split_generators``;
    also writes the skipped items to ``skipped_path``-*.jsonl. ``precompute``: the
    ``PrecomputeSettings`` of a precomputing build (records of its kinds only; the null text
    embedding goes to ``null_text_path``)."""
    _, unique, skipped = unique_items(pipeline, layout, units)
    if precompute is not None:
        unique, other = unique | "Kinds built" >> beam.Partition(
            lambda kv, n: int(item_kind(kv[1]) not in kinds), 2)
        skipped.append(other | "Other kinds" >> beam.Map(_other_kind))
        (pipeline | "Null text path" >> beam.Create([null_text_path])
         | "Null text" >> beam.ParDo(WriteNullText(precompute)))
    made = unique | "Make records" >> beam.ParDo(MakeRecords(options, progress_dir)).with_outputs(SKIPPED, main="made")
    records = made.made
    if precompute is not None:
        records = records | "Precompute" >> beam.ParDo(Precompute(precompute))
    (tuple(skipped + [made[SKIPPED]]) | "Skipped" >> beam.Flatten() | "To JSON" >> beam.Map(json.dumps)
     | "Write skipped" >> beam.io.WriteToText(skipped_path, file_name_suffix=".jsonl"))
    parts = records | "By kind" >> beam.Partition(lambda kv, n: kinds.index(kv[0]), len(kinds))
    return {k: parts[i] | f"Examples {k}" >> beam.Map(lambda kv: (kv[1][0], to_features(kv[1][1])))
            for i, k in enumerate(kinds)}


def _other_kind(key_item) -> dict:
    """An item of a kind the precomputing build does not write (image items for a clip precompute)."""
    _count("skipped/other_kind")
    return {"path": source_name(key_item[1]), "reason": "other_kind"}
