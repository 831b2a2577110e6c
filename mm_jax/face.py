"""Face front end: SCRFD detection, 5-point alignment, ArcFace identity embedding, CLIP face crop.

Models come from a local insightface model pack (``--face-models DIR``: a folder of .onnx files,
or ``DIR/models/<pack>/*.onnx``), run with onnxruntime on the CPU; nothing is downloaded. The
detector and the recognizer are told apart by their input/output signatures, in the order of
insightface's model zoo (>= 5 outputs: SCRFD; 192x192 landmarks, 96x96 attributes and the
2-input swapper are skipped; a square input >= 112 with one output: ArcFace). Detection decoding,
NMS and alignment are our own numpy code, checked against insightface in the tests.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

ARCFACE_TEMPLATE = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                             [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)  # 112x112
CLIP_SIZE = 224  # the default reference crop: the published CLIP ViT-L/14's image_size
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
PACK_HELP = ("an insightface model pack: a folder (or DIR/models/<pack>/) with an SCRFD detector and an ArcFace "
             "recognizer, e.g. antelopev2/{scrfd_10g_bnkps.onnx, glintr100.onnx} or "
             "buffalo_l/{det_10g.onnx, w600k_r50.onnx}")


class NoFaceError(ValueError):
    """No face was found in an image (the message names the image)."""


class ImageSizeError(ValueError):
    """An image the detector cannot take (empty, or so thin that its short side would scale to
    nothing in the detector's input); the message gives the size and what is allowed."""


@dataclasses.dataclass
class FaceResult:
    bbox: np.ndarray          # (4,) x1, y1, x2, y2 in image pixels
    kps: np.ndarray           # (5, 2) x, y of eyes, nose, mouth corners
    score: float
    embedding: np.ndarray     # (D,) ArcFace embedding (e_id; L2-normalized unless the analyzer says raw), D = 512
    clip_crop: np.ndarray     # (S, S, 3) float32 RGB, CLIP-normalized; S = the analyzer's clip_size
    num_faces: int


@dataclasses.dataclass
class FrameFaces:
    """The largest face of each of N frames (``FaceAnalyzer.analyze_frames``); zeros where none."""
    embedding: np.ndarray     # (N, D) L2-normalized ArcFace embeddings, D = FaceModels.embedding_dim
    found: np.ndarray         # (N,) bool
    bbox: np.ndarray          # (N, 4) x1, y1, x2, y2 in frame pixels
    kps: np.ndarray           # (N, 5, 2) x, y of eyes, nose, mouth corners
    score: np.ndarray         # (N,) detector score


# -- geometry (pure numpy) ---------------------------------------------------------------------

def arcface_template(size: int) -> np.ndarray:
    """The 5-point template for a ``size`` crop, as insightface's ``face_align.estimate_norm``:
    scaled from 112 (so at 224 the face fills the crop the same way), or from 128 with the
    8-pixel x margin of 128-pixel recognizers."""
    if size % 112 == 0:
        return ARCFACE_TEMPLATE * (size / 112.0)
    if size % 128 == 0:
        ratio = size / 128.0
        return ARCFACE_TEMPLATE * ratio + np.array([8.0 * ratio, 0.0], np.float32)
    raise ValueError(f"crop size {size}: the ArcFace template needs a multiple of 112 or 128")


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (Umeyama 1991, closed form) mapping ``src`` (N, 2) onto ``dst``
    (N, 2): the 2x3 matrix ``[s R | t]`` with ``dst ~ s R src + t``."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s_c, d_c = src - mu_s, dst - mu_d
    cov = d_c.T @ s_c / len(src)
    u, sig, vt = np.linalg.svd(cov)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:  # a reflection fits better: take the best rotation instead
        d[-1] = -1
    r = u @ np.diag(d) @ vt
    scale = (sig * d).sum() / ((s_c ** 2).sum() / len(src))
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]]).astype(np.float32)


