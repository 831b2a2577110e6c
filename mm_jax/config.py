"""The one config loader: ``path/to/file.py[:preset]`` plus ``--config.a.b=value`` overrides.

Every config file defines ``get_config(preset: str | None = None) -> ConfigDict``. Overrides are
parsed by ``ml_collections.config_flags`` against the type of the field they set (an int field
takes ``7``, not ``abc``; a tuple field takes ``"('a', 'b')"``; a bool field takes
``true``/``false``), so a bad override is refused here, by name, before any work starts. The CLIs
(``mm_jax.train``, the memory planner) call ``load``; ``add_arguments`` gives an argparse parser
the ``--config`` flag with the override syntax in its help.

A config folder that is a package (``configs/__init__.py``) is importable while its files load, so
they can share ``configs/common.py`` wherever the command runs from.

Why not ``config_flags.DEFINE_config_file`` directly (tried with ml_collections' config_flags on
this repo's configs): it loads the file by path without its package on ``sys.path``, so
``configs/video.py`` (``from configs.common import ...``) fails with "No module named 'configs'"
when the command runs outside the repository root; it registers the ``--config.a.b`` override
flags from ``sys_argv`` at definition time, so with argparse owning the command line (``--help``
with defaults, the CLIs' other flags) an override given to the parsed flags alone is "Unknown
command line flag 'config.train.steps'"; an unknown preset comes back as IllegalFlagValueError
with a traceback inside its message and a missing file as "OSError: Configuration is not
available because of an earlier failure to load", where the CLIs refuse with one line naming the
file, the preset or the field and exit 2 before any work (``tests/test_cli_errors.py``); and absl's
global ``FLAGS`` cannot define ``config`` twice in one process (tests call the CLIs' ``main``
repeatedly). So this module loads the file itself (``get_config``) and leaves only the typed
parsing of overrides to ``config_flags`` (``DEFINE_config_dict`` on a private ``FlagValues`` per
call, with the overrides as its ``sys_argv``).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import Iterable

import ml_collections

OVERRIDE_PREFIX = "--config."


class ConfigError(ValueError):
    """A config file, preset or override that cannot be used; the message names it."""


def _import_file(path: Path):
    """Execute a config file as a module; its package's parent goes on ``sys.path`` first."""
    folder = path.resolve().parent
    if (folder / "__init__.py").exists() and str(folder.parent) not in sys.path:
        sys.path.insert(0, str(folder.parent))
    spec = importlib.util.spec_from_file_location(f"_mm_jax_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except (ImportError, SyntaxError) as e:
        raise ConfigError(f"config file {path}: cannot be loaded ({type(e).__name__}: {e})") from None
    return mod


def get_config(spec: str) -> ml_collections.ConfigDict:
    """``"configs/video.py:tiny"`` -> the file's ``get_config("tiny")`` (no overrides)."""
    path, _, preset = spec.partition(":")
    p = Path(path)
    if p.suffix != ".py" or not p.is_file():
        raise ConfigError(f"--config {spec}: {path!r} is not a config file (expected path/to/file.py[:preset])")
    mod = _import_file(p)
    if not hasattr(mod, "get_config"):
        raise ConfigError(f"config file {path} has no get_config()")
    try:
        cfg = mod.get_config(preset or None)
    except ValueError as e:  # an unknown preset: the file's own message lists the presets
        raise ConfigError(str(e)) from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"config file {path}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


def _field_names(cfg: ml_collections.ConfigDict, dotted: str) -> tuple[str, list[str]]:
    """-> (the first missing part of ``dotted``, the fields where it was looked for), or ("", [])."""
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return part, sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        node = node[part]
    return "", []


def normalize_override(override: str) -> str:
    """``a.b=1``, ``config.a.b=1`` or ``--config.a.b=1`` -> ``--config.a.b=1``."""
    o = override.strip()
    for prefix in (OVERRIDE_PREFIX, "config."):
        if o.startswith(prefix):
            o = o[len(prefix):]
            break
    return OVERRIDE_PREFIX + o


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Set each ``a.b.c=value`` on ``cfg`` (in place and returned), parsed by the field's type."""
    from absl import flags
    from ml_collections import config_flags

    argv = [normalize_override(o) for o in overrides]
    for arg in argv:
        key, sep, _ = arg[len(OVERRIDE_PREFIX):].partition("=")
        if not key:
            raise ConfigError(f"override {arg!r}: expected --config.<field>=<value>")
        missing, fields = _field_names(cfg, key)
        if missing:
            raise ConfigError(f"override {arg}: no field {missing!r} in the config"
                              + (f" (fields there: {', '.join(fields)})" if fields else ""))
        if not sep:
            raise ConfigError(f"override {arg}: no value (expected --config.{key}=<value>)")
    fv = flags.FlagValues()  # a private flag registry per call: loads never see each other's flags
    config_flags.DEFINE_config_dict("config", cfg, flag_values=fv, sys_argv=["mm_jax", *argv], lock_config=False)
    try:
        fv(["mm_jax", *argv])
    except flags.Error as e:  # IllegalFlagValueError names the flag and the value
        raise ConfigError(f"bad override: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise ConfigError(f"bad override among {' '.join(argv)}: {e}") from None
    return fv.config


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """``"configs/model.py:tiny"`` -> ConfigDict; overrides like ``"transformer.num_layers=4"`` or
    ``"--config.transformer.num_layers=4"``. Raises ``ConfigError`` (a ValueError) naming the file,
    the preset or the override and what is allowed."""
    return apply_overrides(get_config(spec), list(overrides))


def add_arguments(ap: argparse.ArgumentParser, example: str = "configs/video.py:demo") -> None:
    """``--config FILE[:preset]`` on an argparse parser; overrides are the parser's unknown
    arguments (``parse_known_args``) that start with ``--config.``."""
    ap.add_argument("--config", required=True, metavar="FILE[:PRESET]",
                    help=f"config file and preset, e.g. {example}; override any field with "
                         f"--config.<field>=<value> (e.g. --config.train.steps=100)")


def split_overrides(ap: argparse.ArgumentParser, rest: list[str]) -> list[str]:
    """The ``--config.*`` overrides among ``parse_known_args``' leftovers; anything else is an
    argparse error (exit 2). ``--config.a.b VALUE`` (space-separated) is joined to ``=VALUE``."""
    out, bad, i = [], [], 0
    while i < len(rest):
        r = rest[i]
        if r.startswith(OVERRIDE_PREFIX):
            if "=" not in r and i + 1 < len(rest) and not rest[i + 1].startswith("--"):
                r, i = f"{r}={rest[i + 1]}", i + 1
            out.append(r)
        else:
            bad.append(r)
        i += 1
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)} (config overrides look like --config.train.steps=10)")
    return out
