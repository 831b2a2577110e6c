"""``--protocol magicmirror --raft``: VBench's dynamic degree from the CLI equals VBench's rule (``VBenchRule``,
restated from ``vbench/dynamic_degree.py`` in ``tests/test_raft_dynamic_degree.py``) applied by hand to the flows
of the same RAFT (a tiny random config with its flow head scaled by 0.03, so that pair scores land near the
thresholds, saved as ``tools/convert_weights/raft.py --out`` saves it; the port's equality with torch at the release
sizes is ``tests/test_raft.py``). Three videos of a bright square moving over a fixed background: two mp4s at 24 fps
(their own rate: every 3rd of 13 frames kept, 5 kept, 1 pair needed), 240x320 (threshold 5.625 px: not dynamic)
and 48x64 (threshold 1.125 px: dynamic), and a .npy of 3 frames at ``--fps 30`` (every 4th frame: one kept frame,
no pair, never dynamic)."""
import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from flax import nnx

from mm_jax import evaluate
from mm_jax.demo.standin_faces import face_image, make_pack
from mm_jax.metrics import dynamic_degree as dd
from mm_jax.models.raft import RAFT, RAFTConfig
from mm_jax.video_io import read_video, write_frames
from tests.test_raft_dynamic_degree import VBenchRule

pytestmark = pytest.mark.slow  # four RAFT compiles (two sizes, CLI and the hand rule); minutes on a busy host

TINY = RAFTConfig(stem_channels=8, layer_channels=(8, 8, 16), feature_dim=16, hidden_dim=8, context_dim=8,
                  corr_levels=2, corr_radius=1, corr_channels=(8, 8), flow_channels=(8, 8), motion_dim=8,
                  flow_head_dim=8, mask_dim=8)


