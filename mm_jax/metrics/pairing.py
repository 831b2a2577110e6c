"""Pair generated videos with reference photos (and optional prompts): by file stem, or by a JSONL
manifest of ``{"video": ..., "ref": ..., "prompt": optional}`` lines."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

VIDEO_SUFFIXES = (".mp4", ".gif", ".npy")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


@dataclasses.dataclass(frozen=True)
class Pair:
    name: str                 # report key and plot file name (the video's stem)
    video: Path               # mp4 / gif / npy / folder of frames
    ref: Path                 # reference photo
    prompt: str | None = None


def list_videos(folder: Path) -> dict[str, Path]:
    """stem -> video in ``folder``: .mp4/.gif/.npy files and sub-folders of PNG/JPEG frames."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--videos {folder}: no such folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        is_frames = p.is_dir() and any(f.suffix.lower() in (".png", ".jpg", ".jpeg") for f in p.iterdir())
        if not (is_frames or (p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)):
            continue
        stem = p.name if p.is_dir() else p.stem
        if stem in out:
            raise ValueError(f"--videos {folder}: {out[stem].name} and {p.name} share the name {stem!r}; "
                             "keep one video per name")
        out[stem] = p
    return out


def list_images(folder: Path) -> dict[str, Path]:
    """stem -> image in ``folder`` (.png/.jpg/.jpeg/.bmp/.webp)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--refs {folder}: no such folder")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in out:
                raise ValueError(f"--refs {folder}: {out[p.stem].name} and {p.name} share the name {p.stem!r}")
            out[p.stem] = p
    return out


def read_prompts(path: Path) -> dict[str, str]:
    """A JSONL file of ``{"id": name, "prompt": text, ...}`` lines -> name -> prompt."""
    out = {}
    for i, rec in enumerate(_jsonl(path, "--prompts"), 1):
        if not isinstance(rec.get("id"), str) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"--prompts {path} line {i}: needs string fields 'id' and 'prompt', got {sorted(rec)}")
        out[rec["id"]] = rec["prompt"]
    return out


def _jsonl(path: Path, flag: str) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    recs = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{flag} {path} line {i}: not JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{flag} {path} line {i}: expected a JSON object, got {type(rec).__name__}")
        recs.append(rec)
    return recs


def pair_by_stem(videos: Path, refs: Path, prompts: dict[str, str] | None = None) -> list[Pair]:
    """Every video in ``videos`` with the image of the same stem in ``refs``; an unmatched file on
    either side is an error that names them all."""
    vids, imgs = list_videos(videos), list_images(refs)
    if not vids:
        raise ValueError(f"--videos {videos}: no videos (.mp4, .gif, .npy or a folder of PNG frames)")
    lonely_v = [vids[s].name for s in vids if s not in imgs]
    lonely_r = [imgs[s].name for s in imgs if s not in vids]
    if lonely_v or lonely_r:
        msg = []
        if lonely_v:
            msg.append(f"videos without a reference in {refs}: {lonely_v}")
        if lonely_r:
            msg.append(f"references without a video in {videos}: {lonely_r}")
        raise ValueError("videos and references are paired by file stem; " + "; ".join(msg)
                         + " (rename them, or pass --manifest)")
    prompts = prompts or {}
    return [Pair(s, vids[s], imgs[s], prompts.get(s)) for s in sorted(vids)]


def pair_by_manifest(manifest: Path, videos: Path | None = None, refs: Path | None = None,
                     prompts: dict[str, str] | None = None) -> list[Pair]:
    """Pairs from JSONL lines ``{"video", "ref", "prompt"?}``. Relative paths resolve against
    ``videos`` / ``refs`` when given, else against the manifest's folder. A prompt in the manifest
    wins over one from ``prompts`` (looked up by the video's stem)."""
    manifest = Path(manifest)
    prompts = prompts or {}
    pairs, names = [], set()
    recs = _jsonl(manifest, "--manifest")
    if not recs:
        raise ValueError(f"--manifest {manifest}: no entries")
    for i, rec in enumerate(recs, 1):
        where = f"--manifest {manifest} entry {i}"
        if not isinstance(rec.get("video"), str) or not isinstance(rec.get("ref"), str):
            raise ValueError(f"{where}: needs string fields 'video' and 'ref', got {sorted(rec)}")
        if rec.get("prompt") is not None and not isinstance(rec["prompt"], str):
            raise ValueError(f"{where}: 'prompt' must be a string, got {rec['prompt']!r}")
        video = _resolve(rec["video"], videos or manifest.parent)
        ref = _resolve(rec["ref"], refs or manifest.parent)
        missing = [f"{k} {p}" for k, p in (("video", video), ("ref", ref)) if not p.exists()]
        if missing:
            raise ValueError(f"{where}: no such file: {', '.join(missing)}")
        name = video.name if video.is_dir() else video.stem
        if name in names:  # same stem in two folders: keep the report keys and plot names apart
            name = f"{name}-{i}"
        names.add(name)
        stem = video.name if video.is_dir() else video.stem
        pairs.append(Pair(name, video, ref, rec.get("prompt") or prompts.get(stem)))
    return pairs


def _resolve(p: str, base: Path) -> Path:
    path = Path(p)
    return path if path.is_absolute() else Path(base) / path
