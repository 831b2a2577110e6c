"""Published numbers per protocol (``--compare published``), each table with its source, and the
side-by-side table printed next to a user's means.

Numbers as printed in the papers: ConsisID Table 1 (30 identities x 5 images, 90 prompts, 50 DPM
steps, CFG 6), Magic Mirror v2 Table 1 (its ID/Decay use dlib face_recognition, its Text/IS other
models: columns we do not compute print as '-'), OpenS2V-Eval Human-Domain (FaceSim-Cur in percent;
``scale`` 100 turns our fraction into the published unit).
"""
from __future__ import annotations

TABLES = {
    "consisid": {
        "source": "ConsisID (arXiv 2411.17440v3) Table 1",
        "columns": {"facesim_arc": "FaceSim-Arc", "facesim_cur": "FaceSim-Cur", "clipscore": "CLIPScore",
                    "face_fid": "FID"},
        "rows": [{"model": "ConsisID", "facesim_arc": 0.58, "facesim_cur": 0.60, "clipscore": 27.93,
                  "face_fid": 151.82},
                 {"model": "ID-Animator", "facesim_arc": 0.32, "facesim_cur": 0.33, "clipscore": 24.97,
                  "face_fid": 117.46}],
    },
    "magicmirror": {
        "source": "Magic Mirror (arXiv 2501.03931v2) Table 1",
        "columns": {"dynamic_degree": "DD", "text_alignment": "Text", "inception_score": "IS",
                    "smoothness": "Smooth", "id_sim_dlib": "ID", "id_decay": "Decay", "fm_ref": "FM_ref",
                    "fm_inter": "FM_inter"},
        "rows": [
            {"model": "ConsisID", "dynamic_degree": 0.615, "text_alignment": 0.236, "inception_score": 11.09,
             "smoothness": 0.513, "id_sim_dlib": 0.913, "id_decay": 0.002, "fm_ref": 0.652, "fm_inter": 0.601},
            {"model": "MagicMirror", "dynamic_degree": 0.705, "text_alignment": 0.240, "inception_score": 10.59,
             "smoothness": 0.484, "id_sim_dlib": 0.922, "id_decay": 0.002, "fm_ref": 0.730, "fm_inter": 0.610},
            {"model": "CogVideoX-I2V", "dynamic_degree": 0.660, "text_alignment": 0.213, "inception_score": 9.85,
             "smoothness": 0.497, "id_sim_dlib": 0.901, "id_decay": 0.029, "fm_ref": 0.413, "fm_inter": 0.532},
            {"model": "ID-Animator", "dynamic_degree": 0.140, "text_alignment": 0.211, "inception_score": 7.57,
             "smoothness": 0.515, "id_sim_dlib": 0.923, "id_decay": 0.005, "fm_ref": 0.652, "fm_inter": 0.181}],
    },
    "opens2v": {
        "source": "OpenS2V-Eval (arXiv 2505.20292) Human-Domain, FaceSim-Cur in percent",
        "columns": {"facesim_cur": "FaceSim-Cur"},
        "scale": {"facesim_cur": 100.0},
        "rows": [{"model": "ConsisID", "facesim_cur": 43.14}, {"model": "Concat-ID", "facesim_cur": 43.83},
                 {"model": "EchoVideo", "facesim_cur": 48.57}, {"model": "Hailuo", "facesim_cur": 57.79}],
    },
}


def table(protocol: str) -> dict:
    if protocol not in TABLES:
        raise ValueError(f"--compare published: no published table for --protocol {protocol!r}; "
                         f"tables exist for {sorted(TABLES)}")
    return TABLES[protocol]


def compare_rows(protocol: str, mean: dict, label: str = "yours") -> list[dict]:
    """The published rows and, last, the user's means in the table's units (None where not computed)."""
    t = table(protocol)
    scale = t.get("scale", {})
    yours = {"model": label}
    for k in t["columns"]:
        v = mean.get(k)
        yours[k] = None if v is None else v * scale.get(k, 1.0)
    return [dict(r) for r in t["rows"]] + [yours]


def format_compare(protocol: str, mean: dict, label: str = "yours") -> str:
    """A text table: one line per published row and one for the user's means; '-' = not computed."""
    t = table(protocol)
    cols = list(t["columns"])
    heads = ["model"] + [t["columns"][c] for c in cols]
    widths = [max(14, len(label))] + [max(9, len(h)) for h in heads[1:]]
    cell = lambda v, w: ("-" if v is None else f"{v:.4g}").rjust(w)
    lines = [f"published: {t['source']}", " ".join(h.ljust(w) if i == 0 else h.rjust(w)
                                                   for i, (h, w) in enumerate(zip(heads, widths)))]
    for r in compare_rows(protocol, mean, label):
        lines.append(" ".join([r["model"].ljust(widths[0])] + [cell(r[c], w) for c, w in zip(cols, widths[1:])]))
    return "\n".join(lines)
