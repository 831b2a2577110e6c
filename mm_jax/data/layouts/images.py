"""Still-image layouts: the generic manifest, LAION-Face (parquet / webdataset tars), SFHQ."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from mm_jax.data.layouts.base import Layout, chunks, first_column
from mm_jax.data.sources import IMAGE_EXT, BuildError, invalid_item, item_kind, jsonl_objects, list_items

# -- the generic input --------------------------------------------------------------------------
class Manifest(Layout):
    name = "manifest"

    def units(self, src):
        return [{"items": chunk} for chunk in chunks(list_items(src))]

    def items(self, unit):
        yield from unit["items"]

    def kinds(self, units):
        found = {item_kind(it) for u in units for it in u["items"] if not it.get("invalid")}
        return tuple(k for k in ("image", "video") if k in found)


# -- LAION-Face: parquet or webdataset tar shards ----------------------------------------------
class LaionFace(Layout):
    name = "laion_face"
    KINDS = ("image",)
    READS_CONTAINERS = True
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
        """References without the image bytes: a parquet row (row group, row, column) or a tar
        member (offset, size); ``read`` fetches the bytes once they are deduplicated."""
        yield from self._parquet(unit) if "parquet" in unit else self._tar(unit["tar"])

    def container(self, item):
        if "row" in item:
            return f"{item['path']}|{item['row_group']}"
        return item["path"] if "offset" in item else None

    def read(self, refs):
        """The refs of one parquet row group or tar, with ``data``: only the image column of the
        group is read, only the kept members of the tar."""
        if "row" in refs[0]:
            import pyarrow.parquet as pq

            column = refs[0]["column"]
            values = pq.ParquetFile(refs[0]["path"]).read_row_group(refs[0]["row_group"], columns=[column])
            values = values.column(column)
            for ref in refs:
                data = values[ref["row"]].as_py()
                if isinstance(data, dict):  # Hugging Face Image feature: {"bytes", "path"}
                    data = data.get("bytes")
                yield {**ref, "data": data or b""}
            return
        with open(refs[0]["path"], "rb") as f:
            for ref in refs:
                f.seek(ref["offset"])
                yield {**ref, "data": f.read(ref["size"])}

    def _parquet(self, unit):
        import pyarrow.parquet as pq

        path = Path(unit["parquet"])
        file = pq.ParquetFile(path)
        cols = file.schema_arrow.names
        cap = first_column(cols, self.CAPTION_COLUMNS, "caption", path)
        img = next((c for c in self.IMAGE_COLUMNS if c in cols), None)
        key = next((c for c in self.KEY_COLUMNS if c in cols), None)
        paths = None if img else first_column(cols, ("path", "file", "filename"), "image bytes or path", path)
        listed = [c for c in (cap, key, paths) if c]  # never the image column: the bytes are read later
        table = file.read_row_group(unit["row_group"], columns=listed)
        for i, row in enumerate(table.to_pylist()):
            name = str(row[key]) if key else f"{unit['row_group']}-{i}"
            caption = row[cap] or ""
            if paths:
                p = Path(row[paths])
                yield {"path": str(p if p.is_absolute() else path.parent / p), "caption": caption, "ref": None}
                continue
            yield {"path": str(path), "member": f"{name}.{img if img != 'image' else 'jpg'}", "caption": caption,
                   "ref": None, "row_group": unit["row_group"], "row": i, "column": img}

    @staticmethod
    def _tar(path: str):
        """Webdataset: consecutive members sharing a key form one sample. Only the caption members
        (.txt / .json) are read here; an image member is referenced by its offset and size."""
        import tarfile

        def sample(key, files):
            image = next((n for n in files if Path(n).suffix.lower() in IMAGE_EXT), None)
            if image is None:
                return None
            caption = files[next(n for n in files if n.endswith(".txt"))].decode() if any(
                n.endswith(".txt") for n in files) else ""
            if not caption and any(n.endswith(".json") for n in files):
                caption = json.loads(files[next(n for n in files if n.endswith(".json"))]).get("caption") or ""
            offset, size = files[image]
            return {"path": path, "member": image, "caption": caption.strip(), "ref": None, "offset": offset,
                    "size": size}

        key, files = None, {}
        with tarfile.open(path, "r:") as tar:  # uncompressed (webdataset's form): offsets are file offsets
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
                text = m.name.endswith((".txt", ".json"))
                files[m.name] = tar.extractfile(m).read() if text else (m.offset_data, m.size)
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
        file_col = first_column(rows[0].keys(), ("file", "filename", "image", "image_name", "image_id", "path"), "file", path)
        cap_col = first_column(rows[0].keys(), ("caption", "text", "prompt"), "caption", path)
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
        return [{"items": chunk} for chunk in chunks(items + bad)]

    def items(self, unit):
        yield from unit["items"]
