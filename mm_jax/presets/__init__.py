"""The published configs of the real models (no weights): what the planner and the real-size
checks build abstractly. Each JSON file is the ``config.json`` of the public checkpoint folder.

    presets.load("cogvideox5b_transformer")  -> dict

``magic_mirror_training`` is the paper's training recipe (stages, optimizer), the numbers the
training configs and the planner share.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = tuple(sorted(p.stem for p in HERE.glob("*.json")))


def load(name: str) -> dict:
    """The config dict of preset ``name`` (one of ``NAMES``)."""
    path = HERE / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(NAMES)}")
    return json.loads(path.read_text())
