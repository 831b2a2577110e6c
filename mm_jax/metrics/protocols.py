"""Named evaluation protocols (``python -m mm_jax.evaluate --protocol NAME``): what each peer's
evaluation computes, as data. A protocol names the face pack and detector size its reference script
uses, which frames each metric reads, and the metrics it reports; a metric whose model is not ported
yet is listed under ``not_computed`` with the reason and reported as null, never dropped.

Frame rules (``frame_indices``), N the number of decoded frames:

* ``linspace``: ``np.linspace(0, N - 1, k, dtype=int)`` (truncation; for N < k indices repeat and
  every repeat is read, as ConsisID's ``get_facesim_fid.py`` reads them).
* ``strided``: ``int(i * N / k)`` for i < k (ConsisID's ``get_clipscore.py``).
* ``all``: every frame.
* ``every``: frames ``0, k, 2k, ...`` with ``k = max(1, round(fps / count))`` (VBench's dynamic degree, count 8;
  needs the video's fps, ``dynamic_degree.frame_interval``).

``ours`` is today's default evaluation (``mm_jax/metrics/video_eval.py``), not described here.
"""
from __future__ import annotations

import dataclasses

import numpy as np

CURRICULARFACE = ("needs --curricularface PATH: the .safetensors that tools/convert_weights/curricularface_save.py "
                  "writes from ConsisID's face_encoder/glint360k_curricular_face_r101_backbone.bin")
INCEPTION = ("needs --inception PATH: the .safetensors that tools/convert_weights/inception_v3.py writes from "
             "torchvision's inception_v3_google-0cc3c7bd.pth (--out); ConsisID's per-frame 'FID' with one activation "
             "per side is the squared L2 distance of the 2048-d features")
RAFT = ("needs --raft PATH: the .safetensors that tools/convert_weights/raft.py writes from princeton-vl/RAFT's "
        "raft-things.pth (--out); VBench's rule: 20 iterations, top-5% flow, threshold 6*min(H,W)/256")


@dataclasses.dataclass(frozen=True)
class FrameRule:
    kind: str          # "linspace" | "strided" | "all" | "every"
    count: int = 0     # frames chosen (linspace, strided); target fps (every)

    def describe(self) -> str:
        return {"linspace": f"np.linspace(0, N-1, {self.count}, dtype=int)",
                "strided": f"int(i*N/{self.count}) for i < {self.count}", "all": "all N frames",
                "every": f"every max(1, round(fps/{self.count}))-th frame"}[self.kind]


@dataclasses.dataclass(frozen=True)
class Protocol:
    name: str
    compares_with: str                   # the paper table (and version) whose numbers this reproduces
    reference_code: str
    metrics: tuple[str, ...]             # reported metric names, in table order
    frames: dict                         # metric -> FrameRule
    not_computed: dict                   # metric -> why it is null
    reimplemented: dict = dataclasses.field(default_factory=dict)  # metric -> why it is not the peer's code
    enabled_by: dict = dataclasses.field(default_factory=dict)  # metric in not_computed -> the CLI argument
    #                                                            (argparse dest) whose model path computes it
    face_pack: str = "buffalo_l"         # the insightface pack the reference script loads
    det_size: int = 640                  # detector input (square)
    det_thresh: float = 0.5
    needs_clip: bool = False             # a CLIP checkpoint (--clip) is required
    seed: int | None = None              # the sampling seed the published numbers used (benchmarks)
    notes: str = ""

    def computed(self) -> tuple[str, ...]:
        return tuple(m for m in self.metrics if m not in self.not_computed)

    def not_computed_with(self, args) -> dict:
        """``not_computed`` less the metrics whose model path (``enabled_by``) ``args`` gives."""
        return {m: why for m, why in self.not_computed.items()
                if not (m in self.enabled_by and getattr(args, self.enabled_by[m], None))}

    def describe(self) -> dict:
        """The protocol as it goes into the JSON report."""
        return {"name": self.name, "compares_with": self.compares_with, "reference_code": self.reference_code,
                "face_pack": self.face_pack, "det_size": self.det_size, "det_thresh": self.det_thresh,
                "frames": {m: r.describe() for m, r in self.frames.items()},
                "reimplemented": dict(self.reimplemented), "seed": self.seed, "notes": self.notes}


