"""The base of the source layouts: a layout lists its work as small units, then expands each into items."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

from mm_jax.data.sources import BuildError

CHUNK = 1024  # items (or rows) per unit


def chunks(seq: list, n: int = CHUNK) -> list[list]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def first_column(columns, names: tuple[str, ...], what: str, where) -> str:
    for n in names:
        if n in columns:
            return n
    raise BuildError(f"{where}: no {what} column (looked for {', '.join(names)}; found {', '.join(map(str, columns))})")


class Layout:
    name = ""
    KINDS: tuple[str, ...] = ("image", "video")

    def __init__(self, **options: Any):
        self.options = {k: v for k, v in options.items() if v is not None}

    def units(self, src: str | Path) -> list[dict]:
        """Abstract: every registered layout subclass lists its units (tested per layout)."""
        raise NotImplementedError

    def items(self, unit: dict) -> Iterator[dict]:
        """Abstract: every registered layout subclass expands a unit into items."""
        raise NotImplementedError

    def kinds(self, units: list[dict]) -> tuple[str, ...]:
        return self.KINDS

    def count(self, units: list[dict]) -> int | None:
        """How many items the units hold, when the listing says so without reading them (the
        progress bar's total); None when a unit's count is unknown before it is read."""
        n = 0
        for u in units:
            if "items" in u:
                n += len(u["items"])
            elif "entries" in u:
                n += len(u["entries"])
            elif "invalid" in u:
                n += 1
            elif u.get("rows") is not None:
                n += u["rows"]
            else:
                return None
        return n
