"""The file layouts users download, read into source items (``mm_jax.data.sources``), offline.

A layout lists its work in two steps, so that a cluster spreads the reading: ``units(src)`` runs
where the build is launched and returns small JSON-able units (a file, a row range, a chunk of
names); ``items(unit)`` runs on the workers and yields the items. ``kinds(units)`` names the
splits ("image", "video") the items can fall in.

    manifest     the generic input: a folder of media + captions.jsonl / <name>.txt, or a JSONL
                 manifest {"path", "caption", "ref"}
    laion_face   LAION-Face / img2dataset output: *.parquet with image bytes (column jpg/png/webp/
                 image) or a path column, and a caption column (caption/TEXT/text); or webdataset
                 *.tar shards of <key>.jpg + <key>.txt (or <key>.json with "caption")
    sfhq         SFHQ-style image folder (searched recursively) + a captions file (--captions: CSV
                 with a file column and a caption column, JSONL {"file", "caption"} or JSON
                 {file: caption}); images without a caption get "" (counted, see captions.py)
    clips_csv    OpenVid-1M / Panda-70M-style CSV: a clip column (video/path/file/filename, or
                 videoID -> <videoID>.mp4) resolved under --video-root, a caption column, optional
                 spans: start/end seconds columns or Panda's timestamp lists (one item per span,
                 with the matching entry of a caption list)
    consisid     ConsisID's training layout: captions/<name>.json ([{"path", "cap", ...}]) with
                 <name>/videos/ and <name>/refine_bbox_jsons/<clip>.json (per-frame face boxes); a
                 clip is cut to the frames between its first and last annotated face
    opens2v      OpenS2V-5M regular-pair JSONs ({clip_id: {"metadata": {"path", "cap", "face_cut"
                 or "cut", ...}}}) with the clips under --video-root; a clip is cut to face_cut
"""
from __future__ import annotations

import ast
import csv
import json
from pathlib import Path
from typing import Any, Iterator

from mm_jax.data.sources import IMAGE_EXT, BuildError, invalid_item, item_kind, jsonl_objects, kind_of, list_items

CHUNK = 1024  # items (or rows) per unit


def _chunks(seq: list, n: int = CHUNK) -> list[list]:
    return [seq[i:i + n] for i in range(0, len(seq), n)]


def _first(columns, names: tuple[str, ...], what: str, where) -> str:
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


# -- the generic input --------------------------------------------------------------------------
class Manifest(Layout):
    name = "manifest"

    def units(self, src):
        return [{"items": chunk} for chunk in _chunks(list_items(src))]

    def items(self, unit):
        yield from unit["items"]

    def kinds(self, units):
        found = {item_kind(it) for u in units for it in u["items"] if not it.get("invalid")}
        return tuple(k for k in ("image", "video") if k in found)


# -- LAION-Face: parquet or webdataset tar shards ----------------------------------------------
class LaionFace(Layout):
    name = "laion_face"
    KINDS = ("image",)
    IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image")
    CAPTION_COLUMNS = ("caption", "TEXT", "text")
    KEY_COLUMNS = ("key", "SAMPLE_ID", "id")

    def units(self, src):
        src = Path(src)
        files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.suffix in (".parquet", ".tar"))
        if not files:
            raise BuildError(f"--src {src}: no .parquet or .tar shards")
        units = []
        for f in files:
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq

                try:
                    meta = pq.ParquetFile(f).metadata
                    rows = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                except Exception:  # unreadable: one unit, whose reading is counted as skipped
                    rows = [None]
                units += [{"parquet": str(f), "row_group": g, "rows": r} for g, r in enumerate(rows)]
            else:
                units.append({"tar": str(f)})
        return units

    def items(self, unit):
        yield from self._parquet(unit) if "parquet" in unit else self._tar(unit["tar"])

    def _parquet(self, unit):
        import pyarrow.parquet as pq

        path = Path(unit["parquet"])
        table = pq.ParquetFile(path).read_row_group(unit["row_group"])
        cols = table.column_names
        cap = _first(cols, self.CAPTION_COLUMNS, "caption", path)
        img = next((c for c in self.IMAGE_COLUMNS if c in cols), None)
        key = next((c for c in self.KEY_COLUMNS if c in cols), None)
        paths = None if img else _first(cols, ("path", "file", "filename"), "image bytes or path", path)
        for i, row in enumerate(table.to_pylist()):
            name = str(row[key]) if key else f"{unit['row_group']}-{i}"
            caption = row[cap] or ""
            if paths:
                p = Path(row[paths])
                yield {"path": str(p if p.is_absolute() else path.parent / p), "caption": caption, "ref": None}
                continue
            data = row[img]
            if isinstance(data, dict):  # Hugging Face Image feature: {"bytes", "path"}
                data = data.get("bytes")
            yield {"path": str(path), "member": f"{name}.{img if img != 'image' else 'jpg'}", "caption": caption,
                   "ref": None, "data": data or b""}

    @staticmethod
    def _tar(path: str):
        """Webdataset: consecutive members sharing a key form one sample."""
        import tarfile

        def sample(key, files):
            image = next((n for n in files if Path(n).suffix.lower() in IMAGE_EXT), None)
            if image is None:
                return None
            caption = files[next(n for n in files if n.endswith(".txt"))].decode() if any(
                n.endswith(".txt") for n in files) else ""
            if not caption and any(n.endswith(".json") for n in files):
                caption = json.loads(files[next(n for n in files if n.endswith(".json"))]).get("caption") or ""
            return {"path": path, "member": image, "caption": caption.strip(), "ref": None, "data": files[image]}

        key, files = None, {}
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                k = m.name.rsplit(".", 1)[0] if "." in Path(m.name).name else m.name
                if k != key and files:
                    s = sample(key, files)
                    if s:
                        yield s
                    files = {}
                key = k
                files[m.name] = tar.extractfile(m).read()
        if files:
            s = sample(key, files)
            if s:
                yield s


