"""Our RAFT equals VBench's (restated in ``tests/test_raft_torch_ref.py``, checked equal to the vbench
wheel's files) at the release sizes, with torch's random init (BatchNorm statistics and affines randomised)
converted by ``tools/convert_weights/raft.py``, on a 128x128 pair (a smooth image and its shift), fp32:
the feature and context maps and the upsampled flow after 1, 5 and 20 updates to 1e-5 relative, the 1/8
flow likewise (in pixels after one update, where it is tiny); the converter's key set and strictness."""
import numpy as np
import pytest
from flax import nnx

from mm_jax.metrics import dynamic_degree as dd
from mm_jax.models.raft import RAFT, RAFTConfig
from tests.conftest import max_rel_err
from tools.convert_weights import raft as conv
from tools.convert_weights.safetensors_io import CheckpointError

pytestmark = pytest.mark.slow  # ~30 s CPU (torch 26 updates, three jits); over a minute on a busy host

SIDE = 128       # the smallest side with 2 cells at the coarsest of 4 correlation levels
ITERS = (1, 5, 20)


def torch_model():
    import torch

    from tests.test_raft_torch_ref import RAFT as TorchRAFT

    torch.manual_seed(0)
    model = TorchRAFT().eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -0.5, 0.5), (m.running_var, 0.5, 1.5),
                              (m.weight.data, 0.5, 1.5), (m.bias.data, -0.2, 0.2)):
                t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model


def image_pair():
    """A smooth random image (16x16 noise, bilinearly upsampled) and the same shifted by (3, 5)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    a = F.interpolate(torch.rand(1, 3, 16, 16, generator=g) * 255, size=(SIDE, SIDE), mode="bilinear")
    return a, torch.roll(a, (3, 5), (2, 3))


@pytest.fixture(scope="module")
def run():
    """Torch and JAX outputs (NHWC numpy) of the features and of the flows after each of ITERS."""
    import torch

    tm = torch_model()
    a, b = image_pair()
    ref = {}
    with torch.no_grad():
        for it in ITERS:
            low, up = tm(a, b, iters=it)
            ref[it] = (low.permute(0, 2, 3, 1).numpy(), up.permute(0, 2, 3, 1).numpy())
        feats = {k: v.permute(0, 2, 3, 1).numpy() for k, v in tm.last.items()}
    model = nnx.eval_shape(lambda: RAFT(RAFTConfig(), rngs=nnx.Rngs(0)))
    n = conv.load_state_dict(model, {"module." + k: v for k, v in tm.state_dict().items()})
    ja, jb = (x.permute(0, 2, 3, 1).numpy() for x in (a, b))
    ours_feats = dict(zip(("fmap1", "fmap2", "net", "inp"), nnx.jit(RAFT.features)(model, ja, jb)))
    ours = {it: nnx.jit(RAFT.__call__, static_argnums=3)(model, ja, jb, it) for it in ITERS}
    # the metric's path: two frames at 8 fps (both kept), raft_flow_fn's 20 updates
    video = dd.video_dynamic(np.concatenate([ja, jb]), 8.0, dd.raft_flow_fn(model))
    return {"n": n, "video": video, "sd": tm.state_dict(), "ref": ref, "ours": ours, "feats": feats, "ours_feats": ours_feats}


def test_features_and_context_match_torch(run):
    for k in ("fmap1", "fmap2", "net", "inp"):
        assert max_rel_err(run["ours_feats"][k], run["feats"][k]) <= 1e-5, k


def test_upsampled_flow_matches_torch_after_1_5_and_20_iterations(run):
    """The full-resolution flow (what VBench scores). Measured on CPU: 2.0e-6, 7.5e-7, 6.2e-7."""
    for it in ITERS:
        assert max_rel_err(run["ours"][it][1], run["ref"][it][1]) <= 1e-5, it
    assert np.abs(run["ref"][20][1]).max() > 1.0  # 20 updates move the match by pixels


def test_dynamic_degree_pair_score_on_our_raft_matches_torch_flow(run):
    """The metric on our RAFT scores the pair as VBench's rule does on the torch flow (1e-5 relative)."""
    ref = dd.pair_score(run["ref"][20][1][0])
    (ours,) = run["video"]["scores"]
    assert abs(ours - ref) <= 1e-5 * ref and ref > 1.0
    assert (run["video"]["threshold"], run["video"]["needed"]) == (3.0, 0)  # 6*128/256, round(4*2/16)


def test_coarse_flow_matches_torch(run):
    """The 1/8 flow: 1e-5 relative after 5 and 20 updates (measured 3.0e-6, 1.6e-6). After one update it
    is a few hundredths of a pixel, so the same float32 rounding is 1.5e-5 of its scale: asserted in
    pixels there (measured 1e-7 px)."""
    for it in (5, 20):
        assert max_rel_err(run["ours"][it][0], run["ref"][it][0]) <= 1e-5, it
    low, ref_low = np.asarray(run["ours"][1][0]), run["ref"][1][0]
    assert np.abs(low - ref_low).max() <= 1e-6 and np.abs(ref_low).max() < 0.1


def test_converter_takes_raft_things_keys_and_nothing_else(run):
    sd = {k: v.numpy() for k, v in run["sd"].items()}
    keys = conv.expected_keys(nnx.eval_shape(lambda: RAFT(RAFTConfig(), rngs=nnx.Rngs(0))))
    # raft-things.pth: 179 entries; cnet's 15 BatchNorms (+2 twins) count batches, its 2 strided blocks
    # save their shortcut norm twice (norm3.*: 5 keys each)
    twins = {k for k in sd if ".norm3." in k}
    counters = {k for k in sd if k.endswith("num_batches_tracked")}
    assert set(keys) == set(sd) - twins - counters and run["n"] == len(keys)
    assert len(sd) == 179 and len(twins) == 10 and len(counters) == 17
    model = nnx.eval_shape(lambda: RAFT(RAFTConfig(), rngs=nnx.Rngs(0)))
    for bad, what in (({**sd, "extra.weight": np.zeros(1)}, "unexpected key extra.weight"),
                      ({k: v for k, v in sd.items() if k != "update_block.mask.2.bias"},
                       "missing key update_block.mask.2.bias"),
                      ({**sd, "fnet.conv2.bias": np.zeros(3)}, "shape mismatch for fnet.conv2.bias"),
                      ({**sd, "cnet.layer3.0.norm3.bias": sd["cnet.layer3.0.norm3.bias"] + 1},
                       "differs from its twin")):
        with pytest.raises(CheckpointError, match=what):
            conv.load_state_dict(model, bad)
