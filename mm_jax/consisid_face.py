"""ConsisID's face crop: RetinaFace detection, FFHQ-512 alignment, BiSeNet parsing to white, greyscale.

The image half of diffusers' ``consisid_utils.process_face_embeddings`` (with facexlib's
``FaceRestoreHelper``), with the two networks in JAX (``mm_jax.models.retinaface``,
``mm_jax.models.bisenet``) and the rest in numpy and OpenCV, step for step:

1. detection as facexlib's ``RetinaFace.detect_faces``: BGR float32 minus (104, 117, 123) at the
   original size, boxes and 5 landmarks decoded against the priors, scores above the threshold
   (0.97 in ConsisID), sorted, NMS at IoU 0.4 (torchvision's ``nms`` semantics, in numpy);
2. the face whose box centre is closest to the image centre (``only_center_face``);
3. ``cv2.estimateAffinePartial2D(landmarks, FFHQ template, LMEDS)`` and ``cv2.warpAffine`` to
   512x512, bilinear, border (135, 133, 132);
4. BiSeNet at 512 on the crop as RGB/255, ImageNet-normalised; the argmax of its first output;
   background, neck, clothes, ears, earrings, hat and necklace (``BACKGROUND_LABELS``) become
   white; the colour crop on white is the pipeline's ``image``, its greyscale
   (0.299 R + 0.587 G + 0.114 B, on three channels) the EVA-CLIP input.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx

from mm_jax.face import ImageSizeError, NoFaceError
from mm_jax.models import retinaface as rf

CONF_THRESHOLD = 0.97       # ConsisID's get_face_landmarks_5(... 0.97)
NMS_THRESHOLD = 0.4
FACE_SIZE = 512
FFHQ_TEMPLATE = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                          [201.26117, 371.41043], [313.08905, 371.15118]])  # float64, as facexlib's
BORDER_VALUE = (135, 133, 132)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# CelebAMask-HQ labels turned white: background, neck, cloth, hat, l/r ear, earring, necklace
BACKGROUND_LABELS = (0, 16, 18, 7, 8, 9, 14, 15)
MAX_LONG_SIDE = 1024


def decode_boxes(loc: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """facexlib's ``decode``: ``(N, 4)`` offsets -> (x1, y1, x2, y2) relative to the image, float32."""
    v0, v1 = rf.VARIANCES
    boxes = np.concatenate([priors[:, :2] + loc[:, :2] * v0 * priors[:, 2:], priors[:, 2:] * np.exp(loc[:, 2:] * v1)], 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


def decode_landmarks(pre: np.ndarray, priors: np.ndarray) -> np.ndarray:
    """facexlib's ``decode_landm``: ``(N, 10)`` offsets -> 5 (x, y) points relative to the image."""
    v0 = rf.VARIANCES[0]
    return np.concatenate([priors[:, :2] + pre[:, 2 * i:2 * i + 2] * v0 * priors[:, 2:] for i in range(5)], 1)


def nms(dets: np.ndarray, iou_threshold: float) -> np.ndarray:
    """torchvision's ``ops.nms`` in numpy: ``dets (N, 5)`` (x1, y1, x2, y2, score) -> the kept
    indices by decreasing score; a box goes when its IoU with a kept one is above the threshold
    (areas without torchvision's legacy +1)."""
    x1, y1, x2, y2, scores = (dets[:, i] for i in range(5))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= iou_threshold]
    return np.asarray(keep, np.int64)