# -- SFHQ: an image folder + a captions file -----------------------------------------------------
def read_captions(path: Path) -> tuple[dict[str, str], list[dict]]:
    """({file name or relative path: caption}, bad lines as ``invalid_item``s) from a CSV, JSONL or
    JSON captions file; a bad JSONL line is counted, a whole file that cannot be parsed is an error."""
    if not path.is_file():
        raise BuildError(f"--captions {path}: no such file")
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return {}, []
        file_col = _first(rows[0].keys(), ("file", "filename", "image", "image_name", "image_id", "path"), "file", path)
        cap_col = _first(rows[0].keys(), ("caption", "text", "prompt"), "caption", path)
        return {r[file_col]: r[cap_col] or "" for r in rows if r.get(file_col)}, []
    if path.suffix == ".jsonl":
        captions, bad = {}, []
        for n, d in jsonl_objects(path):
            name = (d.get("file") or d.get("path")) if d else None
            if not isinstance(name, str):
                bad.append(invalid_item(f"{path}:{n}", "not a JSON object with a 'file' or 'path' string"))
                continue
            captions[name] = str(d.get("caption") or "")
        return captions, bad
    try:
        data = json.loads(path.read_text(errors="replace"))
    except ValueError as e:
        raise BuildError(f"--captions {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise BuildError(f"--captions {path}: expected a JSON object {{file: caption}}")
    return {k: str(v) for k, v in data.items()}, []


class Sfhq(Layout):
    name = "sfhq"
    KINDS = ("image",)

    def units(self, src):
        src = Path(src)
        if not src.is_dir():
            raise BuildError(f"--src {src}: no such image folder")
        cap_file = self.options.get("captions") or next(
            (str(p) for p in (src / "captions.csv", src / "captions.jsonl", src / "captions.json") if p.exists()), None)
        if cap_file is None:
            raise BuildError(f"--src {src}: no captions file; pass --captions FILE (CSV, JSONL or JSON)")
        captions, bad = read_captions(Path(cap_file))
        images = sorted(p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXT)
        if not images:
            raise BuildError(f"--src {src}: no images")
        items = [{"path": str(p), "ref": None,
                  "caption": captions.get(str(p.relative_to(src)), captions.get(p.name, captions.get(p.stem, "")))}
                 for p in images]
        return [{"items": chunk} for chunk in _chunks(items + bad)]

    def items(self, unit):
        yield from unit["items"]


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
            _first(header, self.CLIP_COLUMNS, "clip", src)
            _first(header, ("caption", "text", "cap"), "caption", src)
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
            clip = _first(reader.fieldnames, self.CLIP_COLUMNS, "clip", path)
            cap = _first(reader.fieldnames, ("caption", "text", "cap"), "caption", path)
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
        return [{"videos": str(videos), "anno": str(anno), "entries": c} for c in _chunks(entries)]

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


LAYOUTS = {c.name: c for c in (Manifest, LaionFace, Sfhq, ClipsCsv, Consisid, Opens2v)}
