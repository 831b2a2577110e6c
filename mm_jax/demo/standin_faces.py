"""Tiny stand-in ONNX face models with insightface's I/O contracts (used by the demo, the notebook and the tests).

Detector (SCRFD det_10g layout: input.1 [1,3,?,?] -> 9 outputs, strides 8/16/32 x {score, bbox,
kps}, 2 anchors): the stride-8 score head fires where the image is bright at a cell's sample
point, so a small white square on a dark image is exactly one face. Boxes are ``box + box_gain *
brightness`` strides from the anchor centre on every side (so face size can follow brightness);
landmarks sit at fixed offsets. Strides 16 and 32 never fire. ``make_random_detector`` has
random weights: every stride fires, with many overlapping boxes for NMS.
Recognizer (ArcFace: input.1 [None,3,112,112] -> [None,512], or another ``width``): conv -> ReLU -> GAP -> Gemm; with
``mxnet=True`` its first nodes are a Sub and a Mul (the in-graph normalization of mxnet exports).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

KPS_OFFSETS = np.array([[-0.5, -0.4], [0.5, -0.4], [0.0, 0.1], [-0.4, 0.5], [0.4, 0.5]], np.float32)  # in strides


def _head(nodes: list, inits: list, outs: dict, kind: str, s: int, k: int, prev: str) -> None:
    """One SCRFD output head (weights ``{kind}{s}_w/_b`` already in ``inits``): 1x1 conv on
    ``prev``, NCHW -> NHWC, reshape to (-1, k) (a sigmoid for scores), output ``{kind}_{s}``."""
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    nodes += [h.make_node("Conv", [prev, f"{kind}{s}_w", f"{kind}{s}_b"], [f"{kind}{s}_c"]),
              h.make_node("Transpose", [f"{kind}{s}_c"], [f"{kind}{s}_t"], perm=[0, 2, 3, 1])]
    inits.append(nh.from_array(np.array([-1, k], np.int64), f"{kind}{s}_shape"))
    o = f"{kind}_{s}"
    nodes.append(h.make_node("Reshape", [f"{kind}{s}_t", f"{kind}{s}_shape"], [o + "_r" if kind == "score" else o]))
    if kind == "score":
        nodes.append(h.make_node("Sigmoid", [o + "_r"], [o]))
    outs[kind].append(h.make_tensor_value_info(o, TP.FLOAT, ["?", k]))


def _save_detector(nodes: list, inits: list, outs: dict, name: str, path: Path) -> None:
    """The SCRFD graph (input.1 [1,3,?,?] -> scores, boxes, landmarks per stride) saved to ``path``."""
    import onnx
    from onnx import TensorProto as TP, helper as h

    g = h.make_graph(nodes, name, [h.make_tensor_value_info("input.1", TP.FLOAT, [1, 3, "?", "?"])],
                     outs["score"] + outs["bbox"] + outs["kps"], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8), str(path))


def make_detector(path: Path, box: float = 2.0, box_gain: float = 0.0):
    from onnx import helper as h, numpy_helper as nh

    inits, nodes, outs = [], [], {"score": [], "bbox": [], "kps": []}
    arr = lambda a, n: inits.append(nh.from_array(np.asarray(a, np.float32), n))
    # stem: 3x3 average of the (normalized) input at stride 8, one channel
    arr(np.full((1, 3, 3, 3), 1.0 / 27), "stem_w"); arr([0.0], "stem_b")
    nodes.append(h.make_node("Conv", ["input.1", "stem_w", "stem_b"], ["f8"], strides=[8, 8], pads=[1, 1, 1, 1]))
    prev = "f8"
    for s in (8, 16, 32):
        if s != 8:
            arr(np.zeros((1, 1, 3, 3)), f"d{s}_w"); arr([0.0], f"d{s}_b")
            nodes.append(h.make_node("Conv", [prev, f"d{s}_w", f"d{s}_b"], [f"f{s}"], strides=[2, 2], pads=[1, 1, 1, 1]))
            prev = f"f{s}"
        for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)):
            if kind == "score":
                w, b = np.full((2, 1, 1, 1), 20.0 if s == 8 else 0.0), np.full((2,), -10.0 if s == 8 else -30.0)
            elif kind == "bbox":
                w, b = np.full((8, 1, 1, 1), box_gain), np.full((8,), box)
            else:
                w, b = np.zeros((20, 1, 1, 1)), np.tile(KPS_OFFSETS.reshape(-1), 2)
            arr(w, f"{kind}{s}_w"); arr(b, f"{kind}{s}_b")
            _head(nodes, inits, outs, kind, s, k, prev)
    _save_detector(nodes, inits, outs, "scrfd_standin", path)


def make_recognizer(path: Path, seed: int = 0, mxnet: bool = False, width: int = 512):
    """``width``: the embedding size (insightface's recognizers give 512)."""
    import onnx
    from onnx import TensorProto as TP, helper as h, numpy_helper as nh

    rng = np.random.default_rng(seed)
    inits = [nh.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3, "c_w"),
             nh.from_array(np.zeros(8, np.float32), "c_b"),
             nh.from_array(rng.standard_normal((8, width)).astype(np.float32), "fc_w"),
             nh.from_array(rng.standard_normal(width).astype(np.float32) * 0.1, "fc_b")]
    nodes, x = [], "input.1"
    if mxnet:  # normalization inside the graph, as insightface's mxnet exports have it
        inits += [nh.from_array(np.array(127.5, np.float32), "mean"), nh.from_array(np.array(1 / 127.5, np.float32), "inv_std")]
        nodes += [h.make_node("Sub", [x, "mean"], ["xc"], name="_minus0"), h.make_node("Mul", ["xc", "inv_std"], ["xn"], name="_mul0")]
        x = "xn"
    nodes += [h.make_node("Conv", [x, "c_w", "c_b"], ["c"], name="Conv_0", strides=[2, 2], pads=[1, 1, 1, 1]),
              h.make_node("Relu", ["c"], ["r"], name="Relu_1"),
              h.make_node("GlobalAveragePool", ["r"], ["gap"], name="GlobalAveragePool_2"),
              h.make_node("Flatten", ["gap"], ["flat"], name="Flatten_3", axis=1),
              h.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["683"], name="Gemm_4")]
    g = h.make_graph(nodes, "arcface_standin", [h.make_tensor_value_info("input.1", TP.FLOAT, ["None", 3, 112, 112])],
                     [h.make_tensor_value_info("683", TP.FLOAT, ["None", width])], inits)
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8), str(path))


