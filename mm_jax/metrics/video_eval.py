"""Run the face front end over paired videos and references: each reference analyzed once, each
video decoded once and its frames sent through the detector and (in batches) the recognizer."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from mm_jax.face import FaceAnalyzer, NoFaceError
from mm_jax.metrics.face_metrics import video_face_metrics
from mm_jax.metrics.pairing import Pair

# Optional metrics; the report carries them as null with these reasons when they are not computed.
ABSENT = {
    "clip_text_alignment": "not computed: pass --clip DIR (a CLIP model converted with "
                           "tools/convert_weights/from_torch.py --components clip) and prompts",
    "dynamic_degree": "not computed by --protocol ours: use --protocol magicmirror --raft PATH (VBench's rule on "
                      "the RAFT port)",
}
NO_PROMPT = "not computed for this video: it has no prompt (--prompts or the manifest's prompt)"


def absent_metrics(text_alignment=None) -> dict:
    """{metric: why it is null} for the optional metrics this run does not compute."""
    return {k: v for k, v in ABSENT.items() if not (k == "clip_text_alignment" and text_alignment is not None)}


def analyze_references(pairs: Iterable[Pair], analyzer: FaceAnalyzer) -> dict:
    """ref path -> FaceResult, each reference once. No face -> ValueError naming the image and the
    videos paired with it (the metrics are undefined without the reference's face)."""
    out = {}
    for p in pairs:
        if p.ref in out:
            continue
        try:
            out[p.ref] = analyzer.analyze(p.ref, name=str(p.ref))
        except NoFaceError as e:
            users = [q.video.name for q in pairs if q.ref == p.ref]
            raise ValueError(f"reference {p.ref} (for {users}): {e}") from None
    return out


def load_frames(path) -> np.ndarray:
    """(F, H, W, 3) uint8 of a video, with a ValueError naming the file when it cannot be decoded."""
    from mm_jax.video_io import read_video

    try:
        frames = np.asarray(read_video(path))
    except Exception as e:  # decoder errors come in many types
        raise ValueError(f"cannot read video {path}: {e}") from None
    if frames.ndim != 4 or frames.shape[0] == 0 or frames.shape[-1] != 3:
        raise ValueError(f"video {path}: decoded to shape {frames.shape}; expected (F >= 1, H, W, 3) frames")
    return frames


def evaluate_video(frames: np.ndarray, ref, analyzer: FaceAnalyzer, batch_size: int = 32, pbar=None) -> dict:
    """Face metrics of frames (F, H, W, 3) uint8 against a reference ``FaceResult``; frames go through
    ``analyze_frames`` ``batch_size`` at a time (one recognizer run per batch)."""
    embs, found, kps = [], [], []
    for i in range(0, len(frames), batch_size):
        faces = analyzer.analyze_frames(list(frames[i:i + batch_size]))
        embs.append(faces.embedding), found.append(faces.found), kps.append(faces.kps)
        if pbar is not None:
            pbar.update(len(faces.found))
    return video_face_metrics(np.concatenate(embs), np.concatenate(found), np.concatenate(kps),
                              ref.embedding, ref.kps)


def evaluate_pairs(pairs: list[Pair], analyzer: FaceAnalyzer, batch_size: int = 32, progress: bool = True,
                   text_alignment=None) -> list[dict]:
    """One result row per pair: name, files, prompt, the face metrics and the optional metrics
    (``text_alignment``: a ``metrics.text_alignment.TextAlignment``, or None). Each video is decoded
    once; its frames serve every metric."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    refs = analyze_references(pairs, analyzer)
    rows = []
    with tqdm(total=0, unit="frame", desc="evaluate", disable=not progress) as pbar:
        for p in pairs:
            frames = load_frames(p.video)
            pbar.total += len(frames)
            pbar.set_postfix_str(p.name)
            pbar.refresh()
            m = evaluate_video(frames, refs[p.ref], analyzer, batch_size, pbar)
            row = {"name": p.name, "video": str(p.video), "ref": str(p.ref), "prompt": p.prompt,
                   "ref_faces": refs[p.ref].num_faces, **m, **{k: None for k in ABSENT}}
            if text_alignment is not None:
                if p.prompt:
                    ta = text_alignment.score(frames, p.prompt)
                    row["clip_text_alignment"] = ta["clip_text_alignment"]
                    row["per_frame"]["clip_text_alignment"] = ta["per_frame"]
                else:
                    row.setdefault("absent", {})["clip_text_alignment"] = NO_PROMPT
            rows.append(row)
    return rows
