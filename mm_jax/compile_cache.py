"""The persistent compilation cache: compile a program once, reuse it in every later process.

JAX can write each compiled executable to a folder (``jax_compilation_cache_dir``) keyed by the
program, the devices and the compiler version; a later process that lowers the same program reads
it back instead of compiling. ``enable`` turns it on, for every program (no minimum compile time
or size: the small ones add up on a Colab restart too), in:

- ``$MM_JAX_COMPILE_CACHE`` when set (``off`` turns the default off), else ``$XDG_CACHE_HOME/mm_jax/xla`` (``~/.cache/mm_jax/xla``):
  ``DEFAULT``; the CLIs take ``--compile-cache DIR`` (``off`` disables), the trainer
  ``compile_cache`` in its config, the notebook a folder on Google Drive when one is mounted.

Several processes on CPU (``python -m mm_jax.launch``) run without it, with a warning: their gloo
collectives failed to start with executables read from the cache (``enable``).

The planner (``python -m mm_jax.plan``) compiles for devices that are not attached, whose
executables JAX writes to this cache but cannot read back (jax 0.10.2: "PjRtCompiler must be
constructed with a Client to call DeserializeLoadedExecutable"); it keeps what it reads off its
programs in ``<folder>/plan`` instead (``mm_jax.plan.cache``) and does not turn this cache on.

``CompileStats`` counts what this process compiled and what it read from the cache, from JAX's own
monitoring events, so a CLI can say "3 programs, 3 from the cache, 0.4 s" and a test can check it.
"""
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

OFF = ("off", "none", "false", "0")
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax._src.dispatch.BACKEND_COMPILE_EVENT
_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def default_dir() -> Path:
    """``$MM_JAX_COMPILE_CACHE``, else the user's cache folder."""
    if os.environ.get("MM_JAX_COMPILE_CACHE"):
        return Path(os.environ["MM_JAX_COMPILE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mm_jax" / "xla"


def resolve(value: str | None) -> str | None:
    """A ``--compile-cache`` value -> the folder to use, or None for off. Empty/None: the default
    (``$MM_JAX_COMPILE_CACHE``, which may say ``off``)."""
    if value is None or str(value).strip() == "":
        value = os.environ.get("MM_JAX_COMPILE_CACHE", "").strip()
        if value.lower() not in OFF:
            return str(default_dir())
    if str(value).strip().lower() in OFF:
        return None
    return str(value)


def enable(folder: str | None) -> str | None:
    """Turn the cache on in ``folder`` (None: leave it off; ``STATS`` counts compiles either way);
    returns the folder. Must run before the programs to be cached are compiled. URLs (``gs://``)
    are passed to JAX as they are."""
    import jax

    STATS.start()
    if folder is None:
        return None
    if jax.process_count() > 1 and jax.default_backend() == "cpu":
        # Measured with jax 0.10.2: a 2-process CPU run (gloo collectives) whose programs came from
        # the cache failed its first step with "Gloo context initialization failed: DEADLINE_EXCEEDED",
        # every time; the same run compiling passes. TPU and GPU pods keep the cache.
        warnings.warn(f"compile cache {folder} not used: several CPU processes (gloo collectives) fail their "
                      "first collective with executables read from JAX's cache; compiling instead", stacklevel=2)
        return None
    if "://" not in folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process, at its first compile, whether the cache is on: reset that
    # decision so a notebook or library caller that compiled something already gets the cache too.
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    jax_cache.reset_cache()
    return folder


class CompileStats:
    """Programs compiled or read from the persistent cache by this process, and the seconds spent
    getting them (a compile, or a cache read: JAX times both as its backend compile)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._started = False
        self.reset()

    def reset(self) -> None:
        self.hits = self.misses = self.programs = 0
        self.seconds = self.saved_seconds = 0.0

    def _event(self, event: str, **_kw) -> None:
        with self._lock:
            if event == _HIT:
                self.hits += 1
            elif event == _MISS:
                self.misses += 1

    def _duration(self, event: str, duration: float, **_kw) -> None:
        with self._lock:
            if event == _BACKEND_COMPILE:
                self.programs += 1
                self.seconds += duration
            elif event == _SAVED:
                self.saved_seconds += duration

    def start(self) -> None:
        """Listen to JAX's monitoring events (once per process)."""
        if self._started:
            return
        from jax import monitoring

        monitoring.register_event_listener(self._event)
        monitoring.register_event_duration_secs_listener(self._duration)
        self._started = True

    def as_dict(self) -> dict:
        return {"programs": self.programs, "cache_hits": self.hits, "cache_misses": self.misses,
                "compile_s": round(self.seconds, 3), "saved_s": round(self.saved_seconds, 3)}

    def line(self) -> str:
        return (f"compiled {self.programs} program(s) in {self.seconds:.1f} s: {self.hits} from the compile cache, "
                f"{self.misses} compiled and cached")


STATS = CompileStats()
