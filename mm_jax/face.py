"""Face front end: SCRFD detection, 5-point alignment, ArcFace identity embedding, CLIP face crop.

Models come from a local insightface model pack (``--face-models DIR``: a folder of .onnx files,
or ``DIR/models/<pack>/*.onnx``), run with onnxruntime on the CPU; nothing is downloaded. The
detector and the recognizer are told apart by their input/output signatures, as insightface's
model zoo does (>= 5 outputs: SCRFD; one output from a square input >= 112: ArcFace). Detection
decoding, NMS and alignment are our own numpy code (checked against insightface in the tests).
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)  # 112x112
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PACK_HELP = ("an insightface model pack: a folder with an SCRFD detector and an ArcFace recognizer, e.g. "
             "antelopev2/{scrfd_10g_bnkps.onnx, glintr100.onnx} or buffalo_l/{det_10g.onnx, w600k_r50.onnx}")


class NoFaceError(ValueError):
    """No face was found in an image (the message names the image)."""


@dataclasses.dataclass
class FaceResult:
    bbox: np.ndarray          # (4,) x1, y1, x2, y2 in image pixels
    score: float
    kps: np.ndarray           # (5, 2) eyes, nose, mouth corners
    embedding: np.ndarray     # (512,) L2-normalized ArcFace embedding (e_id)
    clip_crop: np.ndarray     # (224, 224, 3) float32 RGB, CLIP-normalized
    num_faces: int


# -- geometry (pure numpy) ---------------------------------------------------------------------

def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama) mapping src points to dst: a 2x3 matrix."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    var_s = (s_c ** 2).sum() / len(src)
    scale = (sig * d).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]]).astype(np.float32)


def distance2bbox(points, dist):
    return np.stack([points[:, 0] - dist[:, 0], points[:, 1] - dist[:, 1],
                     points[:, 0] + dist[:, 2], points[:, 1] + dist[:, 3]], axis=-1)


def distance2kps(points, dist):
    out = np.empty_like(dist)
    out[:, 0::2] = points[:, :1] + dist[:, 0::2]
    out[:, 1::2] = points[:, 1:2] + dist[:, 1::2]
    return out


def nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS over (N, 5) [x1, y1, x2, y2, score] with insightface's +1 pixel areas."""
    x1, y1, x2, y2, s = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-s, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[order[1:]]) - np.maximum(x1[i], x1[order[1:]]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[order[1:]]) - np.maximum(y1[i], y1[order[1:]]) + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[1:][ovr <= thresh]
    return keep


# -- models ------------------------------------------------------------------------------------

def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _is_mxnet_export(path: Path) -> bool:
    try:
        import onnx

        nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
        return any(n.name.startswith(("Sub", "_minus")) or n.name.startswith(("Mul", "_mul")) for n in nodes)
    except Exception:
        return False


class FaceModels:
    """The detector and recognizer sessions of a local model pack."""

    def __init__(self, detector, recognizer, rec_mean: float, rec_std: float, folder: Path):
        self.detector, self.recognizer = detector, recognizer
        self.rec_mean, self.rec_std, self.folder = rec_mean, rec_std, folder

    @classmethod
    def load(cls, folder: str | Path) -> "FaceModels":
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"--face-models {folder}: no such folder; expected {PACK_HELP}")
        files = sorted(folder.glob("*.onnx")) or sorted(folder.glob("models/*/*.onnx")) or sorted(folder.glob("*/*.onnx"))
        det = rec = None
        rec_path = None
        for f in files:
            try:
                s = _session(f)
            except Exception as e:
                raise ValueError(f"face model {f} cannot be loaded by onnxruntime: {e}") from None
            ins, outs = s.get_inputs(), s.get_outputs()
            shape = ins[0].shape
            if len(outs) >= 5 and det is None:
                det = s
            elif (len(outs) == 1 and len(shape) == 4 and isinstance(shape[2], int) and shape[2] == shape[3]
                  and shape[2] >= 112 and shape[2] % 16 == 0 and rec is None):
                rec, rec_path = s, f
        missing = [n for n, m in (("an SCRFD detector", det), ("an ArcFace recognizer", rec)) if m is None]
        if missing:
            raise FileNotFoundError(f"--face-models {folder}: found no {' and no '.join(missing)} among "
                                    f"{[f.name for f in files] or 'no .onnx files'}; expected {PACK_HELP}")
        mx = _is_mxnet_export(rec_path)
        return cls(det, rec, 0.0 if mx else 127.5, 1.0 if mx else 127.5, folder)


def read_image(path_or_array) -> np.ndarray:
    """BGR uint8 (H, W, 3) from a path, or an RGB array passed in (converted to BGR)."""
    if isinstance(path_or_array, np.ndarray):
        img = path_or_array
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return np.ascontiguousarray(img[..., :3][..., ::-1]).astype(np.uint8)
    import cv2

    path = Path(path_or_array)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.exists() else None
    if img is None:
        raise ValueError(f"cannot read image {path}: " + ("no such file" if not path.exists() else "not a decodable image"))
    return img


