"""Evaluation outputs: a printed table, the JSON report, a CSV, and per-video ID-similarity plots
(PNG drawn with OpenCV, already a core dependency)."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

CSV_COLUMNS = ("name", "video", "ref", "prompt", "frames", "frames_with_face", "face_fraction", "id_sim",
               "id_sim_detected", "fm_ref", "fm_inter", "fm_inter_pairs", "clip_text_alignment",
               "dynamic_degree", "frames_without_face")
TABLE = (("name", 24, "s"), ("frames", 6, "d"), ("face", 6, ".2f"), ("id_sim", 7, ".4f"), ("id_det", 7, ".4f"),
         ("fm_ref", 7, ".4f"), ("fm_inter", 8, ".4f"), ("clip_t", 7, ".2f"))
TABLE_KEYS = ("name", "frames", "face_fraction", "id_sim", "id_sim_detected", "fm_ref", "fm_inter",
              "clip_text_alignment")


def build_report(rows: list[dict], mean: dict, absent: dict, definitions: str, settings: dict) -> dict:
    return {"videos": rows, "mean": mean, "absent": absent, "definitions": definitions, "settings": settings}


def _cell(v, width, fmt):
    if v is None:
        return "-".rjust(width)
    if fmt == "s":
        s = str(v)
        return (s if len(s) <= width else s[:width - 1] + "~").ljust(width)
    return format(v, fmt).rjust(width)


def format_table(rows: list[dict], mean: dict) -> str:
    """Per-video rows and a mean row; '-' where a metric is undefined (e.g. no face)."""
    head = " ".join(h.ljust(w) if f == "s" else h.rjust(w) for h, w, f in TABLE)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(" ".join(_cell(r.get(k), w, f) for k, (_, w, f) in zip(TABLE_KEYS, TABLE)))
    lines.append("-" * len(head))
    mean_row = dict(mean, name=f"mean ({mean['videos']})", frames=sum(r["frames"] for r in rows))
    lines.append(" ".join(_cell(mean_row.get(k), w, f) for k, (_, w, f) in zip(TABLE_KEYS, TABLE)))
    return "\n".join(lines)


def write_json(path: Path, report: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def write_csv(path: Path, rows: list[dict], mean: dict) -> Path:
    """One line per video and a last 'mean' line; empty cells where a value is null."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS)
        w.writeheader()
        for r in rows:
            rec = {k: r.get(k) for k in CSV_COLUMNS}
            rec["frames_without_face"] = " ".join(map(str, r["frames_without_face"]))
            w.writerow({k: "" if v is None else v for k, v in rec.items()})
        w.writerow({k: "" if mean.get(k) is None else mean.get(k) for k in CSV_COLUMNS} | {"name": "mean"})
    return path


def plot_id_similarity(path: Path, name: str, id_sim: list[float], found: list[bool],
                       size: tuple[int, int] = (640, 320)) -> Path:
    """A PNG line plot of per-frame ID similarity (y from min(0, lowest) to 1); frames without a face
    (counted as 0) are red crosses. Drawn with OpenCV."""
    import cv2

    w, h = size
    left, right, top, bottom = 48, 16, 28, 28
    img = np.full((h, w, 3), 255, np.uint8)
    sim = np.asarray(id_sim, np.float64)
    lo = min(0.0, float(sim.min()) if sim.size else 0.0)
    px = lambda i: int(round(left + (w - left - right) * (i / max(len(sim) - 1, 1))))
    py = lambda v: int(round(top + (h - top - bottom) * (1.0 - (v - lo) / (1.0 - lo))))
    for v in sorted({lo, 0.0, 0.5, 1.0}):  # grid lines with labels
        cv2.line(img, (left, py(v)), (w - right, py(v)), (210, 210, 210), 1)
        cv2.putText(img, f"{v:.1f}", (4, py(v) + 4), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    pts = np.array([[px(i), py(v)] for i, v in enumerate(sim)], np.int32)
    if len(pts) > 1:
        cv2.polylines(img, [pts], False, (200, 90, 20), 2, cv2.LINE_AA)
    for i, (v, f) in enumerate(zip(sim, found)):
        if f:
            cv2.circle(img, (px(i), py(v)), 3, (200, 90, 20), -1, cv2.LINE_AA)
        else:
            c = (px(i), py(v))
            cv2.line(img, (c[0] - 4, c[1] - 4), (c[0] + 4, c[1] + 4), (30, 30, 220), 2)
            cv2.line(img, (c[0] - 4, c[1] + 4), (c[0] + 4, c[1] - 4), (30, 30, 220), 2)
    mean = float(sim.mean()) if sim.size else float("nan")
    cv2.putText(img, f"{name}: ID similarity per frame (mean {mean:.3f}; x = no face)", (left, 18),
                cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, f"frame 0..{max(len(sim) - 1, 0)}", (left, h - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (80, 80, 80), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), img):
        raise ValueError(f"cannot write plot {path}")
    return path
