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
    READS_CONTAINERS = False  # True: items are references into containers (``container``, ``read``)

    def __init__(self, **options: Any):
        self.options = {k: v for k, v in options.items() if v is not None}

    def units(self, src: str | Path) -> list[dict]:
        """Abstract: every registered layout subclass lists its units (tested per layout)."""
        raise NotImplementedError

    def items(self, unit: dict) -> Iterator[dict]:
        """Abstract: every registered layout subclass expands a unit into items."""
        raise NotImplementedError

    def container(self, item: dict) -> str | None:
        """The container an item's media bytes are read from (``read``), or None when the item's
        ``path`` is its own file, which the example maker reads. ``items`` yields references without
        the bytes, so a build deduplicates them before any media is read."""
        return None

    def read(self, refs: list[dict]) -> Iterator[dict]:
        """The items of ``refs`` (all of one ``container``) with their media bytes as ``data``,
        the container opened once; a layout with containers overrides it."""
        yield from refs

    def media_items(self, unit: dict) -> Iterator[dict]:
        """``items(unit)`` with their media bytes read (``read`` per container): the items as the
        example maker takes them, outside a Beam pipeline (which deduplicates between the two steps)."""
        groups: dict[str | None, list[dict]] = {}
        for ref in self.items(unit):
            groups.setdefault(self.container(ref), []).append(ref)
        for c, refs in groups.items():
            yield from refs if c is None else self.read(refs)

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
