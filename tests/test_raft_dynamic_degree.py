"""``mm_jax.metrics.dynamic_degree`` equals VBench's ``DynamicDegree`` arithmetic (``vbench/dynamic_degree.py``
and RAFT's ``InputPadder``, restated below in torch/numpy as VBench writes them) exactly on given flows:
frame choice, padding, the top-5% pair score, threshold, needed count and the verdict."""
import numpy as np
import pytest

from mm_jax.metrics import dynamic_degree as dd


class VBenchRule:
    """VBench's ``DynamicDegree`` minus the model: ``extract_frame``, ``InputPadder('sintel')``,
    ``get_score``, ``set_params``, ``check_move`` (torch NCHW frames)."""

    @staticmethod
    def kept(n, fps):
        interval = max(1, round(fps / 8))
        return list(range(0, n, interval))

    @staticmethod
    def pad(x):
        import torch.nn.functional as F

        ht, wd = x.shape[-2:]
        pad_ht = (((ht // 8) + 1) * 8 - ht) % 8
        pad_wd = (((wd // 8) + 1) * 8 - wd) % 8
        return F.pad(x, [pad_wd // 2, pad_wd - pad_wd // 2, pad_ht // 2, pad_ht - pad_ht // 2], mode="replicate")

    @staticmethod
    def get_score(flo):  # flo: (1, 2, h, w) torch
        flo = flo[0].permute(1, 2, 0).numpy()
        rad = np.sqrt(np.square(flo[:, :, 0]) + np.square(flo[:, :, 1]))
        h, w = rad.shape
        return np.mean(abs(np.sort(-rad.flatten()))[:int(h * w * 0.05)]).item()

    @staticmethod
    def params(frame, count):
        scale = min(list(frame.shape)[-2:])
        return 6.0 * (scale / 256.0), round(4 * (count / 16.0))

    @staticmethod
    def check_move(scores, thres, count_num):
        count = 0
        for s in scores:
            if s > thres:
                count += 1
            if count >= count_num:
                return True
        return False


@pytest.mark.parametrize("fps", [4, 8, 12, 16, 20, 24, 25, 30, 59.94])
def test_frame_interval_keeps_vbench_frames(fps):
    assert list(range(49)[::dd.frame_interval(fps)]) == VBenchRule.kept(49, fps)


def test_padding_replicates_like_input_padder():
    import torch

    x = np.random.default_rng(0).uniform(0, 255, (2, 61, 90, 3)).astype(np.float32)
    ref = VBenchRule.pad(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(dd.pad_frames(x), ref)


def test_pair_score_threshold_and_count_equal_vbench():
    import torch

    rng = np.random.default_rng(1)
    for h, w in ((64, 96), (480, 720), (61, 90)):
        flow = (rng.standard_normal((h, w, 2)) * rng.uniform(0.5, 8)).astype(np.float32)
        flow[: h // 3] = np.round(flow[: h // 3])  # ties in the magnitudes
        assert dd.pair_score(flow) == VBenchRule.get_score(torch.from_numpy(flow).permute(2, 0, 1)[None])
        for n in range(1, 14):
            assert dd.thresholds(h, w, n) == VBenchRule.params(np.zeros((1, 3, h, w)), n)


def test_verdict_equals_check_move():
    rng = np.random.default_rng(2)
    for _ in range(300):
        n = int(rng.integers(0, 14))
        scores = list(rng.uniform(0, 10, n))
        thres, needed = float(rng.uniform(0, 10)), int(rng.integers(0, 5))
        assert dd.is_dynamic(scores, thres, needed) == VBenchRule.check_move(scores, thres, needed)
    assert dd.is_dynamic([], 1.0, 0) is False and dd.is_dynamic([0.0], 1.0, 0) is True


def test_video_verdict_on_given_flows_equals_vbench():
    """25 fps, 17 frames of 61x90: frames 0, 3, ..., 15 kept (6), padded to 64x96, 5 pairs scored, 2 needed;
    the flow of a pair is a fixed function of the pair's padded frames, fed to both rules."""
    import torch

    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, (17, 61, 90, 3)).astype(np.uint8)

    def flow_fn(a, b):  # (B, h, w, 3) pairs -> (B, h, w, 2): magnitudes around 2-4 px
        return np.stack([a[..., 0] - b[..., 1], a[..., 2] - b[..., 0]], -1) / 64.0

    ours = dd.video_dynamic(frames, 25.0, flow_fn, batch=2)
    t = [torch.from_numpy(frames[i].astype(np.float32)).permute(2, 0, 1)[None] for i in VBenchRule.kept(17, 25.0)]
    thres, needed = VBenchRule.params(t[0], len(t))
    scores = []
    for a, b in zip(t[:-1], t[1:]):
        a, b = VBenchRule.pad(a), VBenchRule.pad(b)
        f = flow_fn(a.permute(0, 2, 3, 1).numpy(), b.permute(0, 2, 3, 1).numpy())
        scores.append(VBenchRule.get_score(torch.from_numpy(f).permute(0, 3, 1, 2)))
    assert ours["scores"] == scores and len(scores) == 5 and ours["interval"] == 3
    assert (ours["threshold"], ours["needed"]) == (thres, needed) == (6.0 * 61 / 256, 2)
    assert ours["dynamic"] == VBenchRule.check_move(scores, thres, needed)
    assert dd.dynamic_degree([True, False, True, True]) == 0.75
