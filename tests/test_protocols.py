"""``python -m mm_jax.evaluate --protocol``: frame rules, refusals before any work, the protocols whose
metrics are not ported yet (null with the reason), Magic Mirror's FM as ``ours`` computes it, and
``--compare published``."""
import json

import imageio.v3 as iio
import numpy as np
import pytest

from mm_jax import evaluate
from mm_jax.demo.standin_faces import face_image, make_pack
from mm_jax.metrics import published
from mm_jax.metrics.protocols import PROTOCOLS, FrameRule, frame_indices
from tools.convert_weights import curricularface_save


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("proto")
    pack = make_pack(root / "pack" / "buffalo_l")
    (root / "videos").mkdir(), (root / "refs").mkdir()
    frames = np.stack([face_image(at=(96, 160 + 4 * i)) for i in range(4)])
    np.save(root / "videos" / "a.npy", frames.astype(np.float32) / 255.0)
    iio.imwrite(root / "refs" / "a.png", face_image(at=(96, 160)))
    return root, pack


def _run(root, pack, *extra):
    out = root / f"r{len(extra)}_{abs(hash(extra))}.json"
    rc = evaluate.main(["--videos", str(root / "videos"), "--refs", str(root / "refs"), "--face-models", str(pack),
                        "--out", str(out), "--quiet", *extra])
    return rc, (json.loads(out.read_text()) if out.exists() else None)


def test_frame_rules_by_hand():
    assert frame_indices(FrameRule("strided", 16), 20).tolist() == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16,
                                                                     17, 18]
    assert frame_indices(FrameRule("linspace", 32), 49).tolist()[:6] == [0, 1, 3, 4, 6, 7]  # 48 i / 31, truncated
    assert frame_indices(FrameRule("linspace", 16), 1).tolist() == [0] * 16
    assert frame_indices(FrameRule("all"), 3).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="0 frames"):
        frame_indices(FrameRule("all"), 0)


def test_every_named_metric_is_computed_or_null_with_a_reason():
    for p in PROTOCOLS.values():
        assert set(p.not_computed) <= set(p.metrics) and all(p.not_computed.values())
        assert p.compares_with and p.reference_code
    names = {m for p in PROTOCOLS.values() for m in p.metrics}
    assert {"facesim_arc", "facesim_cur", "clipscore", "face_fid", "dynamic_degree", "fm_ref", "fm_inter"} <= names


def test_unknown_protocol_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--protocol", "vbench", "--face-models", "x", "--out", "x.json"])
    assert e.value.code == 2 and "invalid choice: 'vbench'" in capsys.readouterr().err


def test_refusals_come_before_any_work_and_write_nothing(tmp_path, capsys):
    base = ["--videos", str(tmp_path / "none"), "--refs", str(tmp_path / "none"), "--face-models",
            str(tmp_path / "none"), "--out", str(tmp_path / "r.json"), "--quiet"]
    assert evaluate.main(base + ["--protocol", "consisid"]) == 2
    assert "--protocol consisid needs --clip DIR" in capsys.readouterr().err
    assert evaluate.main(base + ["--protocol", "consisid", "--clip", "c", "--det-thresh", "0.3"]) == 2
    assert "fixes it at 0.5" in capsys.readouterr().err
    assert evaluate.main(base + ["--compare", "published"]) == 2
    assert "needs a peer protocol" in capsys.readouterr().err
    assert evaluate.main(base + ["--protocol", "opens2v", "--curricularface", str(tmp_path / "cur.safetensors")]) == 2
    assert f"--curricularface {tmp_path / 'cur.safetensors'}: no such file" in capsys.readouterr().err
    (tmp_path / "cur.bin").write_bytes(b"")  # the published torch file: convert it first
    assert evaluate.main(base + ["--protocol", "opens2v", "--curricularface", str(tmp_path / "cur.bin")]) == 2
    assert "curricularface_save.py" in capsys.readouterr().err
    assert curricularface_save.main([str(tmp_path / "none.bin"), str(tmp_path / "c.safetensors")]) == 2
    assert "no such file" in capsys.readouterr().err and not (tmp_path / "c.safetensors").exists()
    assert not (tmp_path / "r.json").exists()


def test_magicmirror_fm_equals_ours_and_dynamic_degree_is_null_with_the_reason(case):
    root, pack = case
    rc0, ours = _run(root, pack)
    rc1, mm = _run(root, pack, "--protocol", "magicmirror", "--compare", "published")
    assert rc0 == rc1 == 0
    a, b = ours["videos"][0], mm["videos"][0]
    assert b["fm_inter"] == pytest.approx(1.0, abs=1e-5)  # 4 px moves / 4 px inter-ocular distance
    assert (b["fm_ref"], b["fm_inter"], b["fm_inter_pairs"]) == (a["fm_ref"], a["fm_inter"], a["fm_inter_pairs"])
    assert b["dynamic_degree"] is None and "RAFT" in mm["not_computed"]["dynamic_degree"]
    assert set(mm["protocol"]["reimplemented"]) == {"fm_ref", "fm_inter"}
    assert "2501.03931v2" in mm["protocol"]["compares_with"]
    yours = mm["compare"]["rows"][-1]
    assert yours["fm_inter"] == mm["mean"]["fm_inter"] and yours["dynamic_degree"] is None


def test_opens2v_reports_every_metric_null_with_its_reason(case):
    root, pack = case
    rc, rep = _run(root, pack, "--protocol", "opens2v")
    assert rc == 0 and rep["protocol"]["name"] == "opens2v"
    assert set(rep["not_computed"]) == {"facesim_cur", "gmescore", "nexusscore", "naturalscore"}
    assert all(rep["videos"][0][k] is None for k in rep["not_computed"]) and rep["videos"][0]["frames"] == 4
    assert rep["not_computed"]["facesim_cur"].startswith("needs --curricularface PATH")


def test_compare_table_puts_your_means_in_the_published_units():
    rows = published.compare_rows("opens2v", {"facesim_cur": 0.5})
    assert rows[-1] == {"model": "yours", "facesim_cur": 50.0} and rows[0]["facesim_cur"] == 43.14
    text = published.format_compare("consisid", {"facesim_arc": 0.4123, "clipscore": 25.0})
    lines = text.splitlines()
    assert "Table 1" in lines[0] and lines[-1].split() == ["yours", "0.4123", "-", "25", "-"]
    assert lines[2].split() == ["ConsisID", "0.58", "0.6", "27.93", "151.8"]
    with pytest.raises(ValueError, match="no published table"):
        published.table("ours")