def distance2bbox(points: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Anchor centres (N, 2) and (left, top, right, bottom) distances (N, 4) -> boxes (N, 4)."""
    return np.stack([points[:, 0] - dist[:, 0], points[:, 1] - dist[:, 1],
                     points[:, 0] + dist[:, 2], points[:, 1] + dist[:, 3]], axis=-1)


def distance2kps(points: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Anchor centres (N, 2) and (dx, dy) offsets (N, 2K) -> points (N, 2K)."""
    out = np.empty_like(dist)
    out[:, 0::2] = points[:, :1] + dist[:, 0::2]
    out[:, 1::2] = points[:, 1:2] + dist[:, 1::2]
    return out


def anchor_centers(height: int, width: int, stride: int, num_anchors: int) -> np.ndarray:
    """(height * width * num_anchors, 2) x, y pixel centres, row-major, each repeated per anchor."""
    centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32) * stride
    return np.repeat(centers.reshape(-1, 2), num_anchors, axis=0)


def nms(dets: np.ndarray, thresh: float) -> list[int]:
    """Greedy NMS over (N, 5) [x1, y1, x2, y2, score]; indices kept, best first. Areas count the
    +1 pixel as insightface's SCRFD does, so overlaps match it."""
    x1, y1, x2, y2, s = dets.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-s, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= thresh]
    return keep


# -- models ------------------------------------------------------------------------------------

CPU = ("CPUExecutionProvider",)


def _session(path: Path, providers: Sequence[str] = CPU):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=list(providers))


def _role(session) -> str | None:
    """'detector', 'recognizer' or None, by I/O signature in insightface model_zoo's order."""
    ins, outs = session.get_inputs(), session.get_outputs()
    if len(outs) >= 5:
        return "detector"
    shape = ins[0].shape
    if len(shape) != 4 or not all(isinstance(v, int) for v in shape[2:]):
        return None
    h, w = shape[2:]
    if (h, w) in ((192, 192), (96, 96)) or (len(ins) == 2 and h == w == 128):
        return None  # landmark / gender-age / swapper models that packs such as buffalo_l also hold
    if h == w and h >= 112 and h % 16 == 0 and len(outs) == 1:
        return "recognizer"
    return None


def _is_mxnet_export(path: Path) -> bool:
    """insightface's rule: a Sub and a Mul among the first 8 nodes mean the input normalization
    is inside the graph (mxnet exports), so pixels go in unnormalized."""
    import onnx

    names = [n.name for n in onnx.load(str(path), load_external_data=False).graph.node[:8]]
    return (any(n.startswith(("Sub", "_minus")) for n in names)
            and any(n.startswith(("Mul", "_mul")) for n in names))


def _pack_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--face-models {folder}: no such folder; expected {PACK_HELP}")
    files = sorted(folder.glob("*.onnx"))
    if files:
        return files
    packs = sorted({f.parent for pat in ("models/*/*.onnx", "*/*.onnx") for f in folder.glob(pat)})
    if len(packs) > 1:
        raise ValueError(f"--face-models {folder}: holds several model packs "
                         f"{[str(p.relative_to(folder)) for p in packs]}; pass the folder of one of them")
    return sorted(packs[0].glob("*.onnx")) if packs else []


