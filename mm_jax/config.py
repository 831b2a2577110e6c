"""Loading ``ml_collections`` config files: ``path/to/file.py[:preset]`` plus dotted overrides.

Every config file defines ``get_config(preset: str | None = None) -> ConfigDict``.
"""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Iterable

import ml_collections


def load(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """``"configs/model.py:tiny"`` -> ConfigDict; overrides like ``"transformer.num_layers=4"``."""
    path, _, preset = spec.partition(":")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"config file {path!r} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_mm_cfg_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"config file {path} has no get_config()")
    cfg = mod.get_config(preset or None)
    for ov in overrides:
        apply_override(cfg, ov)
    return cfg


def apply_override(cfg: ml_collections.ConfigDict, override: str) -> None:
    """Set ``a.b.c=value`` (value parsed as a Python literal when it is one, else a string)."""
    key, sep, raw = override.partition("=")
    if not sep:
        raise ValueError(f"override {override!r}: expected key=value")
    key = key.strip().removeprefix("--config.").removeprefix("config.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    node = cfg
    parts = key.split(".")
    for part in parts[:-1]:
        if part not in node:
            raise KeyError(f"override {override!r}: no field {part!r} in the config")
        node = node[part]
    if parts[-1] not in node:
        raise KeyError(f"override {override!r}: no field {parts[-1]!r} in the config "
                       f"(fields: {', '.join(sorted(node.keys()))})")
    node[parts[-1]] = value
