"""Grain loaders for both training stages: ArrayRecord shards -> this process's rows of each global batch.

Records come from the shard folder of ``python -m mm_jax.data.build`` or from a TFDS dataset of
``python -m mm_jax.data.prepare`` (read with ``tfds.data_source``; ``data.format``: "shards", "tfds",
or a TFDS folder given as ``data.path`` is recognized either way). One global example stream, the
same whatever the number of processes (``grain.MapDataset``): records -> seeded shuffle, reshuffled
each epoch -> repeat -> ``random_map`` (decode, frame sampling, resize + centre crop, face mask,
tokenization, condition dropout; the example at global position k draws its randomness from
(seed, k) only). Global batch b holds positions [b*G, (b+1)*G); a process loads only its ``rows``
(start, stop) of each (those its devices hold) -> batch -> ``mp_prefetch`` worker processes when
``num_workers > 0``. The same seed gives the same batches, with or without workers, on any number
of processes, and the state (the next global batch) restores on any number of processes.

Batch (this process's rows, leading dim B = stop - start; G / process count by default):
  pixels (B, F, H, W, 3) float32 in [-1, 1]   (or, when ``precomputed``, the VAE posterior's
                                              latents (mean) and latents_std (B, f, h, w, C), x scaling)
  face_mask (B, F, H, W) float32               1 inside the frame's face box
  input_ids (B, L) int32                      (or text_embeddings (B, L, T) when ``precomputed``)
  class_index (B,) int32                      first token of the class word, -1: caption dropped / none
  e_id (B, 512) float32, ref_pixels (B, S, S, 3) float32 (CLIP-normalized; S = ``ref_size``, the image
                                              encoder's image_size), has_id (B,) bool
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mm_jax.data.records import DEFAULT_REF_SIZE, decode_record
from mm_jax.frame_counts import check_frames


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


def precomputed_frames(frames: int, frame_stride: int) -> list[int]:
    """The frames of a clip that ``--precompute`` encodes and the loader's precomputed path masks:
    ``frames`` frames from frame 0 at ``frame_stride``."""
    return list(range(0, (frames - 1) * frame_stride + 1, frame_stride))


def _decode_jpeg(b) -> np.ndarray:
    """JPEG bytes -> RGB uint8; an array (a frame TFDS decoded already) passes as it is."""
    import cv2

    if isinstance(b, np.ndarray):
        return b
    img = cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("undecodable JPEG")
    return img[..., ::-1]


def _cover_crop(h: int, w: int, out_h: int, out_w: int) -> tuple[float, int, int, int, int]:
    """Scale to cover (out_h, out_w) then centre-crop: -> (scale, resized h, resized w, top, left)."""
    s = max(out_h / h, out_w / w)
    rh, rw = max(out_h, int(round(h * s))), max(out_w, int(round(w * s)))
    return s, rh, rw, (rh - out_h) // 2, (rw - out_w) // 2


@dataclasses.dataclass
class ExampleTransform:
    """Record bytes + rng -> one example dict (the batch contract, without the batch axis)."""
    height: int
    width: int
    frames: int
    frame_stride: int
    max_text_length: int
    drops: tuple[float, float, float]
    class_words: tuple[str, ...]
    tokenizer: Any
    precomputed: bool
    null_text: np.ndarray | None
    source_names: tuple[str, ...]
    source_starts: tuple[int, ...]  # global index of each shard's first record
    ref_size: int = DEFAULT_REF_SIZE  # the image encoder's image_size: ref_pixels are (ref_size, ref_size)

    def where(self, index: int) -> str:
        k = int(np.searchsorted(self.source_starts, index, side="right")) - 1
        name = self.source_names[k]
        return f"{name if name.startswith('split ') else 'shard ' + name}, record {index - self.source_starts[k]}"

    def _tok(self):
        if isinstance(self.tokenizer, (str, Path)):
            from mm_jax.text import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer)
        return self.tokenizer

    def _check_precomputed(self, r: dict, index: int) -> None:
        """The record's latents are of the frames and size this config reads, or a ValueError that names
        the field, the record's value and the config's."""
        pre = r.get("precomputed")
        rebuild = (f"rebuild with python -m mm_jax.data.build --precompute --frames {self.frames} --frame-stride "
                   f"{self.frame_stride} --height {self.height} --width {self.width}")
        if not isinstance(pre, dict) or "latents" not in r:
            raise ValueError(f"{self.where(index)}: no precomputed latents (data.precomputed=True); {rebuild}")
        for field, want in (("frames", self.frames), ("frame_stride", self.frame_stride), ("height", self.height),
                            ("width", self.width)):
            if pre.get(field) != want:
                raise ValueError(f"{self.where(index)}: latents precomputed with {field}={pre.get(field)}, but "
                                 f"data.{field}={want}; set data.{field}={pre.get(field)} or {rebuild}")
        picks = precomputed_frames(self.frames, self.frame_stride)
        if pre.get("frame_indices") != picks:
            raise ValueError(f"{self.where(index)}: latents precomputed from frames {pre.get('frame_indices')}, but "
                             f"the loader masks frames {picks}; {rebuild}")

    def __call__(self, item, rng: np.random.Generator) -> dict[str, np.ndarray]:
        index, data = item  # MMR1 bytes (shards) or the record's fields (typed TFDS features)
        r = data if isinstance(data, dict) else decode_record(data, self.where(index))
        n = len(r["frames"])
        span = (self.frames - 1) * self.frame_stride + 1
        found = np.asarray(r["face_found"], bool)
        if self.precomputed:
            self._check_precomputed(r, index)
            start = 0  # the latents were computed from these frames (precomputed_frames), centre crop
        elif self.frames == 1:
            faces = np.flatnonzero(found)
            start = int(rng.choice(faces)) if len(faces) else int(rng.integers(n))
        else:
            if n < span:
                raise ValueError(f"{self.where(index)} ({r.get('source')}) has {n} frames; data.frames={self.frames} at "
                                 f"stride {self.frame_stride} needs {span}: lower them or rebuild with longer clips")
            start = int(rng.integers(n - span + 1))
        picks = list(range(start, start + span, self.frame_stride))[:self.frames]
        s, rh, rw, top, left = _cover_crop(r["height"], r["width"], self.height, self.width)
        out: dict[str, np.ndarray] = {}
        if not self.precomputed:
            import cv2

            video = np.stack([cv2.resize(_decode_jpeg(r["frames"][i]), (rw, rh), interpolation=cv2.INTER_AREA)
                              [top:top + self.height, left:left + self.width] for i in picks])
            out["pixels"] = (video.astype(np.float32) / 127.5 - 1.0)
        mask = np.zeros((len(picks), self.height, self.width), np.float32)
        for k, i in enumerate(picks):
            if found[i]:
                x1, y1, x2, y2 = r["boxes"][i] * s - np.array([left, top, left, top])
                y1, y2 = int(np.clip(np.floor(y1), 0, self.height)), int(np.clip(np.ceil(y2), 0, self.height))
                x1, x2 = int(np.clip(np.floor(x1), 0, self.width)), int(np.clip(np.ceil(x2), 0, self.width))
                mask[k, y1:y2, x1:x2] = 1.0
        out["face_mask"] = mask
        # condition dropout: one draw, disjoint ranges for text / ID / both
        u = rng.random()
        d_text, d_id, d_both = self.drops
        drop_text = u < d_text or d_text + d_id <= u < d_text + d_id + d_both
        drop_id = d_text <= u < d_text + d_id + d_both
        caption = "" if drop_text else r["caption"]
        from mm_jax.text import tokenize

        tok = self._tok()
        ids = tokenize(tok, [caption], max_length=self.max_text_length)[0].astype(np.int32)
        class_index = -1
        if not drop_text:
            from mm_jax.text import find_class_token

            try:
                class_index = find_class_token(tok, caption, ids, self.class_words)
            except ValueError:
                warnings.warn(f"{self.where(index)}: no class word in {caption!r}; trained without the ID fusion",
                              stacklevel=2)
        if self.precomputed:
            out["latents"] = np.asarray(r["latents"], np.float32)
            out["latents_std"] = np.asarray(r["latents_std"], np.float32)
            out["text_embeddings"] = np.asarray(self.null_text if drop_text else r["text_embedding"], np.float32)
        else:
            out["input_ids"] = ids
        out["class_index"] = np.int32(class_index)
        from mm_jax.face import CLIP_MEAN, CLIP_STD

        ref = _decode_jpeg(r["ref_crop"])
        size = self.ref_size
        if ref.shape[:2] != (size, size):  # the same aligned crop at another scale (it scales with its size)
            import cv2

            if ref.shape[0] < size:
                warnings.warn(f"{self.where(index)}: reference crop of {ref.shape[0]} px upsampled to the image "
                              f"encoder's {size}; rebuild with --ref-size {size} for full detail", stacklevel=2)
            ref = cv2.resize(ref, (size, size), interpolation=cv2.INTER_AREA if ref.shape[0] > size
                             else cv2.INTER_CUBIC)
        out["ref_pixels"] = ((ref.astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)
        out["e_id"] = np.asarray(r["ref_embedding"], np.float32)
        out["has_id"] = np.bool_(not drop_id)
        return out


class _PickRows:
    """Row index i -> the example at global position ``(first + i // R) * G + r0 + i % R`` of the
    global stream (R = r1 - r0 rows of each global batch of G, from global batch ``first`` on)."""

    def __init__(self, stream, global_batch: int, rows: tuple[int, int], first: int):
        self.stream, self.global_batch, self.rows, self.first = stream, global_batch, rows, first

    def __call__(self, i) -> dict[str, np.ndarray]:
        b, j = divmod(int(i), self.rows[1] - self.rows[0])
        return self.stream[(self.first + b) * self.global_batch + self.rows[0] + j]


class Loader:
    """``next(loader)`` -> this process's rows of the next global batch; ``get_state()`` /
    ``set_state()`` for checkpoints: ``{"global_batch": b, "global_batch_size": G}`` (b: the next
    global batch), the same on every process and for any process count."""

    def __init__(self, build, *, first_batch: int, global_batch: int, rows: tuple[int, int], num_records: int):
        self._build = build  # first global batch -> Grain IterDataset of this process's rows
        self.global_batch = global_batch
        self.rows = rows
        self.num_records = num_records
        self.batch_size = rows[1] - rows[0]
        self._start(first_batch)

    def _start(self, first_batch: int) -> None:
        self._next_batch = first_batch
        self._ds = self._build(first_batch)
        self._it = iter(self._ds)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._next_batch += 1
        return batch

    def get_state(self) -> dict:
        return {"global_batch": self._next_batch, "global_batch_size": self.global_batch}

    def set_state(self, state: dict) -> None:
        """Restart the stream at ``state["global_batch"]``. A state of the earlier per-process loader
        (Grain's iterator state) resumes at the global batch its batch count names, with a warning:
        that loader's per-process streams cannot be continued exactly."""
        if "global_batch" in state:
            saved = int(state.get("global_batch_size", self.global_batch))
            if saved != self.global_batch:
                raise ValueError(f"data state: saved with global batch {saved}, this run's is {self.global_batch}: "
                                 f"batch {state['global_batch']} would name other examples; resume with "
                                 f"train.global_batch_size={saved}")
            first = int(state["global_batch"])
        else:
            first = _batches_in_old_state(state)
            warnings.warn(f"data state {state} comes from the per-process loader of an earlier mm_jax; its streams "
                          f"cannot be continued exactly: resuming at global batch {first} of the global stream "
                          f"(the batch count it had reached)", stacklevel=2)
        if first < 0:
            raise ValueError(f"data state: global_batch={first} must be >= 0")
        self._stop_iterator()
        self._start(first)

    def _stop_iterator(self) -> None:
        close = getattr(self._it, "close", None)
        if close:
            close()

    def close(self) -> None:
        """Stop worker processes and release prefetched shared-memory batches now, not at interpreter
        exit (where Grain's finalizers find half-torn-down modules)."""
        import gc

        if self._it is not None:
            self._stop_iterator()
        self._it = self._ds = None
        gc.collect()
        _drain_shared_memory_deletes()


def _batches_in_old_state(state: dict) -> int:
    """The number of batches a Grain iterator state of the earlier loader had read: ``next_index``
    without workers, the sum over the workers' ``next_index`` with ``mp_prefetch``."""
    if isinstance(state.get("next_index"), int):
        return state["next_index"]
    workers = state.get("iterators_in_use_states")
    if isinstance(workers, list) and workers and all(isinstance(w, dict) and isinstance(w.get("next_index"), int)
                                                     for w in workers):
        return sum(w["next_index"] for w in workers)
    raise ValueError(f"data state {state}: neither this loader's ({{'global_batch': b, 'global_batch_size': G}}) nor "
                     f"a Grain iterator state of the earlier loader; cannot resume the data stream from it")


# Grain API this module uses beyond the public one, pinned with grain==0.2.18 in pyproject.toml and
# checked by tests/test_data.py (test_the_private_grain_members_the_loader_drains_exist): Grain has no
# public way to wait for the shared-memory unlinks it queues, so ``Loader.close`` reaches the
# class's thread pool (``_del_thread_pool``) and its test hook ``_disable_async_del``. The class
# itself is public (``grain.multiprocessing.SharedMemoryArray``).
GRAIN_PRIVATE_MEMBERS = ("_del_thread_pool", "_disable_async_del")


def _drain_shared_memory_deletes() -> None:
    """Finish the shared-memory unlinks that Grain queues on a thread pool when a prefetched batch is
    freed; left pending at exit, they are what the resource tracker reports as leaked. Later frees
    unlink synchronously (a new ``mp_prefetch`` turns the pool on again)."""
    from grain.multiprocessing import SharedMemoryArray

    pool = getattr(SharedMemoryArray, "_del_thread_pool", None)
    if pool is None:
        return
    SharedMemoryArray._disable_async_del()
    pool.close()
    pool.join()


def default_rows(global_batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """The default rows of process p of P: ``[p * G / P, (p + 1) * G / P)``."""
    if global_batch_size % process_count:
        raise ValueError(f"global batch {global_batch_size} is not a multiple of the {process_count} processes")
    per = global_batch_size // process_count
    return process_index * per, (process_index + 1) * per


def _ignore_preemption_signals(_worker_index: int, _worker_count: int) -> None:
    """Grain worker processes ignore SIGTERM/SIGUSR1: a cluster's preemption notice (SLURM's
    ``--signal=USR1@90`` reaches the whole process group) is the trainer's to handle, which saves a
    checkpoint while the workers keep its batches coming; Grain stops its workers with SIGKILL.
    On Linux they also get SIGKILL when the trainer dies (``PR_SET_PDEATHSIG``): after a kill -9 of
    the trainer they were left running, orphaned, holding their memory."""
    import ctypes
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: orphans stay possible after a kill -9
        pass


def make_loader(data_cfg, *, tokenizer, global_batch_size: int, seed: int, process_index: int | None = None,
                process_count: int | None = None, rows: tuple[int, int] | None = None,
                ref_size: int = DEFAULT_REF_SIZE) -> Loader:
    """The stage's loader (see the module docstring). ``tokenizer``: a tokenizer or its folder.
    ``rows``: (start, stop), the rows of each global batch this process loads (those its devices
    hold; processes whose devices replicate the batch pass the same rows); by default process p of
    P (``process_index``/``process_count``, else JAX's) takes ``default_rows``. ``ref_size``: the
    image encoder's ``image_size`` (the trainer passes its loaded encoder's); ``ref_pixels`` are
    that size."""
    import grain

    check_frames(data_cfg.stage, int(data_cfg.frames))
    g = int(global_batch_size)
    if g < 1:
        raise ValueError(f"global batch {g}: must be positive")
    if rows is None:
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        rows = default_rows(g, process_index, process_count)
    rows = (int(rows[0]), int(rows[1]))
    if not 0 <= rows[0] < rows[1] <= g:
        raise ValueError(f"rows={rows}: must be (start, stop) with 0 <= start < stop <= the global batch {g}")
    source, names, starts = open_records(data_cfg.path, data_cfg.stage, data_cfg.get("format", "shards"))
    n = len(source)
    if n == 0:
        raise FileNotFoundError(f"data.path={data_cfg.path}: the shards hold no records")
    epochs = data_cfg.num_epochs
    if epochs is not None and n * int(epochs) < g:
        raise ValueError(f"data.path={data_cfg.path}: {n} records x data.num_epochs={epochs} is less than one "
                         f"global batch of {g}")
    null_text = None
    if data_cfg.precomputed:  # beside the shards, or in the TFDS dataset's folder
        found = locate_records(data_cfg.path, data_cfg.stage, data_cfg.get("format", "shards"))
        null_path = (Path(data_cfg.path) if found[0] == "shards" else Path(found[1])) / "null_text.npy"
        if not null_path.exists():
            raise FileNotFoundError(f"data.precomputed=True but {null_path} is missing: build with --precompute")
        null_text = np.load(null_path)
    transform = ExampleTransform(int(data_cfg.height), int(data_cfg.width), int(data_cfg.frames),
                                 int(data_cfg.frame_stride), int(data_cfg.max_text_length),
                                 (float(data_cfg.drop_text), float(data_cfg.drop_id), float(data_cfg.drop_both)),
                                 tuple(data_cfg.class_words), tokenizer, bool(data_cfg.precomputed), null_text,
                                 names, starts, int(ref_size))
    # the global stream: position k holds record order[k]; its randomness depends on (seed, k) only
    stream = grain.MapDataset.range(n)
    if data_cfg.shuffle:
        stream = stream.shuffle(seed=seed)  # reshuffled each epoch (Grain seeds epoch e with seed + e)
    stream = stream.repeat(epochs).map(lambda i: (int(i), source[int(i)])).random_map(transform, seed=seed)
    num_batches = len(stream) // g  # sys.maxsize // g when repeated forever
    per = rows[1] - rows[0]
    workers = int(data_cfg.num_workers)

    def build(first: int):
        ds = grain.MapDataset.range(max(num_batches - first, 0) * per).map(_PickRows(stream, g, rows, first))
        it_ds = ds.batch(per, drop_remainder=True).to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                                                    prefetch_buffer_size=0))
        if workers > 0:
            from absl import flags

            if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags
                flags.FLAGS.mark_as_parsed()
            it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                                  per_worker_buffer_size=int(data_cfg.prefetch_buffer)),
                                      worker_init_fn=_ignore_preemption_signals)
        return it_ds

    return Loader(build, first_batch=0, global_batch=g, rows=rows, num_records=n)
