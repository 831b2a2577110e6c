"""Clip layouts: OpenVid / Panda CSVs, ConsisID-preview-Data, OpenS2V-5M."""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

from mm_jax.data.layouts.base import CHUNK, Layout, chunks, first_column
from mm_jax.data.sources import BuildError, invalid_item, kind_of

# -- OpenVid-1M / Panda-70M style CSV --------------------------------------------------------------
def _seconds(t) -> float:
    """"0:01:02.500" / "62.5" / 62.5 -> 62.5"""
    if isinstance(t, (int, float)):
        return float(t)
    parts = [float(x) for x in str(t).strip().split(":")]
    return sum(v * 60 ** k for k, v in enumerate(reversed(parts)))


def _maybe_list(v):
    if isinstance(v, str) and v.strip().startswith("["):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v
    return v


class ClipsCsv(Layout):
    name = "clips_csv"
    KINDS = ("video",)
    CLIP_COLUMNS = ("video", "path", "file", "filename", "video_path", "videoID")

    def units(self, src):
        src = Path(src)
        if not src.is_file():
            raise BuildError(f"--src {src}: no such CSV file")
        with src.open(newline="") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if not header:
                raise BuildError(f"--src {src}: empty CSV")
            first_column(header, self.CLIP_COLUMNS, "clip", src)
            first_column(header, ("caption", "text", "cap"), "caption", src)
            rows = sum(1 for _ in reader)
        return [{"csv": str(src), "start": a, "stop": min(a + CHUNK, rows)} for a in range(0, rows, CHUNK)]

    def _root(self, csv_path: Path) -> Path:
        if self.options.get("video_root"):
            return Path(self.options["video_root"])
        return next((d for d in (csv_path.parent / "video", csv_path.parent / "videos") if d.is_dir()), csv_path.parent)

    def items(self, unit):
        path = Path(unit["csv"])
        root = self._root(path)
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            clip = first_column(reader.fieldnames, self.CLIP_COLUMNS, "clip", path)
            cap = first_column(reader.fieldnames, ("caption", "text", "cap"), "caption", path)
            for i, row in enumerate(reader):
                if i < unit["start"]:
                    continue
                if i >= unit["stop"]:
                    break
                name = row[clip] + (".mp4" if clip == "videoID" and not kind_of(row[clip]) else "")
                p = Path(name) if Path(name).is_absolute() else root / name
                captions, spans = _maybe_list(row[cap]), None
                if row.get("start") not in (None, "") and row.get("end") not in (None, ""):
                    spans = [[row["start"], row["end"]]]
                elif row.get("timestamp"):
                    ts = _maybe_list(row["timestamp"])
                    spans = ts if ts and isinstance(ts[0], (list, tuple)) else [ts]
                if spans is None:
                    yield {"path": str(p), "caption": captions if isinstance(captions, str) else captions[0], "ref": None}
                    continue
                for k, (s0, s1) in enumerate(spans):
                    c = captions if isinstance(captions, str) else captions[min(k, len(captions) - 1)]
                    yield {"path": str(p), "caption": c, "ref": None, "span": [_seconds(s0), _seconds(s1)]}


# -- ConsisID ------------------------------------------------------------------------------------
def _face_frames(bbox_json: Path) -> list[int] | None:
    """[first, last + 1) over the frames with a face box in a ConsisID refine_bbox json, None if
    there is none or the file cannot be read (the clip is then read whole)."""
    try:
        boxes = json.loads(bbox_json.read_text())
        frames = sorted(int(k) for k, v in boxes.items() if isinstance(v, dict) and v.get("face"))
    except (OSError, ValueError, AttributeError):
        return None
    return [frames[0], frames[-1] + 1] if frames else None


def _locate(path: str, base: Path) -> Path | None:
    """A path from a listing written on another machine: as given, under ``base``, its last two
    parts under ``base`` (``captions/x.json``, ``name/videos``), or its name under ``base``."""
    p = Path(path)
    for c in (p, base / p, base / Path(*p.parts[-2:]), base / p.name):
        if c.exists():
            return c
    return None


