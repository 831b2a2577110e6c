"""Published benchmark folders, read in the layout they are distributed in (``--benchmark NAME DIR`` of
``python -m mm_jax.evaluate`` and ``benchmarks/eval_prompts.py``).

OpenS2V-Eval (the Hugging Face dataset BestWishYsh/OpenS2V-Eval; PKU-YuanGroup/OpenS2V-Nexus ``eval/``)::

    DIR/Images/...                 reference photos
    DIR/Human-Domain_Eval.json     {"<case id>": {"prompt": "...", "img_paths": ["Images/.../man/x.jpg", ...]}, ...}

The Human-Domain cases are the ids containing ``singlehuman``, ``singleface``, ``faceobj`` or ``humanobj`` (the
filter of ``eval/get_facesim.py``); a case's reference is its first ``img_paths`` entry under a ``/man/``,
``/woman/``, ``/crop_man/`` or ``/crop_woman/`` folder, relative to DIR (their ``get_image_path_from_json``), its
prompt the ``prompt`` field (``eval/get_gmescore.py``). The generated video of a case is ``<case id>.mp4``. The
published numbers were sampled with seed 42 (``protocols.PROTOCOLS["opens2v"].seed``).

ConsisID's evaluation set is not read: its layout is not described in the project's design notes.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

from mm_jax.metrics.pairing import Pair, list_videos

NAMES = ("opens2v",)
OPENS2V_JSON = "Human-Domain_Eval.json"
OPENS2V_HUMAN = ("singlehuman", "singleface", "faceobj", "humanobj")
OPENS2V_REF_DIRS = ("/man/", "/woman/", "/crop_woman/", "/crop_man/")
LAYOUT = "the layout of BestWishYsh/OpenS2V-Eval: DIR/Images/..., DIR/Human-Domain_Eval.json"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str         # the case id; its video is <id>.mp4
    prompt: str
    ref: Path       # the reference photo (absolute or relative to the working directory)


def _check(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"--benchmark {name!r}: known benchmarks are {list(NAMES)} (ConsisID's evaluation set "
                         "layout is not described in the design notes, so it is not read)")


def cases(name: str, root) -> list[Case]:
    """The benchmark's Human-Domain cases with a reference photo, in the JSON's order. A case without such a
    reference is skipped with a warning (their script skips it too); a named reference that is absent, a JSON
    that is absent or not in the layout is a ValueError / FileNotFoundError naming it."""
    _check(name)
    root = Path(root)
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
        warnings.warn(f"--videos {videos}: {len(other)} video(s) are no Human-Domain case of {name}, ignored: "
                      f"{other[:8]}", stacklevel=2)
    if not out:
        raise ValueError(f"--videos {videos}: no video named after a {name} case id (e.g. {todo[0].id}.mp4)")
    if len(out) < len(todo):
        warnings.warn(f"--benchmark {name}: {len(todo) - len(out)} of {len(todo)} cases have no video in {videos}; "
                      "the means cover the others only", stacklevel=2)
    return out
