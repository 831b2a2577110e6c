"""Grain loaders for both training stages: ArrayRecord shards -> this process's rows of each global batch.

Records come from the shard folder of ``python -m mm_jax.data.build`` or from a TFDS dataset of
``python -m mm_jax.data.prepare`` (``mm_jax.data.record_sources``); each becomes an example in
``mm_jax.data.transform``. One global example stream, the
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

import warnings
from pathlib import Path

import numpy as np

from mm_jax.data.record_sources import locate_records, open_records
from mm_jax.data.records import DEFAULT_REF_SIZE
from mm_jax.data.transform import ExampleTransform
from mm_jax.frame_counts import check_frames


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
