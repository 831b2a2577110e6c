"""Published benchmark folders, read in the layout they are distributed in (``--benchmark NAME DIR`` of
``python -m mm_jax.evaluate`` and ``benchmarks/eval_prompts.py``).

OpenS2V-Eval (the Hugging Face dataset BestWishYsh/OpenS2V-Eval; PKU-YuanGroup/OpenS2V-Nexus ``eval/``)::

    DIR/Images/...                 reference photos
    DIR/Human-Domain_Eval.json     {"<case id>": {"prompt": "...", "img_paths": ["Images/.../man/x.jpg", ...]}, ...}

The Human-Domain cases are the ids containing ``singlehuman``, ``singleface``, ``faceobj`` or ``humanobj`` (the
filter of ``eval/get_facesim.py``); a case's reference is its first ``img_paths`` entry under a ``/man/``,
``/woman/``, ``/crop_man/`` or ``/crop_woman/`` folder, relative to DIR (their ``get_image_path_from_json``), its
prompt the ``prompt`` field (``eval/get_gmescore.py``). The
published numbers were sampled with seed 42 (``protocols.PROTOCOLS["opens2v"].seed``).

ConsisID's evaluation set (the Hugging Face dataset BestWishYsh/ConsisID-preview-Data; PKU-YuanGroup/ConsisID
``eval/eval_all_in_once.py``)::

    DIR/video_caption_eval_old.csv  columns index,Class,Original_Prompt,Refined_man,Refined_woman
    DIR/eval/face_images/           photos named <number>_..., taken in natural order (natsort)

Every photo with every CSV row is one case: its prompt is ``Refined_woman`` when ``woman`` is in the photo's file
name, else ``Refined_man``, with ``{class_token}`` replaced by the row's ``Class``; its id (the output name) is
``<photo file name>--<index>``, e.g. ``001_man.png--3``. The published numbers were sampled with seed 42
(``protocols.PROTOCOLS["consisid"].seed``), guidance 6.0 and 50 steps (their script's defaults).

For both, the generated video of a case is ``<case id>`` plus ``.mp4``, ``.gif`` or ``.npy``, or a folder ``<case id>`` of
PNG/JPEG frames (``pairing.list_videos``; two videos of one name are refused).
"""
from __future__ import annotations

import csv
import dataclasses
import json
import re
import warnings
from pathlib import Path

from mm_jax.metrics.pairing import IMAGE_SUFFIXES, Pair, list_videos

NAMES = ("opens2v", "consisid")
OPENS2V_JSON = "Human-Domain_Eval.json"
OPENS2V_HUMAN = ("singlehuman", "singleface", "faceobj", "humanobj")
OPENS2V_REF_DIRS = ("/man/", "/woman/", "/crop_woman/", "/crop_man/")
LAYOUT = "the layout of BestWishYsh/OpenS2V-Eval: DIR/Images/..., DIR/Human-Domain_Eval.json"
CONSISID_CSV = "video_caption_eval_old.csv"
CONSISID_FACES = "eval/face_images"
CONSISID_COLUMNS = ("index", "Class", "Refined_man", "Refined_woman")  # the columns their script reads
CONSISID_LAYOUT = (f"the layout of BestWishYsh/ConsisID-preview-Data: DIR/{CONSISID_CSV} (columns index,Class,"
                   f"Original_Prompt,Refined_man,Refined_woman), DIR/{CONSISID_FACES}/<number>_....png")


@dataclasses.dataclass(frozen=True)
class Case:
    id: str         # the case id; its video is <id>.mp4
    prompt: str
    ref: Path       # the reference photo (absolute or relative to the working directory)


def cases(name: str, root) -> list[Case]:
    """The benchmark's cases in the order its script runs them (see the module docstring); a folder not in the
    benchmark's layout is a ValueError / FileNotFoundError naming what is wrong."""
    if name == "opens2v":
        return _opens2v_cases(name, Path(root))
    if name == "consisid":
        return _consisid_cases(name, Path(root))
    raise ValueError(f"--benchmark {name!r}: known benchmarks are {list(NAMES)}")


def natural_key(name: str) -> tuple:
    """natsort's default order: runs of digits compare as numbers, the rest as text ("2_a" before "10_a")."""
    return tuple(int(t) if i % 2 else t for i, t in enumerate(re.split(r"(\d+)", name)))