class FaceModels:
    """The detector and recognizer onnxruntime sessions of a local model pack."""

    def __init__(self, detector, recognizer, rec_mean: float, rec_std: float, folder: Path):
        self.detector, self.recognizer = detector, recognizer
        self.rec_mean, self.rec_std, self.folder = rec_mean, rec_std, folder
        self.rec_size = int(recognizer.get_inputs()[0].shape[2])
        self._embedding_dim: int | None = None

    @property
    def embedding_dim(self) -> int:
        """The recognizer's embedding width (512 for insightface's ArcFace packs): from its output
        shape, or, when the export leaves it symbolic, from one run on a blank crop."""
        if self._embedding_dim is None:
            out = self.recognizer.get_outputs()[0].shape
            if isinstance(out[-1], int) and out[-1] > 0:
                self._embedding_dim = int(out[-1])
            else:
                inp = self.recognizer.get_inputs()[0]
                blank = np.zeros((1, 3, self.rec_size, self.rec_size), np.float32)
                self._embedding_dim = int(np.prod(self.recognizer.run(None, {inp.name: blank})[0].shape[1:]))
        return self._embedding_dim

    @classmethod
    def load(cls, folder: str | Path, providers: Sequence[str] = CPU) -> "FaceModels":
        """Find the detector and recognizer of the pack in ``folder``. ``providers``: onnxruntime
        execution providers, CPU by default (the embedding is computed once per reference face)."""
        folder = Path(folder)
        files = _pack_files(folder)
        found: dict[str, tuple] = {}
        for f in files:
            try:
                s = _session(f, providers)
            except Exception as e:
                raise ValueError(f"--face-models {folder}: {f.name} cannot be loaded by onnxruntime ({e}); "
                                 f"expected {PACK_HELP}") from None
            role = _role(s)
            if role is not None and role not in found:  # the first in name order wins, as in insightface
                found[role] = (s, f)
        missing = [n for r, n in (("detector", "SCRFD detector"), ("recognizer", "ArcFace recognizer"))
                   if r not in found]
        if missing:
            raise ValueError(f"--face-models {folder}: no {' and no '.join(missing)} among "
                             f"{[f.name for f in files] or 'its files (no .onnx found)'}; expected {PACK_HELP}")
        (det, _), (rec, rec_path) = found["detector"], found["recognizer"]
        mx = _is_mxnet_export(rec_path)
        return cls(det, rec, 0.0 if mx else 127.5, 1.0 if mx else 127.5, folder)


def read_image(path_or_array) -> np.ndarray:
    """BGR uint8 (H, W, 3) from an image file, or from an RGB uint8 array (H, W[, 3|4])."""
    if isinstance(path_or_array, np.ndarray):
        img = path_or_array
        if img.dtype != np.uint8 or img.ndim not in (2, 3):
            raise ValueError(f"image array of dtype {img.dtype} and shape {img.shape}: expected RGB uint8 (H, W, 3)")
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        return np.ascontiguousarray(img[..., :3][..., ::-1])
    import cv2

    path = Path(path_or_array)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR) if path.is_file() else None
    if img is None:
        raise ValueError(f"cannot read image {path}: " + ("not a decodable image" if path.is_file() else "no such file"))
    return img