def _moving(n, h=240, w=320):
    return np.stack([face_image(h=h, w=w, at=(h // 2 - 24 * (h > 100), w // 2 - 20 + 4 * i), seed=0)
                     for i in range(n)])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    pack = make_pack(root / "pack" / "buffalo_l")
    (root / "videos").mkdir(), (root / "refs").mkdir()
    write_frames(root / "videos" / "walk.mp4", _moving(13).astype(np.float32) / 255.0, fps=24)
    write_frames(root / "videos" / "small.mp4", _moving(13, 48, 64).astype(np.float32) / 255.0, fps=24)
    np.save(root / "videos" / "blink.npy", _moving(3).astype(np.float32) / 255.0)
    for name in ("walk", "small", "blink"):
        iio.imwrite(root / "refs" / f"{name}.png", face_image(at=(96, 160)))
    model = RAFT(TINY, rngs=nnx.Rngs(0))
    for v in (model.update_block.flow_head.conv2.kernel, model.update_block.flow_head.conv2.bias):
        v.set_value(v.get_value() * 0.03)  # random RAFT flows of ~150 px down to ~3 px
    dd.save_raft(model, root / "raft.safetensors")
    argv = ["--protocol", "magicmirror", "--videos", str(root / "videos"), "--refs", str(root / "refs"),
            "--face-models", str(pack), "--out", str(root / "r.json"), "--quiet", "--raft",
            str(root / "raft.safetensors"), "--fps", "30", "--compare", "published"]
    rc = evaluate.main(argv)
    return dict(rc=rc, rep=json.loads((root / "r.json").read_text()), root=root, model=model, argv=argv)


def _vbench_by_hand(frames, fps, model):
    """VBench's DynamicDegree on ``frames`` with ``model``'s flow: (verdict, pair scores, threshold, needed)."""
    step = nnx.jit(lambda m, a, b: m(a, b, 20)[1])
    kept = [torch.from_numpy(frames[i].astype(np.float32)).permute(2, 0, 1)[None]
            for i in VBenchRule.kept(len(frames), fps)]
    thres, needed = VBenchRule.params(kept[0], len(kept))
    scores = []
    for a, b in zip(kept[:-1], kept[1:]):
        a, b = (VBenchRule.pad(x).permute(0, 2, 3, 1).numpy() for x in (a, b))
        flow = np.asarray(step(model, a, b))
        scores.append(VBenchRule.get_score(torch.from_numpy(flow).permute(0, 3, 1, 2)))
    return VBenchRule.check_move(scores, thres, needed), scores, thres, needed


def test_dynamic_degree_from_the_cli_equals_vbenchs_rule_by_hand(run):
    assert run["rc"] == 0
    rep = run["rep"]
    by_name = {v["name"]: v for v in rep["videos"]}
    walk, small, blink = by_name["walk"], by_name["small"], by_name["blink"]
    assert (walk["fps"], walk["fps_source"], blink["fps"], blink["fps_source"]) == (24.0, "mp4", 30.0, "--fps")
    assert walk["dynamic_frames"] == small["dynamic_frames"] == [0, 3, 6, 9, 12] and blink["dynamic_frames"] == [0]
    errs = []
    for row, side, want in ((walk, 240, False), (small, 48, True)):
        frames = read_video(run["root"] / "videos" / f"{row['name']}.mp4")
        verdict, scores, thres, needed = _vbench_by_hand(frames, 24.0, run["model"])
        assert (row["dynamic_threshold"], row["dynamic_needed"]) == (thres, needed) == (6.0 * side / 256, 1)
        errs.append(max(abs(a - b) / abs(b) for a, b in zip(row["dynamic_scores"], scores)))
        assert len(row["dynamic_scores"]) == 4 and errs[-1] <= 1e-5
        assert row["dynamic"] is verdict is want and row["dynamic_degree"] == float(want)
        print(row["name"], "pair scores", row["dynamic_scores"], "threshold", thres)
    assert max(walk["dynamic_scores"]) < walk["dynamic_threshold"]  # four pairs scored, none above
    assert blink["dynamic"] is False and blink["dynamic_scores"] == [] and blink["dynamic_degree"] == 0.0
    assert rep["mean"]["dynamic_degree"] == pytest.approx(1 / 3, abs=1e-12) and rep["not_computed"] == {}
    assert rep["compare"]["rows"][-1]["dynamic_degree"] == rep["mean"]["dynamic_degree"]
    assert "2501.03931v2" in rep["protocol"]["compares_with"]
    assert walk["fm_inter"] is not None and set(rep["protocol"]["reimplemented"]) == {"fm_ref", "fm_inter"}
    print("dynamic_degree pair scores max rel err vs the rule by hand", max(errs))


def test_bad_raft_inputs_exit_2_before_any_work_naming_them(run, tmp_path, capsys):
    argv, root = list(run["argv"]), run["root"]
    argv[argv.index("--out") + 1] = str(tmp_path / "r.json")
    missing = argv.copy()
    missing[missing.index("--raft") + 1] = str(tmp_path / "raft.safetensors")
    assert evaluate.main(missing) == 2
    assert f"--raft {tmp_path / 'raft.safetensors'}: no such file" in capsys.readouterr().err
    (tmp_path / "raft-things.pth").write_bytes(b"")  # the published torch file: convert it first
    pth = argv.copy()
    pth[pth.index("--raft") + 1] = str(tmp_path / "raft-things.pth")
    assert evaluate.main(pth) == 2
    assert "tools/convert_weights/raft.py raft-things.pth --out" in capsys.readouterr().err
    no_fps = argv[:argv.index("--fps")] + argv[argv.index("--fps") + 2:]
    assert evaluate.main(no_fps) == 2
    assert f"video {root / 'videos' / 'blink.npy'}: no frame rate" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_raft_converter_out_file_is_what_raft_reads(tmp_path):
    """``tools/convert_weights/raft.py raft-things.pth --out`` on a release-size state dict saved as the published
    file is (``module.`` prefixes, BN counters, the norm3 twins) gives the file ``--raft`` loads: every tensor equal."""
    from mm_jax.metrics import torch_named
    from tests.test_raft import torch_model
    from tools.convert_weights import raft as conv

    sd = {f"module.{k}": v for k, v in torch_model().state_dict().items()}
    torch.save(sd, tmp_path / "raft-things.pth")
    assert conv.main([str(tmp_path / "raft-things.pth"), "--out", str(tmp_path / "raft.safetensors")]) == 0
    ours = torch_named.tensors_of(dd.load_raft(tmp_path / "raft.safetensors"), dd.DROP_PARTS)
    want = {k[len("module."):]: v.numpy() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    twins = {k for k in want if ".norm3." in k and k.replace(".norm3.", ".downsample.1.") in want}
    assert twins and set(ours) == set(want) - twins and len(ours) == len(conv.expected_keys(dd.load_raft(
        tmp_path / "raft.safetensors")))
    assert all(np.array_equal(ours[k], want[k]) for k in ours)
