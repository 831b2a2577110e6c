"""Where a stage's records are: a shard folder of ``python -m mm_jax.data.build`` or a TFDS dataset
of ``python -m mm_jax.data.prepare`` (read with ``tfds.data_source``; ``data.format``: "shards",
"tfds", or a TFDS folder given as ``data.path`` is recognized either way), and the records by
global index (``open_records``): MMR1 bytes from shards, record dicts from typed TFDS features.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def _stage_kinds(stage: str) -> tuple[str, ...]:
    """The image stage reads image and video records (one frame of a clip), the video stage video records."""
    return ("image", "video") if stage == "image" else ("video",)


def shard_paths(folder: str | Path, stage: str) -> list[Path]:
    """The stage's shards (``_stage_kinds``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.path={folder}: no such dataset folder (build one with python -m mm_jax.data.build)")
    kinds = _stage_kinds(stage)
    paths = sorted(p for k in kinds for p in folder.glob(f"{k}-*.array_record"))
    if not paths:
        raise FileNotFoundError(f"data.path={folder}: no {' or '.join(kinds)} ArrayRecord shards "
                                f"({'/'.join(kinds)}-*.array_record) for the {stage} stage; build them with "
                                f"python -m mm_jax.data.build")
    return paths


def find_tfds_dir(path: str | Path) -> Path | None:
    """The TFDS dataset folder (the one with ``dataset_info.json``) at ``path`` or below it
    (``data_dir/name/version`` or ``data_dir/name/config/version``); None when there is none.
    Several datasets below ``path`` are an error that lists them."""
    path = Path(path)
    if (path / "dataset_info.json").exists():
        return path
    found = sorted(p.parent for pat in ("*/dataset_info.json", "*/*/dataset_info.json", "*/*/*/dataset_info.json")
                   for p in path.glob(pat) if not any(part.startswith("incomplete.") for part in p.parts))
    if len(found) > 1:
        raise FileNotFoundError(f"data.path={path}: holds several TFDS datasets {[str(f) for f in found]}; "
                                f"point data.path at one of them")
    return found[0] if found else None


def import_tfds():
    """``tensorflow_datasets``, or an error that says which extra installs it."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"TFDS datasets need tensorflow-datasets and apache-beam ({e}): "
                          f"pip install -e '.[tfds]'") from None
    return tfds


class TfdsRecords:
    """Records by global index over the stage's TFDS splits (``tfds.data_source``, split after
    split): the typed features as a record dict (``mm_jax.data.tfds.features.from_features``), or
    the MMR1 bytes of a dataset of the earlier single ``record`` feature (version 1.0.0). Pickles
    as (folder, splits), so Grain worker processes reopen it."""

    def __init__(self, folder: str | Path, splits: tuple[str, ...]):
        tfds = import_tfds()

        self.folder, self.splits = str(folder), tuple(splits)
        builder = tfds.builder_from_directory(self.folder)
        self._sources = [builder.as_data_source(split=s) for s in self.splits]
        self.sizes = [len(s) for s in self._sources]
        self.starts = [int(x) for x in np.cumsum([0] + self.sizes[:-1])]

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, index: int) -> bytes:
        from mm_jax.data.tfds.features import from_features

        k = int(np.searchsorted(self.starts, index, side="right")) - 1
        example = self._sources[k][index - self.starts[k]]
        return example["record"] if "record" in example else from_features(example)

    def __getstate__(self):
        return {"folder": self.folder, "splits": self.splits}

    def __setstate__(self, state):
        self.__init__(state["folder"], state["splits"])


def locate_records(path: str | Path, stage: str, data_format: str = "shards"):
    """Where the stage's records are, checked without opening them (cheap: the trainer calls it
    before it writes anything): ``("shards", [shard paths])`` or ``("tfds", dataset folder,
    splits)``. ``data_format`` "shards" also accepts a TFDS dataset when the folder holds no
    shards; "tfds" requires one. Errors name the folder and what is missing."""
    if data_format not in ("shards", "tfds"):
        raise ValueError(f"data.format={data_format!r}: must be 'shards' or 'tfds'")
    if not Path(path).is_dir():
        raise FileNotFoundError(f"data.path={path}: no such dataset folder (build one with python -m "
                                f"mm_jax.data.build or python -m mm_jax.data.prepare)")
    tfds_dir = find_tfds_dir(path) if data_format == "tfds" or not list(Path(path).glob("*.array_record")) else None
    if tfds_dir is None and data_format == "tfds":
        raise FileNotFoundError(f"data.path={path}: no TFDS dataset (dataset_info.json) in or below it; build one "
                                f"with python -m mm_jax.data.prepare")
    if tfds_dir is None:
        return "shards", shard_paths(path, stage)
    import json

    try:
        present = json.loads((tfds_dir / "dataset_info.json").read_text()).get("splits", [])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"data.path={path}: {tfds_dir / 'dataset_info.json'} is not valid JSON ({e})") from None
    splits = tuple(k for k in _stage_kinds(stage) if any(s.get("name") == k for s in present))
    if not splits:
        raise FileNotFoundError(f"data.path={path}: the TFDS dataset {tfds_dir} has no {' or '.join(_stage_kinds(stage))} "
                                f"split for the {stage} stage")
    return "tfds", tfds_dir, splits


def open_records(path: str | Path, stage: str, data_format: str = "shards"):
    """-> (source: index -> record bytes, names, starts): the stage's records from a shard folder or
    a TFDS dataset (``locate_records``), with each shard's or split's name and first global index
    (for error messages)."""
    found = locate_records(path, stage, data_format)
    if found[0] == "shards":
        import grain

        paths = found[1]
        sizes = [len(grain.sources.ArrayRecordDataSource([str(p)])) for p in paths]
        starts = tuple(int(x) for x in np.cumsum([0] + sizes[:-1]))
        return grain.sources.ArrayRecordDataSource([str(p) for p in paths]), tuple(p.name for p in paths), starts
    _, tfds_dir, splits = found
    source = TfdsRecords(tfds_dir, splits)
    return source, tuple(f"split {s} of {tfds_dir}" for s in splits), tuple(source.starts)