def _consisid_cases(name: str, root: Path) -> list[Case]:
    """Every photo of ``eval/face_images`` (natural order) with every row of the CSV (file order)."""
    path, faces = root / CONSISID_CSV, root / CONSISID_FACES
    if not path.is_file():
        raise FileNotFoundError(f"--benchmark {name} {root}: no {CONSISID_CSV} ({CONSISID_LAYOUT})")
    if not faces.is_dir():
        raise FileNotFoundError(f"--benchmark {name} {root}: no {CONSISID_FACES}/ folder ({CONSISID_LAYOUT})")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in CONSISID_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"--benchmark {name} {path}: no column {', '.join(missing)} (has {reader.fieldnames}; "
                             f"{CONSISID_LAYOUT})")
        rows = list(reader)
    if not rows:
        raise ValueError(f"--benchmark {name} {path}: no rows")
    for i, r in enumerate(rows, 2):
        empty = [c for c in CONSISID_COLUMNS if not (r.get(c) or "").strip()]
        if empty:
            raise ValueError(f"--benchmark {name} {path} line {i}: empty {', '.join(empty)}")
    # pandas reads an all-integer column as int64, so their names carry "3" for "003" or " 3"
    as_int = all(re.fullmatch(r"\s*[+-]?\d+\s*", r["index"]) for r in rows)
    entries = sorted((p.name for p in faces.iterdir()), key=natural_key)
    photos = [n for n in entries if (faces / n).is_file() and Path(n).suffix.lower() in IMAGE_SUFFIXES]
    if len(photos) < len(entries):
        warnings.warn(f"--benchmark {name} {faces}: {len(entries) - len(photos)} entries are no photo "
                      f"({', '.join(IMAGE_SUFFIXES)}), ignored: {sorted(set(entries) - set(photos))[:8]}", stacklevel=3)
    if not photos:
        raise ValueError(f"--benchmark {name} {faces}: no photo ({', '.join(IMAGE_SUFFIXES)})")
    bad = [n for n in photos if not n.split("_")[0].isdigit()]
    if bad:
        raise ValueError(f"--benchmark {name} {faces}: photo names start with their number and '_' "
                         f"(their script reads int(name.split('_')[0])): {bad[:8]}")
    out = []
    for photo in photos:
        column = "Refined_woman" if "woman" in photo else "Refined_man"
        for r in rows:
            index = str(int(r["index"])) if as_int else r["index"]
            out.append(Case(f"{photo}--{index}", r[column].replace("{class_token}", r["Class"]), faces / photo))
    ids = [c.id for c in out]
    if len(set(ids)) < len(ids):
        raise ValueError(f"--benchmark {name} {path}: the index column repeats a value, so two cases would share "
                         f"a video name: {sorted({i for i in ids if ids.count(i) > 1})[:8]}")
    return out


def _opens2v_cases(name: str, root: Path) -> list[Case]:
    """OpenS2V-Eval's Human-Domain cases with a reference photo, in the JSON's order. A case without such a
    reference is skipped with a warning (their script skips it too); a named reference that is absent, a JSON
    that is absent or not in the layout is a ValueError / FileNotFoundError naming it."""
    path = root / OPENS2V_JSON
    if not path.is_file():
        raise FileNotFoundError(f"--benchmark {name} {root}: no {OPENS2V_JSON} ({LAYOUT})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--benchmark {name} {path}: not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--benchmark {name} {path}: expected an object of case id -> case, got "
                         f"{type(data).__name__} ({LAYOUT})")
    out, no_ref = [], []
    for cid, case in data.items():
        if not any(k in cid for k in OPENS2V_HUMAN):
            continue
        if not isinstance(case, dict) or not isinstance(case.get("prompt"), str):
            raise ValueError(f"--benchmark {name} {path}: case {cid!r} needs a string 'prompt' ({LAYOUT})")
        refs = [p for p in case.get("img_paths", []) if isinstance(p, str) and any(d in p for d in OPENS2V_REF_DIRS)]
        if not refs:
            no_ref.append(cid)
            continue
        ref = root / refs[0]
        if not ref.is_file():
            raise ValueError(f"--benchmark {name} {path}: case {cid!r}: reference {ref} does not exist")
        out.append(Case(cid, case["prompt"], ref))
    if no_ref:
        warnings.warn(f"--benchmark {name}: {len(no_ref)} Human-Domain case(s) have no reference under "
                      f"{'/'.join(OPENS2V_REF_DIRS)} and are skipped, as their script does: {no_ref[:8]}", stacklevel=2)
    if not out:
        raise ValueError(f"--benchmark {name} {path}: no Human-Domain case ({', '.join(OPENS2V_HUMAN)}) with a "
                         "reference photo")
    return out


def pairs(name: str, root, videos) -> list[Pair]:
    """Each benchmark case that has a video ``<id>`` in ``videos`` paired with its reference and prompt. Videos
    of other names are ignored and cases without a video left out, each with a warning; none at all is an error."""
    found = list_videos(Path(videos))
    todo = cases(name, root)
    ids = {c.id for c in todo}
    out = [Pair(c.id, found[c.id], c.ref, c.prompt) for c in todo if c.id in found]
    other = sorted(set(found) - ids)
    if other:
        warnings.warn(f"--videos {videos}: {len(other)} video(s) are no case of {name}, ignored: "
                      f"{other[:8]}", stacklevel=2)
    if not out:
        raise ValueError(f"--videos {videos}: no video named after a {name} case id (e.g. {todo[0].id}.mp4)")
    if len(out) < len(todo):
        missing = [c.id for c in todo if c.id not in found]
        warnings.warn(f"--benchmark {name}: {len(missing)} of {len(todo)} cases have no video in {videos}; "
                      f"the means cover the others only; missing: {missing[:8]}", stacklevel=2)
    return out