def make_landmark(path: Path):
    """A 192x192 single-output model (buffalo_l's 1k3d68 / 2d106det signature), which must not be
    taken for the recognizer although it is square, >= 112 and a multiple of 16."""
    import onnx
    from onnx import TensorProto as TP, helper as h

    nodes = [h.make_node("GlobalAveragePool", ["data"], ["gap"]), h.make_node("Flatten", ["gap"], ["fc1"], axis=1)]
    g = h.make_graph(nodes, "landmark_standin", [h.make_tensor_value_info("data", TP.FLOAT, [1, 3, 192, 192])],
                     [h.make_tensor_value_info("fc1", TP.FLOAT, [1, 3])])
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 13)], ir_version=8), str(path))


def make_random_detector(path: Path, seed: int = 0, channels: int = 16, score_bias: float = 0.0, box: float = 2.0):
    """SCRFD det_10g signature with random weights (after make_standin_onnx.py): conv stem at
    stride 8, ReLU, two stride-2 convs, 1x1 heads per stride."""
    from onnx import helper as h, numpy_helper as nh

    rng = np.random.default_rng(seed)
    inits, nodes, outs = [], [], {"score": [], "bbox": [], "kps": []}
    arr = lambda a, n: inits.append(nh.from_array(np.asarray(a, np.float32), n))
    w = lambda shape, scale=0.1: rng.standard_normal(shape) * scale
    arr(w((channels, 3, 3, 3)), "stem_w"); arr(np.zeros(channels), "stem_b")
    nodes += [h.make_node("Conv", ["input.1", "stem_w", "stem_b"], ["stem"], strides=[8, 8], pads=[1, 1, 1, 1]),
              h.make_node("Relu", ["stem"], ["f8"])]
    prev = "f8"
    for s in (8, 16, 32):
        if s != 8:
            arr(w((channels, channels, 3, 3)), f"d{s}_w"); arr(np.zeros(channels), f"d{s}_b")
            nodes += [h.make_node("Conv", [prev, f"d{s}_w", f"d{s}_b"], [f"c{s}"], strides=[2, 2], pads=[1, 1, 1, 1]),
                      h.make_node("Relu", [f"c{s}"], [f"f{s}"])]
            prev = f"f{s}"
        for kind, k in (("score", 1), ("bbox", 4), ("kps", 10)):
            bias = {"score": score_bias, "bbox": box, "kps": 0.0}[kind]
            arr(w((2 * k, channels, 1, 1), 1.0 if kind == "score" else 0.1), f"{kind}{s}_w"); arr(np.full(2 * k, bias), f"{kind}{s}_b")
            _head(nodes, inits, outs, kind, s, k, prev)
    _save_detector(nodes, inits, outs, "scrfd_random", path)


def make_pack(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_detector(folder / "det_10g.onnx")
    make_recognizer(folder / "w600k_r50.onnx")
    return folder


def face_image(h=240, w=320, at=(96, 160), size=4, seed=0) -> np.ndarray:
    """A dark RGB image with a small bright square centred on pixel ``at`` (row, col): one 'face'
    for the stand-in detector at the stride-8 cell whose sample point it covers, plus texture."""
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 40).astype(np.uint8)
    r, c = at
    img[r - size // 2:r + size // 2 + 1, c - size // 2:c + size // 2 + 1] = 255
    return img
