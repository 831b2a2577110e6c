"""What a dataset build processes: source items, their kinds and their identities.

An item is a small dict, the unit of work of both builders (``mm_jax.data.build`` and the TFDS
builders in ``mm_jax.data.tfds``):

    path     str          the file to read (for ``member``/``data`` items: the container file)
    caption  str
    ref      str | None   a same-identity reference photo, else the reference is chosen from the target
    member   str          optional: the entry inside a container (tar member, parquet row key)
    data     bytes        optional: the media bytes themselves (read from a container by the listing)
    span     [s0, s1]     optional: seconds of a clip to read (OpenVid / Panda time spans)
    frames   [f0, f1]     optional: frame range [f0, f1) of a clip to read (OpenS2V cuts)

The generic input (``list_items``) is a folder of media with ``captions.jsonl`` or ``<name>.txt``
captions, or a JSONL manifest of ``{"path", "caption", "ref"}``; the layouts that users download
are read by ``mm_jax.data.layouts``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
VIDEO_EXT = {".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv"}


class BuildError(ValueError):
    pass


def kind_of(name: str) -> str | None:
    """"image" | "video" by file extension, None for anything else."""
    suffix = Path(name).suffix.lower()
    return "image" if suffix in IMAGE_EXT else "video" if suffix in VIDEO_EXT else None


def item_kind(item: dict) -> str:
    return kind_of(item.get("member") or item["path"]) or "video"


def source_name(item: dict) -> str:
    """The record's ``source``: the path, plus the container entry and the span when there are any."""
    name = item["path"] + (f"#{item['member']}" if item.get("member") else "")
    if item.get("span"):
        name += "@{:.3f}-{:.3f}s".format(*item["span"])
    if item.get("frames"):
        name += "@frames{}-{}".format(*item["frames"])
    return name


def item_key(item: dict) -> str:
    """Identifies a source file version: source, size, mtime (and the reference's path)."""
    try:
        st = os.stat(item["path"])
        ver = f"{st.st_size}:{int(st.st_mtime)}"
    except OSError:
        ver = "missing"
    return f"{source_name(item)}|{ver}|{item.get('ref') or ''}"


def invalid_item(where: str, problem: str) -> dict[str, Any]:
    """A listing entry that could not be read (a bad JSONL line, a corrupt captions file): it goes
    through the builders like any item and is skipped as "bad_listing" and counted, so one bad line
    among millions neither stops a build nor vanishes unnoticed."""
    return {"path": where, "caption": "", "ref": None, "invalid": problem}


def jsonl_objects(path: Path):
    """(line number, dict) for each JSON object line; a line that is not one is (n, None)."""
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            d = None
        yield n, d if isinstance(d, dict) else None


def list_items(src: str | Path) -> list[dict[str, Any]]:
    """-> [{"path", "caption", "ref"}], from a folder or a JSONL manifest; a missing or empty source
    is an error that names it, a bad line an ``invalid_item`` (skipped and counted)."""
    src = Path(src)
    if src.is_file():
        items = []
        for n, d in jsonl_objects(src):
            path = d.get("path") if d else None
            if not isinstance(path, str) or not path:
                items.append(invalid_item(f"{src}:{n}", "not a JSON object with a 'path' string"))
                continue
            path = Path(path)
            path = path if path.is_absolute() else src.parent / path
            ref = d.get("ref")
            items.append({"path": str(path), "caption": str(d.get("caption") or ""),
                          "ref": None if not ref else str(ref if Path(ref).is_absolute() else src.parent / ref)})
        if not items:
            raise BuildError(f"--src {src}: the manifest lists nothing")
        return items
    if not src.is_dir():
        raise BuildError(f"--src {src}: no such folder or manifest file")
    captions, bad = {}, []
    if (src / "captions.jsonl").exists():
        for n, d in jsonl_objects(src / "captions.jsonl"):
            if d is None or not isinstance(d.get("file"), str):
                bad.append(invalid_item(f"{src / 'captions.jsonl'}:{n}", "not a JSON object with a 'file' string"))
                continue
            captions[d["file"]] = str(d.get("caption") or "")
    media = sorted(p for p in src.iterdir() if kind_of(p.name))
    if not media:
        raise BuildError(f"--src {src}: no images or videos in the folder (extensions "
                         f"{sorted(IMAGE_EXT | VIDEO_EXT)})")
    items = []
    for p in media:
        cap = captions.get(p.name)
        if cap is None and p.with_suffix(".txt").exists():
            cap = p.with_suffix(".txt").read_text().strip()
        items.append({"path": str(p), "caption": cap or "", "ref": None})
    return items + bad
