"""``--benchmark opens2v DIR``: OpenS2V-Eval's folder read as distributed (a tiny fixture in its layout:
``Human-Domain_Eval.json`` of case id -> {prompt, img_paths}, references under ``Images/``), paired with the
videos by case id, evaluated with the opens2v protocol and its seed; ``benchmarks/eval_prompts.py --benchmark``
plans one sampling line per case with that seed and evaluates what was sampled. Bad folders exit 2 naming them."""
import json
import warnings

import imageio.v3 as iio
import numpy as np
import pytest

from mm_jax import evaluate, sample
from mm_jax.demo.standin_faces import face_image, make_pack
from mm_jax.metrics import benchmarks
from mm_jax.video_io import write_frames

CASES = {  # ids and img_paths as the benchmark spells them; the reference is the first under a person folder
    "singlehuman_1": {"prompt": "a man reads a book", "img_paths": ["Images/humanobj/man/m1.png",
                                                                   "Images/humanobj/object/book.png"]},
    "singleface_2": {"prompt": "a woman smiles", "img_paths": ["Images/singleface/object/hat.png",
                                                              "Images/singleface/woman/w2.png"]},
    "humanobj_3": {"prompt": "a dog runs", "img_paths": ["Images/humanobj/object/dog.png"]},  # no person: skipped
    "singleobj_4": {"prompt": "a cup", "img_paths": ["Images/singleobj/cup.png"]},  # not Human-Domain
}


def _face_video(n=4):
    return np.stack([face_image(at=(96, 160), seed=i) for i in range(n)]).astype(np.float32) / 255.0  # found at 320


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("opens2v")
    pack = make_pack(root / "models" / "buffalo_l")
    b = root / "OpenS2V-Eval"
    for case in CASES.values():
        for p in case["img_paths"]:
            (b / p).parent.mkdir(parents=True, exist_ok=True)
            iio.imwrite(b / p, face_image(at=(96, 160)))
    (b / "Human-Domain_Eval.json").write_text(json.dumps(CASES))
    (root / "videos").mkdir()
    for name in ("singlehuman_1", "singleface_2", "unrelated"):
        np.save(root / "videos" / f"{name}.npy", _face_video())
    return root, b, pack


def test_reader_takes_the_human_cases_their_first_person_reference_and_prompt(bench):
    root, b, _ = bench
    with pytest.warns(UserWarning, match=r"1 Human-Domain case\(s\) have no reference.*humanobj_3"):
        cases = benchmarks.cases("opens2v", b)
    assert [(c.id, c.prompt, c.ref) for c in cases] == [
        ("singlehuman_1", "a man reads a book", b / "Images/humanobj/man/m1.png"),
        ("singleface_2", "a woman smiles", b / "Images/singleface/woman/w2.png")]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pairs = benchmarks.pairs("opens2v", b, root / "videos")
    assert [p.name for p in pairs] == ["singlehuman_1", "singleface_2"]
    assert any("unrelated" in str(x.message) for x in w)


def test_cli_evaluates_the_benchmark_with_the_opens2v_protocol_and_its_seed(bench, tmp_path):
    root, b, pack = bench
    out = tmp_path / "r.json"
    rc = evaluate.main(["--benchmark", "opens2v", str(b), "--videos", str(root / "videos"), "--face-models",
                        str(pack), "--out", str(out), "--quiet", "--compare", "published"])
    rep = json.loads(out.read_text())
    assert rc == 0 and rep["protocol"]["name"] == "opens2v" and rep["protocol"]["seed"] == 42
    assert rep["settings"]["benchmark"] == {"name": "opens2v", "dir": str(b), "seed": 42}
    rows = {v["name"]: v for v in rep["videos"]}
    assert rows["singleface_2"]["ref"] == str(b / "Images/singleface/woman/w2.png")
    assert rows["singlehuman_1"]["prompt"] == "a man reads a book" and len(rows) == 2
    assert all(v["facesim_arc_frames"] == np.linspace(0, 3, 32, dtype=int).tolist() for v in rows.values())
    assert all(v["facesim_arc"] > 0 and v["facesim_arc_faces"] == 32 for v in rows.values())
    assert {"gmescore", "nexusscore", "naturalscore"} <= set(rep["not_computed"])
    assert "GPT-4o" in rep["not_computed"]["naturalscore"] and "7B" in rep["not_computed"]["gmescore"]


def test_eval_prompts_samples_each_case_with_the_benchmark_seed_then_evaluates(bench, tmp_path, monkeypatch):
    from benchmarks import eval_prompts

    root, b, pack = bench
    lines = []

    def fake_sample(cmd):  # writes every planned video, as mm_jax.sample would
        todo = [json.loads(x) for x in open(cmd[cmd.index("--prompts") + 1])]
        lines.extend(todo)
        for t in todo:
            write_frames(t["out"], _face_video(), fps=8)
        return 0

    monkeypatch.setattr(sample, "main", fake_sample)
    args = ["--checkpoint", "ckpt", "--adapter", "ad", "--face-models", str(pack), "--out-dir", str(tmp_path / "o"),
            "--benchmark", "opens2v", str(b)]
    assert eval_prompts.main(args) == 0
    assert [(t["prompt"], t["ref"], t["seed"], t["out"]) for t in lines] == [
        ("a man reads a book", str((b / "Images/humanobj/man/m1.png").resolve()), 42,
         str(tmp_path / "o" / "videos" / "singlehuman_1.mp4")),
        ("a woman smiles", str((b / "Images/singleface/woman/w2.png").resolve()), 42,
         str(tmp_path / "o" / "videos" / "singleface_2.mp4"))]
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["protocol"]["name"] == "opens2v" and [v["name"] for v in rep["videos"]] == ["singlehuman_1",
                                                                                          "singleface_2"]
    assert eval_prompts.main(args + ["--", "--seed", "3"]) == 2


def test_a_benchmark_folder_without_its_json_exits_2_naming_it(bench, tmp_path, capsys):
    from benchmarks import eval_prompts

    root, _, pack = bench
    (tmp_path / "empty").mkdir()
    base = ["--face-models", str(pack), "--out", str(tmp_path / "r.json"), "--videos", str(root / "videos")]
    assert evaluate.main(["--benchmark", "opens2v", str(tmp_path / "empty"), *base]) == 2
    assert f"{tmp_path / 'empty'}: no Human-Domain_Eval.json" in capsys.readouterr().err
    assert evaluate.main(["--benchmark", "opens2v", str(root), "--protocol", "consisid", *base]) == 2
    assert "evaluated with its own protocol" in capsys.readouterr().err
    assert eval_prompts.main(["--checkpoint", "c", "--adapter", "a", "--face-models", str(pack), "--out-dir",
                              str(tmp_path / "o"), "--benchmark", "opens2v", str(tmp_path / "empty")]) == 2
    assert "no Human-Domain_Eval.json" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "o").exists()
