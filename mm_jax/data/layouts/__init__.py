"""The file layouts users download, read into source items (``mm_jax.data.sources``), offline.

A layout lists its work in two steps, so that a cluster spreads the reading: ``units(src)`` runs
where the build is launched and returns small JSON-able units (a file, a row range, a chunk of
names); ``items(unit)`` runs on the workers and yields the items. ``kinds(units)`` names the
splits ("image", "video") the items can fall in. Items are references: where the media sits inside
a container (a parquet row, a tar member), ``container(item)`` names it and ``read(refs)`` adds
the bytes, one container at a time, after the build has dropped duplicate items
(``media_items(unit)`` does both steps outside Beam).

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

from mm_jax.data.layouts.base import CHUNK, Layout
from mm_jax.data.layouts.clips import ClipsCsv, Consisid, Opens2v
from mm_jax.data.layouts.images import LaionFace, Manifest, Sfhq, read_captions

__all__ = ["CHUNK", "LAYOUTS", "Layout", "Manifest", "LaionFace", "Sfhq", "ClipsCsv", "Consisid", "Opens2v",
           "read_captions"]

LAYOUTS = {c.name: c for c in (Manifest, LaionFace, Sfhq, ClipsCsv, Consisid, Opens2v)}