class FaceAnalyzer:
    """Detect (SCRFD), align (5-point similarity) and embed (ArcFace) faces with a local model pack."""

    def __init__(self, models: FaceModels | str | Path, det_size: int = 640, det_thresh: float = 0.5,
                 nms_thresh: float = 0.4, clip_size: int = CLIP_SIZE, normalize: bool = True):
        """``clip_size``: the side of the reference crop ``analyze`` returns, the image encoder's
        ``image_size`` (224 for CLIP ViT-L/14; a 336-px tower needs 336). ``normalize=False`` gives
        the recognizer's raw embeddings, as insightface's ``Face.embedding`` (ConsisID's ``id_cond``)."""
        self.normalize = bool(normalize)
        if clip_size <= 0:
            raise ValueError(f"clip_size={clip_size}: must be a positive number of pixels")
        self.clip_size = int(clip_size)
        if not 0.0 < det_thresh < 1.0 or not 0.0 < nms_thresh < 1.0:
            raise ValueError(f"det_thresh={det_thresh}, nms_thresh={nms_thresh}: both must lie in (0, 1)")
        if det_size <= 0 or det_size % 32:
            raise ValueError(f"det_size={det_size}: must be a positive multiple of 32 (the coarsest stride)")
        self.models = models if isinstance(models, FaceModels) else FaceModels.load(models)
        self.det_thresh, self.nms_thresh = det_thresh, nms_thresh
        det_in, outs = self.models.detector.get_inputs()[0].shape, self.models.detector.get_outputs()
        # a detector exported at a fixed resolution runs at it, as insightface does
        fixed = len(det_in) == 4 and all(isinstance(v, int) and v > 0 for v in det_in[2:])
        self.input_size = (det_in[3], det_in[2]) if fixed else (det_size, det_size)  # (width, height)
        self.fmc = 3 if len(outs) in (6, 9) else 5
        self.strides = (8, 16, 32) if self.fmc == 3 else (8, 16, 32, 64, 128)
        self.num_anchors = 2 if self.fmc == 3 else 1
        self.use_kps = len(outs) in (9, 15)

    # detection ---------------------------------------------------------------------------------
    def detect(self, img_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """BGR uint8 (H, W, 3) -> boxes (N, 5) [x1, y1, x2, y2, score] in image pixels, best score
        first after NMS, and landmarks (N, 5, 2)."""
        import cv2

        in_w, in_h = self.input_size
        h0, w0 = img_bgr.shape[:2]
        if h0 < 1 or w0 < 1:
            raise ImageSizeError(f"image of {h0}x{w0} pixels (height x width): it is empty")
        # letterbox into the top-left corner, keeping the aspect ratio
        if h0 / w0 > in_h / in_w:
            nh, nw = in_h, int(in_h / (h0 / w0))
        else:
            nw, nh = in_w, int(in_w * (h0 / w0))
        if nh < 1 or nw < 1:
            raise ImageSizeError(f"image of {h0}x{w0} pixels (height x width) is too thin for the detector: its "
                                 f"{in_w}x{in_h} input would hold it as {nh}x{nw}; the long side may be at most "
                                 f"{max(in_w, in_h)} times the short side")
        scale = nh / h0
        canvas = np.zeros((in_h, in_w, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(img_bgr, (nw, nh))
        blob = ((canvas[..., ::-1].astype(np.float32) - 127.5) / 128.0).transpose(2, 0, 1)[None]  # RGB, NCHW
        sess = self.models.detector
        outs = sess.run(None, {sess.get_inputs()[0].name: np.ascontiguousarray(blob)})
        dets, kpss = [], []
        for k, stride in enumerate(self.strides):
            scores = outs[k].reshape(-1)  # rank 3 (batched export) or 2: the same rows
            centers = anchor_centers(in_h // stride, in_w // stride, stride, self.num_anchors)
            pos = np.where(scores >= self.det_thresh)[0]
            boxes = distance2bbox(centers, outs[k + self.fmc].reshape(-1, 4) * stride)
            dets.append(np.hstack([boxes[pos] / scale, scores[pos, None]]))
            if self.use_kps:
                kps = distance2kps(centers, outs[k + 2 * self.fmc].reshape(-1, 10) * stride)
                kpss.append(kps[pos].reshape(-1, 5, 2) / scale)
        dets = np.vstack(dets).astype(np.float32)
        kps = np.vstack(kpss).astype(np.float32) if kpss else np.zeros((len(dets), 5, 2), np.float32)
        keep = nms(dets, self.nms_thresh) if len(dets) else []
        return dets[keep], kps[keep]

    # alignment and embedding -----------------------------------------------------------------------
    @staticmethod
    def align(img_bgr: np.ndarray, kps: np.ndarray, size: int) -> np.ndarray:
        """The (size, size, 3) BGR uint8 crop that puts the 5 landmarks on the ArcFace template
        scaled to ``size`` (112: ArcFace, 224: CLIP), as ``face_align.norm_crop``."""
        import cv2

        m = similarity_transform(kps, arcface_template(size))
        return cv2.warpAffine(img_bgr, m, (size, size), borderValue=0.0)

    def embed_crops(self, crops_bgr: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """Aligned BGR uint8 crops (S, S, 3), S the recognizer's input (112) -> (N, D) float32,
        L2-normalized unless the analyzer is raw (``normalize=False``), D the recognizer's width;
        onnxruntime batches of ``batch_size`` (1 for fixed-batch exports)."""
        s = self.models.rec_size
        for i, c in enumerate(crops_bgr):
            if np.shape(c) != (s, s, 3):
                raise ValueError(f"crop {i} has shape {np.shape(c)}; expected an aligned ({s}, {s}, 3) BGR crop")
        sess, m = self.models.recognizer, self.models
        if isinstance(sess.get_inputs()[0].shape[0], int):
            batch_size = sess.get_inputs()[0].shape[0]
        feats = []
        for i in range(0, len(crops_bgr), batch_size):
            # the recognizer takes RGB: insightface's get_feat swaps BGR->RGB (blobFromImages swapRB=True)
            x = np.stack(crops_bgr[i:i + batch_size])[..., ::-1].astype(np.float32)
            blob = np.ascontiguousarray(((x - m.rec_mean) / m.rec_std).transpose(0, 3, 1, 2))
            feats.append(sess.run(None, {sess.get_inputs()[0].name: blob})[0].reshape(len(x), -1))
        if not feats:
            return np.zeros((0, self.models.embedding_dim), np.float32)
        f = np.concatenate(feats)
        if not self.normalize:
            return f.astype(np.float32)
        return (f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    @staticmethod
    def clip_pixels(crop_bgr: np.ndarray) -> np.ndarray:
        """BGR uint8 crop -> float32 RGB (H, W, 3) with OpenAI CLIP's mean/std normalization."""
        return ((crop_bgr[..., ::-1].astype(np.float32) / 255.0 - CLIP_MEAN) / CLIP_STD).astype(np.float32)

    def _largest(self, img_bgr: np.ndarray, label: str, warn: bool = True):
        try:
            dets, kps = self.detect(img_bgr)
        except ImageSizeError as e:
            raise ImageSizeError(f"{label}: {e}") from None
        if len(dets) == 0:
            raise NoFaceError(f"no face found in {label} (detector score threshold {self.det_thresh})")
        i = int(np.argmax((dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])))
        if warn and len(dets) > 1:
            warnings.warn(f"{len(dets)} faces found in {label}; using the largest", stacklevel=3)
        return dets[i], kps[i], len(dets)

    def analyze(self, image, name: str | None = None) -> FaceResult:
        """The largest face of an image (file path, or RGB uint8 array): box, landmarks, e_id and
        the ``clip_size`` CLIP crop. No face -> ``NoFaceError``; several -> a warning."""
        label = name or (str(image) if not isinstance(image, np.ndarray) else "<array>")
        img = read_image(image)
        det, kps, n = self._largest(img, label)
        emb = self.embed_crops([self.align(img, kps, self.models.rec_size)])[0]
        return FaceResult(det[:4], kps, float(det[4]), emb, self.clip_pixels(self.align(img, kps, self.clip_size)), n)

    def analyze_frames(self, frames: Sequence[np.ndarray]) -> FrameFaces:
        """The largest face of each of many images (e.g. video frames, RGB uint8 (H, W, 3)): detection
        per frame, then one batched recognizer run over the aligned crops. Frames without a face have
        ``found`` False and zeros elsewhere. Several faces in a frame are not warned about here."""
        n = len(frames)
        crops, found = [], np.zeros(n, bool)
        boxes, kpss, scores = np.zeros((n, 4), np.float32), np.zeros((n, 5, 2), np.float32), np.zeros(n, np.float32)
        for j, frame in enumerate(frames):
            img = read_image(frame)
            try:
                det, kps, _ = self._largest(img, f"frame {j}", warn=False)
            except NoFaceError:
                continue
            crops.append(self.align(img, kps, self.models.rec_size))
            found[j], boxes[j], kpss[j], scores[j] = True, det[:4], kps, det[4]
        emb = self.embed_crops(crops)
        out = np.zeros((n, emb.shape[1]), np.float32)  # the recognizer's width even when no frame has a face
        out[found] = emb
        return FrameFaces(out, found, boxes, kpss, scores)

    def embed_frames(self, frames: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Identity embeddings of many images: ``(N, D)`` (zeros where no face) and a ``found``
        mask ``(N,)``; ``analyze_frames`` also gives the boxes and landmarks."""
        faces = self.analyze_frames(frames)
        return faces.embedding, faces.found