class FaceAnalyzer:
    """Detect, align and embed faces with a local model pack."""

    def __init__(self, models: FaceModels | str | Path, det_size: int = 640, det_thresh: float = 0.5,
                 nms_thresh: float = 0.4):
        self.models = models if isinstance(models, FaceModels) else FaceModels.load(models)
        self.det_size, self.det_thresh, self.nms_thresh = det_size, det_thresh, nms_thresh
        outs = self.models.detector.get_outputs()
        self.fmc = 3 if len(outs) in (6, 9) else 5
        self.strides = (8, 16, 32) if self.fmc == 3 else (8, 16, 32, 64, 128)
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.use_kps = len(outs) in (9, 15)

    # detection ---------------------------------------------------------------------------------
    def detect(self, img_bgr: np.ndarray):
        """-> boxes (N, 5) [x1, y1, x2, y2, score] sorted by score after NMS, kps (N, 5, 2)."""
        import cv2

        size = self.det_size
        h0, w0 = img_bgr.shape[:2]
        if h0 / w0 > 1.0:
            nh, nw = size, int(size / (h0 / w0))
        else:
            nw, nh = size, int(size * (h0 / w0))
        scale = nh / h0
        canvas = np.zeros((size, size, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(img_bgr, (nw, nh))
        blob = ((canvas[..., ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]
        sess = self.models.detector
        outs = sess.run(None, {sess.get_inputs()[0].name: blob})
        dets, kpss = [], []
        for k, stride in enumerate(self.strides):
            scores = outs[k].reshape(-1)
            boxes = outs[k + self.fmc].reshape(-1, 4) * stride
            g = size // stride
            centers = (np.stack(np.mgrid[:g, :g][::-1], axis=-1).astype(np.float32) * stride).reshape(-1, 2)
            centers = np.repeat(centers, self.num_anchors, axis=0)
            pos = np.where(scores >= self.det_thresh)[0]
            dets.append(np.hstack([distance2bbox(centers, boxes)[pos] / scale, scores[pos, None]]))
            if self.use_kps:
                kps = outs[k + 2 * self.fmc].reshape(-1, 10) * stride
                kpss.append(distance2kps(centers, kps)[pos].reshape(-1, 5, 2) / scale)
        dets = np.vstack(dets).astype(np.float32)
        kps = np.vstack(kpss).astype(np.float32) if kpss else np.zeros((len(dets), 5, 2), np.float32)
        order = np.argsort(-dets[:, 4], kind="stable")
        dets, kps = dets[order], kps[order]
        keep = nms(dets, self.nms_thresh) if len(dets) else []
        return dets[keep], kps[keep]

    # alignment and embedding -----------------------------------------------------------------------
    @staticmethod
    def align(img_bgr: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
        """The ArcFace template scaled to ``size`` (112: ArcFace, 224: CLIP), BGR uint8 crop."""
        import cv2

        m = similarity_transform(kps, ARCFACE_TEMPLATE * (size / 112.0))
        return cv2.warpAffine(img_bgr, m, (size, size), borderValue=0.0)

    def embed_crops(self, crops_bgr: Sequence[np.ndarray]) -> np.ndarray:
        """Aligned 112x112 BGR crops -> (N, 512) L2-normalized embeddings, one onnxruntime batch."""
        if len(crops_bgr) == 0:
            return np.zeros((0, 512), np.float32)
        m = self.models
        blob = ((np.stack(crops_bgr)[..., ::-1].astype(np.float32) - m.rec_mean) / m.rec_std).transpose(0, 3, 1, 2)
        sess = m.recognizer
        feats = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(blob)})[0]
        return (feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    @staticmethod
    def clip_pixels(crop_bgr: np.ndarray) -> np.ndarray:
        return ((crop_bgr[..., ::-1].astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)

    def analyze(self, image, name: str | None = None) -> FaceResult:
        """The largest face of an image (path or RGB array): box, landmarks, e_id and CLIP crop."""
        label = name or (str(image) if not isinstance(image, np.ndarray) else "<array>")
        img = read_image(image)
        dets, kps = self.detect(img)
        if len(dets) == 0:
            raise NoFaceError(f"no face found in {label}")
        areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
        i = int(np.argmax(areas))
        if len(dets) > 1:
            warnings.warn(f"{len(dets)} faces found in {label}; using the largest", stacklevel=2)
        emb = self.embed_crops([self.align(img, kps[i], 112)])[0]
        return FaceResult(dets[i, :4], float(dets[i, 4]), kps[i], emb, self.clip_pixels(self.align(img, kps[i], 224)),
                          len(dets))