PROTOCOLS = {
    "consisid": Protocol(
        name="consisid",
        compares_with="ConsisID (arXiv 2411.17440v3) Table 1",
        reference_code="PKU-YuanGroup/ConsisID eval/get_facesim_fid.py, eval/get_clipscore.py",
        metrics=("facesim_arc", "facesim_cur", "clipscore", "face_fid"),
        frames={"facesim_arc": FrameRule("linspace", 16), "facesim_cur": FrameRule("linspace", 16),
                "face_fid": FrameRule("linspace", 16), "clipscore": FrameRule("strided", 16)},
        not_computed={"facesim_cur": CURRICULARFACE, "face_fid": INCEPTION},
        enabled_by={"facesim_cur": "curricularface", "face_fid": "inception"},
        det_size=320, needs_clip=True, seed=42,
        notes="Videos of ConsisID's eval set sampled with seed 42 (eval/eval_all_in_once.py's default). "
              "facesim_arc: largest face (last of equal areas), else the frame padded 25% with grey 128 and "
              "retried; per frame max(cos(ref, frame), 0); frames without a face skipped; a video without any "
              "face scores 0. facesim_cur: the same faces, norm_crop(kps, 224) of the unpadded image -> RGB -> "
              "112 -> CurricularFace IR-101, max(cos, 0), mean over the frames with a face (0 without one). "
              "face_fid: the same 224 crops (reference and each frame with a face) resized to 299 (PIL bilinear), "
              "ToTensor, Inception v3 pooled features; with one activation per side the script's FID is the squared L2 "
              "distance of the two feature vectors; mean over the frames with a face (0 without one). "
              "clipscore: the frames fed as BGR arrays (as their script does), prompt truncated "
              "to 77 tokens, mean over frames of logits_per_image = exp(logit_scale) * cos (100 * cos for "
              "openai/clip-vit-base-patch32), no clamp. Means over videos count every video."),
    "opens2v": Protocol(
        name="opens2v",
        compares_with="OpenS2V-Eval (arXiv 2505.20292) Human-Domain leaderboard",
        reference_code="PKU-YuanGroup/OpenS2V-Nexus eval/get_facesim.py",
        metrics=("facesim_cur", "facesim_arc", "gmescore", "nexusscore", "naturalscore"),
        frames={"facesim_cur": FrameRule("linspace", 32), "facesim_arc": FrameRule("linspace", 32)},
        not_computed={"facesim_cur": CURRICULARFACE,
                      "gmescore": "needs GME-Qwen2-VL-7B, a 7B multimodal model with no port here",
                      "nexusscore": "needs YOLO-World + CLIP + GME-Qwen2-VL-7B, no port here",
                      "naturalscore": "needs the GPT-4o API (a hosted service; nothing is sent off this machine)"},
        enabled_by={"facesim_cur": "curricularface"},
        det_size=320, seed=42,
        notes="Videos sampled with seed 42 (the benchmark's). The face rule of consisid (buffalo_l at 320, "
              "largest face, grey-pad retry, clamp, faceless frames skipped, 0 without a face) over 32 decord linspace frames. facesim_cur (published, in percent) "
              "drops zero scores from the mean; facesim_arc keeps them (the script's zero check tests the list, "
              "`arc_scores != 0.0`); not published on the leaderboard. A reference without a face is an error "
              "here (exit 2); the script skips that video."),
    "magicmirror": Protocol(
        name="magicmirror",
        compares_with="Magic Mirror (arXiv 2501.03931v2) Table 1",
        reference_code="VBench vbench/dynamic_degree.py (dynamic degree); FM_ref/FM_inter have no published code",
        metrics=("dynamic_degree", "fm_ref", "fm_inter"),
        frames={"dynamic_degree": FrameRule("every", 8), "fm_ref": FrameRule("all"), "fm_inter": FrameRule("all")},
        not_computed={"dynamic_degree": RAFT},
        enabled_by={"dynamic_degree": "raft"},
        reimplemented={m: "re-implementation: the paper describes FM_ref/FM_inter without code or normalization; "
                          "ours (mm_jax/metrics/face_metrics.py) normalizes by the inter-ocular distance, so the "
                          "scale may differ from the published numbers" for m in ("fm_ref", "fm_inter")},
        det_size=640,
        notes="dynamic_degree (VBench): frames 0, k, 2k, ... with k = max(1, round(fps/8)) (fps from the mp4, else "
              "--fps), padded to multiples of 8 by edge replication, RAFT raft-things 20 iterations per consecutive "
              "pair, pair score = mean of the top 5% flow magnitudes; a video is dynamic when at least round(4n/16) "
              "pair scores (n kept frames) exceed 6*min(H,W)/256; per video 1.0 (dynamic) or 0.0, the mean over videos "
              "is the published fraction. fm_ref/fm_inter over all frames with a face, as `--protocol ours` computes "
              "them."),
}

NAMES = ("ours",) + tuple(PROTOCOLS)


def get(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol {name!r}: known protocols are {list(NAMES)}")
    return PROTOCOLS[name]


def frame_indices(rule: FrameRule, n: int) -> np.ndarray:
    """The frame indices a rule reads from a video of ``n`` frames (repeats kept)."""
    if n < 1:
        raise ValueError(f"a video of {n} frames: needs at least 1")
    if rule.kind == "linspace":
        return np.linspace(0, n - 1, rule.count, dtype=int)
    if rule.kind == "strided":
        return np.array([int(i * n / rule.count) for i in range(rule.count)], dtype=int)
    if rule.kind == "all":
        return np.arange(n)
    if rule.kind == "every":
        raise ValueError("frame rule 'every' depends on the video's fps: use dynamic_degree.frame_interval")
    raise ValueError(f"frame rule {rule.kind!r}: allowed 'linspace', 'strided', 'all'")
