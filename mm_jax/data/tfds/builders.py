"""TFDS builders: one per source layout (``mm_jax.data.layouts``), all writing the same examples.

Splits: ``image`` (still images) and ``video`` (clips), whichever the source has; the image stage
trains on both (one face frame of a clip), the video stage on ``video``. Example features: typed,
one per record field (``mm_jax.data.tfds.features``: the frames and the reference face as JPEG
images, boxes, landmarks and embeddings as tensors, source and caption as text), so the usual TFDS
tools can inspect a dataset.

The build settings, the counters (records, skips by reason, caption checks) and the record format
go into the dataset's ``metadata.json``. Build with ``python -m mm_jax.data.prepare``; the builders
read local files only, nothing is downloaded.
"""
from __future__ import annotations

import tensorflow_datasets as tfds

from mm_jax.data import layouts
from mm_jax.data.example import ExampleOptions
from mm_jax.data.records import MAGIC
from mm_jax.data.sources import BuildError
from mm_jax.data.tfds.features import features

RECORD_FORMAT = f"{MAGIC.decode()} fields as typed TFDS features (mm_jax.data.tfds.features)"


def build_settings(options: ExampleOptions, precompute=None) -> dict:
    """What decides a dataset's content (its metadata's ``settings``): a rebuild with other
    settings is refused unless asked for."""
    return {**options.settings(), "precompute": None if precompute is None else precompute.record_settings()}


class RecordsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders: ``LAYOUT`` lists the items; Beam makes the records."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {"1.0.0": "Records in mm_jax.data.records format MMR1 (JSON header + raw blobs).",
                     "2.0.0": "Typed features, one per record field (mm_jax.data.tfds.features)."}
    LAYOUT: type[layouts.Layout] = layouts.Layout

    def __init__(self, *, src: str | None = None, options: ExampleOptions | None = None,
                 layout_options: dict | None = None, progress_dir: str | None = None, precompute=None,
                 **kwargs):
        self._src, self._options, self._precompute = src, options, precompute
        self._layout_options, self._progress_dir = dict(layout_options or {}), progress_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self, description=f"Magic Mirror training records from a {self.LAYOUT.name} source.",
            features=features(precomputed=self._precompute is not None),
            metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager, pipeline):
        from mm_jax.data.tfds.pipeline import build_splits

        if self._src is None or self._options is None:
            raise BuildError(f"{self.name}: building needs src and options; use python -m mm_jax.data.prepare")
        layout = self.LAYOUT(**self._layout_options)
        units = layout.units(self._src)
        kinds = layout.kinds(units)
        if self._precompute is not None:  # a precomputing build writes the stage's kinds only
            kinds = tuple(k for k in kinds if k in self._precompute.kinds())
        if not units or not kinds:
            raise BuildError(f"--src {self._src}: nothing to build ({layout.name} layout)")
        total = layout.count(units) if self._progress_dir else None
        if total is not None:  # the progress bar's total (``prepare._Progress`` reads it)
            with open(f"{self._progress_dir}.total", "w") as f:
                f.write(str(total))
        self.info.metadata.update({"record_format": RECORD_FORMAT, "layout": layout.name, "src": str(self._src),
                                   "layout_options": self._layout_options,
                                   "settings": build_settings(self._options, self._precompute)})
        return build_splits(pipeline, layout, units, kinds, self._options, str(self.data_path / "skipped"),
                            self._progress_dir, self._precompute, str(self.data_path / "null_text.npy"))

    def _generate_examples(self):
        raise NotImplementedError("the splits are Beam PCollections made in _split_generators")

    def _process_pipeline_result(self, pipeline_result) -> None:
        from apache_beam.metrics.metric import MetricsFilter

        from mm_jax.data.tfds.pipeline import NAMESPACE

        counters: dict[str, int] = {}
        for r in pipeline_result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))["counters"]:
            value = r.committed if r.committed is not None else r.attempted
            counters[r.key.metric.name] = counters.get(r.key.metric.name, 0) + int(value or 0)
        self.info.metadata["counters"] = dict(sorted(counters.items()))


class MmFacesManifest(RecordsBuilder):
    LAYOUT = layouts.Manifest


class MmLaionFace(RecordsBuilder):
    LAYOUT = layouts.LaionFace


class MmSfhq(RecordsBuilder):
    LAYOUT = layouts.Sfhq


class MmClipsCsv(RecordsBuilder):
    LAYOUT = layouts.ClipsCsv


class MmConsisid(RecordsBuilder):
    LAYOUT = layouts.Consisid


class MmOpens2v(RecordsBuilder):
    LAYOUT = layouts.Opens2v


BUILDERS = {c.name: c for c in (MmFacesManifest, MmLaionFace, MmSfhq, MmClipsCsv, MmConsisid, MmOpens2v)}