class Consisid(Layout):
    """Three forms of ConsisID-preview-Data (its repository's README tree and ``models/dataloader.py``):
    ``total_train_data.txt`` lines ``videos_dir,captions_json,anno_base`` (paths as given, else found
    under the source folder), else ``captions/<name>.json`` with ``<name>/videos/`` and
    ``<name>/refine_bbox_jsons/``, else ``<name>/captions/*.json`` inside each dataset folder."""
    name = "consisid"
    KINDS = ("video",)
    LISTING = "total_train_data.txt"

    def units(self, src):
        src = Path(src)
        listing = src if src.is_file() else src / self.LISTING
        if listing.is_file():
            return self._listed(listing)
        sets = [(cf, src / cf.stem, src / cf.stem) for cf in sorted((src / "captions").glob("*.json"))]
        sets += [(cf, cf.parent.parent, cf.parent.parent) for cf in sorted(src.glob("*/captions/*.json"))]
        if not sets:
            raise BuildError(f"--src {src}: no {self.LISTING}, captions/<name>.json or <name>/captions/*.json "
                             f"(ConsisID's layout: captions/, <name>/videos/, <name>/refine_bbox_jsons/)")
        return [u for cf, root, anno in sets for u in self._caption_units(cf, root / "videos", anno)]

    def _listed(self, listing: Path) -> list[dict]:
        units, base = [], listing.parent
        for n, line in enumerate(listing.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            parts = [x.strip() for x in line.split(",")]
            found = [_locate(x, base) for x in parts] if len(parts) == 3 else []
            if len(found) != 3 or None in found:
                units.append({"invalid": f"{listing}:{n}", "error": "not 'videos_dir,captions_json,anno_base' "
                                                                    "with paths that exist here"})
                continue
            videos, captions, anno = found
            units += self._caption_units(captions, videos, anno)
        if not units:
            raise BuildError(f"--src {listing}: lists nothing")
        return units

    @staticmethod
    def _caption_units(captions: Path, videos: Path, anno: Path) -> list[dict]:
        """Chunks of one captions file; a file that is not a JSON list is one unit counted as bad_listing."""
        try:
            entries = json.loads(captions.read_text())
        except (OSError, ValueError) as e:
            return [{"invalid": str(captions), "error": f"not readable JSON ({e})"}]
        if not isinstance(entries, list):
            return [{"invalid": str(captions), "error": "expected a list of {path, cap}"}]
        return [{"videos": str(videos), "anno": str(anno), "entries": c} for c in chunks(entries)]

    def items(self, unit):
        if "invalid" in unit:
            yield invalid_item(unit["invalid"], unit["error"])
            return
        videos, anno = Path(unit["videos"]), Path(unit["anno"])
        for k, e in enumerate(unit["entries"]):
            if not isinstance(e, dict) or not isinstance(e.get("path"), str):
                yield invalid_item(f"{anno}#{k}", "a caption entry without a 'path' string")
                continue
            name = Path(e["path"]).name
            item = {"path": str(videos / name), "caption": str(e.get("cap") or ""), "ref": None}
            frames = _face_frames(anno / "refine_bbox_jsons" / f"{Path(name).stem}.json")
            if frames:
                item["frames"] = frames
            yield item


# -- OpenS2V-5M ----------------------------------------------------------------------------------
class Opens2v(Layout):
    name = "opens2v"
    KINDS = ("video",)
    CAPTION_KEYS = ("cap", "face_cap_qwen", "face_cap_glm", "face_cap_Aria")

    def units(self, src):
        src = Path(src)
        files = [src] if src.is_file() else sorted(src.rglob("*.json"))
        if not files:
            raise BuildError(f"--src {src}: no OpenS2V JSON files")
        root = Path(self.options.get("video_root") or (src.parent if src.is_file() else src / "videos"))
        return [{"json": str(f), "video_root": str(root)} for f in files]

    def items(self, unit):
        data = json.loads(Path(unit["json"]).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{unit['json']}: expected {{clip_id: {{metadata, ...}}}}")
        for clip_id, entry in data.items():
            meta = entry.get("metadata", {}) if isinstance(entry, dict) else {}
            # the merged caption, else the face captions of the three captioners the metadata carries
            cap = next((meta[k] for k in self.CAPTION_KEYS if meta.get(k)), "")
            item = {"path": str(Path(unit["video_root"]) / meta.get("path", f"{clip_id}.mp4")),
                    "caption": cap[0] if isinstance(cap, list) else cap, "ref": None}
            cut = meta.get("face_cut") or meta.get("cut")
            if cut:
                item["frames"] = [int(cut[0]), int(cut[1])]
            yield item