def decode_detections(loc: np.ndarray, conf: np.ndarray, landmarks: np.ndarray, height: int, width: int,
                      conf_threshold: float, nms_threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """One image's raw head outputs -> ``(K, 15)`` float32 rows (x1, y1, x2, y2, score, 5 x (x, y))
    in pixels, by decreasing score, as ``RetinaFace.detect_faces`` returns them."""
    priors = rf.priors(height, width)
    scale = np.array([width, height] * 2, np.float32)
    boxes = decode_boxes(np.asarray(loc, np.float32), priors) * scale
    points = decode_landmarks(np.asarray(landmarks, np.float32), priors) * np.tile(scale[:2], 5)
    scores = np.asarray(conf, np.float32)[:, 1]
    inds = np.where(scores > conf_threshold)[0]
    boxes, points, scores = boxes[inds], points[inds], scores[inds]
    order = scores.argsort()[::-1]
    boxes, points, scores = boxes[order], points[order], scores[order]
    dets = np.hstack((boxes, scores[:, None])).astype(np.float32, copy=False)
    keep = nms(dets, nms_threshold)
    return np.concatenate((dets[keep], points[keep]), axis=1)


# Full float32 convolutions on every backend: the landmarks feed a warp that is exact to the pixel,
# and TPU's default one-pass bfloat16 convolutions would move them.
@nnx.jit
def _detect(model: rf.RetinaFace, x: jax.Array):
    with jax.default_matmul_precision("highest"):
        return model(x)


@nnx.jit
def _parse(model, x: jax.Array) -> jax.Array:
    with jax.default_matmul_precision("highest"):
        return model(x)[0].argmax(-1)


def detect_faces(model: rf.RetinaFace, image_bgr: np.ndarray, conf_threshold: float = CONF_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD) -> np.ndarray:
    """RetinaFace on one BGR image (H, W, 3) at its own size -> ``decode_detections`` rows."""
    x = image_bgr.astype(np.float32) - np.array(rf.BGR_MEAN, np.float32)
    loc, conf, landmarks = (np.asarray(a[0]) for a in _detect(model, x[None]))
    return decode_detections(loc, conf, landmarks, *image_bgr.shape[:2], conf_threshold, nms_threshold)


def center_face(dets: np.ndarray, height: int, width: int) -> int:
    """facexlib's ``get_center_face``: the row whose box centre is nearest the image centre."""
    centre = np.array([width / 2, height / 2])
    dist = [np.linalg.norm(np.array([(d[0] + d[2]) / 2, (d[1] + d[3]) / 2]) - centre) for d in dets]
    return dist.index(min(dist))


def align_face(image_bgr: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """facexlib's ``align_warp_face``: ``(5, 2)`` landmarks -> the ``(512, 512, 3)`` uint8 crop."""
    import cv2

    affine = cv2.estimateAffinePartial2D(landmarks, FFHQ_TEMPLATE, method=cv2.LMEDS)[0]
    if affine is None:
        raise NoFaceError(f"no similarity transform from landmarks {landmarks.tolist()} to the FFHQ template")
    return cv2.warpAffine(image_bgr, affine, (FACE_SIZE, FACE_SIZE), borderMode=cv2.BORDER_CONSTANT,
                          borderValue=BORDER_VALUE)


def parse_to_white(parser, crop_bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BiSeNet parsing of the aligned crop -> ``(colour, grey)``, each ``(512, 512, 3)`` float32
    RGB in [0, 1] with the background labels set to 1."""
    rgb = crop_bgr[..., ::-1].astype(np.float32) / 255.0
    labels = np.asarray(_parse(parser, ((rgb - IMAGENET_MEAN) / IMAGENET_STD)[None])[0])
    background = np.isin(labels, BACKGROUND_LABELS)[..., None]
    grey = 0.299 * rgb[..., 0:1] + 0.587 * rgb[..., 1:2] + 0.114 * rgb[..., 2:3]
    colour = np.where(background, np.float32(1.0), rgb)
    return colour, np.where(background, np.float32(1.0), np.repeat(grey, 3, -1))


def to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint8 by truncating ``x * 255``, as ``process_face_embeddings_infer`` does."""
    return (image * 255).astype(np.uint8)


def resize_long_side(image: np.ndarray, long_side: int = MAX_LONG_SIDE) -> np.ndarray:
    """``resize_numpy_image_long``: shrink (Lanczos-4) so the long side is at most ``long_side``."""
    import cv2

    h, w = image.shape[:2]
    if max(h, w) <= long_side:
        return image
    k = long_side / max(h, w)
    if int(h * k) < 1 or int(w * k) < 1:
        raise ImageSizeError(f"image of {h}x{w} pixels (height x width): shrunk to a long side of {long_side} "
                             f"it would be {int(h * k)}x{int(w * k)}")
    return cv2.resize(image, (int(w * k), int(h * k)), interpolation=cv2.INTER_LANCZOS4)


@dataclasses.dataclass
class ConsisIDFace:
    box: np.ndarray         # (5,) x1, y1, x2, y2, score of the chosen face, in input pixels
    landmarks: np.ndarray   # (5, 2) float32 eyes, nose, mouth corners, in input pixels
    crop_bgr: np.ndarray    # (512, 512, 3) uint8, FFHQ-aligned
    colour: np.ndarray      # (512, 512, 3) float32 RGB in [0, 1], background white
    grey: np.ndarray        # (512, 512, 3) float32, greyscale on white: the EVA-CLIP input

    @property
    def image(self) -> np.ndarray:
        """The ``ConsisIDPipeline`` ``image``: the colour crop on white as uint8 RGB."""
        return to_uint8(self.colour)


def prepare_face(detector: rf.RetinaFace, parser, image_rgb: np.ndarray,
                 conf_threshold: float = CONF_THRESHOLD) -> ConsisIDFace:
    """An RGB uint8 photo (already at most ``MAX_LONG_SIDE``, see ``resize_long_side``) -> the
    aligned, parsed crops of its most central face; ``NoFaceError`` if RetinaFace finds none."""
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb: expected (H, W, 3) uint8, got {image_rgb.shape} {image_rgb.dtype}")
    bgr = np.ascontiguousarray(image_rgb[..., ::-1])
    dets = detect_faces(detector, bgr, conf_threshold)
    if len(dets) == 0:
        raise NoFaceError(f"RetinaFace found no face with score > {conf_threshold} in the "
                          f"{image_rgb.shape[1]}x{image_rgb.shape[0]} image")
    det = dets[center_face(dets, *bgr.shape[:2])]
    landmarks = np.array([[det[i], det[i + 1]] for i in range(5, 15, 2)])
    crop = align_face(bgr, landmarks)
    colour, grey = parse_to_white(parser, crop)
    return ConsisIDFace(det[:5], landmarks, crop, colour, grey)
