"""ConsisID's per-frame face "FID" (``eval/get_facesim_fid.py``), on our Inception v3 port.

Their script, per video: the reference's aligned 224 face crop (insightface ``norm_crop``, RGB) and, for every
sampled frame with a face, the frame's aligned crop each go through ``load_image`` (PIL ``Resize((299, 299))``,
bilinear, then ``ToTensor``: [0, 1], no normalisation) and ``inception_v3(weights=DEFAULT)`` with
``fc = Identity`` (transform_input on). ``get_activations`` repeats a single activation twice, so
``calculate_fid`` sees two identical rows per side: both covariances are exactly 0, ``matrix_sqrt(0) = 0``, and the
"FID" reduces to ``sum((ref_features - frame_features) ** 2)``, the squared L2 distance of the two 2048-d
features. The video's score is the mean over frames with a face, 0.0 when there is none.

Weights (``--inception``): the ``.safetensors`` that ``tools/convert_weights/inception_v3.py
inception_v3_google-0cc3c7bd.pth --out inception_v3.safetensors`` writes (torchvision's names and layout, AuxLogits
and fc left out); :func:`load` reads it without torch (``torch_named``) and takes the two configurable widths from
the tensor shapes (the published file gives the published network).
"""
from __future__ import annotations

import numpy as np
from PIL import Image

INPUT_SIDE = 299
BATCH = 8  # crops per compiled Inception batch (zero-padded: one compiled shape)
HOW = ("tools/convert_weights/inception_v3.py inception_v3_google-0cc3c7bd.pth --out inception_v3.safetensors "
       "writes it from torchvision's published Inception v3")


def load(path):
    """A jitted feature function ``(B, 299, 299, 3) -> (B, 2048)`` of the Inception v3 saved at ``path``."""
    from flax import nnx

    from mm_jax.metrics import torch_named
    from mm_jax.models.inception_v3 import InceptionV3Config, InceptionV3Features

    tensors, _ = torch_named.read(path, "--inception", HOW)
    try:
        cfg = InceptionV3Config(
            pool_features=tuple(int(tensors[f"Mixed_5{c}.branch_pool.conv.weight"].shape[0]) for c in "bcd"),
            channels_7x7=tuple(int(tensors[f"Mixed_6{c}.branch7x7_1.conv.weight"].shape[0]) for c in "bcde"))
    except KeyError as e:
        raise ValueError(f"--inception {path}: no tensor {e} ({HOW})") from None
    model = nnx.eval_shape(lambda: InceptionV3Features(cfg, rngs=nnx.Rngs(0)))
    torch_named.fill(model, tensors, f"--inception {path}")
    run = nnx.jit(lambda m, x: m(x))

    def fn(x):
        x = np.asarray(x, np.float32)
        out = []
        for i in range(0, len(x), BATCH):
            chunk = x[i:i + BATCH]
            pad = np.zeros((BATCH - len(chunk),) + chunk.shape[1:], np.float32)
            out.append(np.asarray(run(model, np.concatenate([chunk, pad])))[:len(chunk)])
        return np.concatenate(out)
    return fn


def load_image(crop_rgb: np.ndarray) -> np.ndarray:
    """Their ``load_image``: an ``(H, W, 3)`` uint8 RGB crop -> ``(299, 299, 3)`` float32 in [0, 1] (PIL bilinear
    resize as torchvision's ``Resize`` does it for a PIL image, then ``ToTensor``), NHWC instead of CHW."""
    crop = np.asarray(crop_rgb)
    if crop.ndim != 3 or crop.shape[-1] != 3 or crop.dtype != np.uint8:
        raise ValueError(f"a face crop must be (H, W, 3) uint8 RGB, got {crop.shape} {crop.dtype}")
    img = Image.fromarray(crop).convert("RGB").resize((INPUT_SIDE, INPUT_SIDE), Image.BILINEAR)
    return np.asarray(img, np.float32) / np.float32(255.0)


def features(model, crops_rgb) -> np.ndarray:
    """Inception v3 features ``(N, 2048)`` float32 of the crops, each prepared by :func:`load_image`."""
    batch = np.stack([load_image(c) for c in crops_rgb])
    return np.asarray(model(batch), np.float32)


def frame_fids(model, ref_crop_rgb: np.ndarray, frame_crops_rgb) -> np.ndarray:
    """Their per-frame ``calculate_fid(real, fake)`` values: the squared L2 distance of each frame crop's
    features to the reference crop's, float32 as torch computes them."""
    frame_crops_rgb = list(frame_crops_rgb)
    if not frame_crops_rgb:
        return np.zeros((0,), np.float32)
    feats = features(model, [ref_crop_rgb, *frame_crops_rgb])
    return np.sum((feats[1:] - feats[:1]) ** 2, axis=-1, dtype=np.float32)


def video_face_fid(model, ref_crop_rgb: np.ndarray, frame_crops_rgb) -> tuple[float, np.ndarray]:
    """``(score, per-frame values)``: the video's face FID as their script reports it, the mean of
    :func:`frame_fids` over the frames that had a face (pass only those crops), 0.0 when no frame had one
    (``np.mean(fid_face) if fid_face else 0.0``)."""
    fids = frame_fids(model, ref_crop_rgb, frame_crops_rgb)
    return (float(np.mean(fids.astype(np.float64))) if fids.size else 0.0), fids


def face_fid(model, ref_crop_rgb: np.ndarray, frame_crops_rgb) -> float:
    """The video's face FID (:func:`video_face_fid`'s score)."""
    return video_face_fid(model, ref_crop_rgb, frame_crops_rgb)[0]
