"""Our BiSeNet equals facexlib's ``BiSeNet(num_class=19)`` on all three outputs (1e-5), on a real
face at a size that is not square (nearest and align-corners resizes on both axes)."""
import numpy as np

from tests.conftest import max_rel_err
from tests.torch_refs import facexlib_nets as nets


def test_bisenet_outputs_match_facexlib():
    import cv2
    import torch

    rgb = cv2.resize(nets.photo("Tom_Hanks_54745.png"), (96, 128), interpolation=cv2.INTER_CUBIC)[..., ::-1] / 255.0
    x = torch.from_numpy(((rgb - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).astype(np.float32).transpose(2, 0, 1))[None]
    ref = nets.bisenet_ref(x)
    ours = nets.converted("bisenet", ref)
    with torch.no_grad():
        want = [t.numpy().transpose(0, 2, 3, 1) for t in ref(x)]
    got = ours(x.numpy().transpose(0, 2, 3, 1))
    errs = [max_rel_err(g, w) for g, w in zip(got, want)]
    print("out/out16/out32 max rel err", errs)
    assert [g.shape for g in got] == [(1, 128, 96, 19)] * 3
    assert max(errs) <= 1e-5
