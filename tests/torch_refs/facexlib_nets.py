"""facexlib's RetinaFace-R50 and BiSeNet with random weights that give unsaturated outputs, our
converted copies, a real photo and an independent NMS reference, for the parity tests.

With torch's default init and BatchNorm at mean 0 / variance 1, a 50-layer random network fed
0..255 pixels saturates: the face scores are exactly 0 or 1 and box sizes overflow ``exp``, so a
comparison would prove little. The references are therefore calibrated first: BatchNorm statistics
from one training-mode pass over the test image (momentum 1), random BatchNorm affines, and each
head rescaled to a set output spread (boxes and landmarks ~1, face logits ~3, so some scores pass
ConsisID's 0.97 threshold). The weights stay random; only their scale is chosen.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

HEAD_STD = {"BboxHead": 1.0, "LandmarkHead": 1.0, "ClassHead": 3.0}


def photo(name: str = "t1.jpg") -> np.ndarray:
    """A BGR uint8 photo shipped with insightface (``data/images``: t1.jpg, a group of six;
    Tom_Hanks_54745.png, one 112x112 face)."""
    import cv2
    import insightface

    img = cv2.imread(str(Path(insightface.__file__).parent / "data" / "images" / name), cv2.IMREAD_COLOR)
    assert img is not None, name
    return img


def _calibrate_batchnorm(model, x, seed: int) -> None:
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.1, generator=g)


def bgr_input(image_bgr: np.ndarray):
    """facexlib's detector input: (1, 3, H, W) float32 BGR minus (104, 117, 123)."""
    import torch

    return torch.from_numpy(image_bgr.astype(np.float32).transpose(2, 0, 1))[None] - torch.tensor(
        [104.0, 117.0, 123.0]).view(1, 3, 1, 1)


def retinaface_ref(image_bgr: np.ndarray, seed: int = 0):
    """facexlib ``RetinaFace('resnet50')``, random weights calibrated on ``image_bgr``."""
    import torch
    from facexlib.detection.retinaface import RetinaFace

    torch.manual_seed(seed)
    ref = RetinaFace(network_name="resnet50", device="cpu")
    x = bgr_input(image_bgr)
    _calibrate_batchnorm(ref, x, seed + 1)
    with torch.no_grad():
        feats = [ssh(f) for ssh, f in zip((ref.ssh1, ref.ssh2, ref.ssh3), ref.fpn(list(ref.body(x).values())))]
        for name, std in HEAD_STD.items():
            heads = getattr(ref, name)
            out = torch.cat([h.conv1x1(f).flatten() for h, f in zip(heads, feats)])
            for h in heads:
                h.conv1x1.weight.mul_(std / out.std())
                h.conv1x1.bias.mul_(std / out.std())
    return ref


def bisenet_ref(x, seed: int = 0):
    """facexlib ``BiSeNet(19)``, random weights calibrated on the (1, 3, H, W) input ``x``, its
    main output's classes centred on ``x``."""
    import torch
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    ref = BiSeNet(num_class=19)
    # the attention and global-context BatchNorms see 1x1 maps: their statistics need a batch
    _calibrate_batchnorm(ref, torch.cat([x, x.flip(-1), x.flip(-2), 0.5 * x]), seed + 1)
    # ReLU features have a large common mean, so one class would win nearly every pixel: remove
    # that mean from each class row of the main classifier, so the argmax mixes labels
    feats = []
    hook = ref.conv_out.conv.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        ref(x)
        hook.remove()
        mu = feats[0].mean((0, 2, 3))
        w = ref.conv_out.conv_out.weight[:, :, 0, 0]
        w -= (w @ mu)[:, None] * mu[None] / (mu @ mu)
    return ref


def converted(name: str, ref, prefix: str = ""):
    """Our module of that name with ``ref``'s weights, through the converter (keys with ``prefix``)."""
    from tools.convert_weights import facexlib as fx

    ours = fx.build(name)
    sd = ref.state_dict()
    n = fx.load_state_dict(ours, name, {prefix + k: v for k, v in sd.items()})
    assert n == len([k for k in sd if not k.endswith("num_batches_tracked")])
    return ours


def torchvision_nms(dets: np.ndarray, thresh: float) -> list[int]:
    """A line-by-line transcription of torchvision's CPU ``nms_kernel`` (float32, no +1 in the
    areas, suppress when IoU > thresh), written apart from ``mm_jax.consisid_face.nms`` to check it."""
    x1, y1, x2, y2, scores = (dets[:, i].astype(np.float32) for i in range(5))
    areas = (x2 - x1) * (y2 - y1)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(dets), bool)
    keep = []
    for _i in range(len(order)):
        i = order[_i]
        if suppressed[i]:
            continue
        keep.append(int(i))
        for _j in range(_i + 1, len(order)):
            j = order[_j]
            if suppressed[j]:
                continue
            xx1, yy1 = max(x1[i], x1[j]), max(y1[i], y1[j])
            xx2, yy2 = min(x2[i], x2[j]), min(y2[i], y2[j])
            w, h = max(np.float32(0), xx2 - xx1), max(np.float32(0), yy2 - yy1)
            inter = w * h
            if inter / (areas[i] + areas[j] - inter) > thresh:
                suppressed[j] = True
    return keep
