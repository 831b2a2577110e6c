"""``--benchmark consisid DIR``: ConsisID's eval set read as distributed (a tiny fixture in the layout of
BestWishYsh/ConsisID-preview-Data: ``video_caption_eval_old.csv`` with columns index,Class,Original_Prompt,
Refined_man,Refined_woman and photos in ``eval/face_images/``). As PKU-YuanGroup/ConsisID
``eval/eval_all_in_once.py`` loops: photos in natsort order x CSV rows, ``Refined_woman`` for a photo whose name
holds "woman", ``{class_token}`` -> ``Class``, case name ``<photo file name>--<index>``, seed 42. The videos are
paired by case name and scored with the consisid protocol; ``benchmarks/eval_prompts.py --benchmark consisid``
plans one sampling line per case. Bad folders exit 2 naming what is wrong."""
import json
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from mm_jax import evaluate, sample
from mm_jax.demo.standin_faces import face_image, make_pack
from mm_jax.metrics import benchmarks
from mm_jax.video_io import write_frames
from tests.conftest import randomize_torch_params
from tests.test_clip_alignment import _tokenizer
from tests.test_curricularface import TINY, randomize, torch_backbone
from tests.test_protocol_consisid import _inception_state_dict
from tools.convert_weights.curricularface_save import convert as save_curricularface
from tools.convert_weights.from_torch import convert
from tools.convert_weights.inception_v3 import save_kept as save_inception

CSV = ('index,Class,Original_Prompt,Refined_man,Refined_woman\n'
       '3,person,a person waves,"a {class_token} waves, he",a {class_token} waves\n'
       '12,chef,a chef cooks,a {class_token} cooks,"a {class_token} bakes, she"\n')
PHOTOS = ("10_woman.png", "2_man.png")  # natsort: 2_man first (a plain sort puts 10_woman first)
# (case name, prompt, photo), in their loop's order: photos outer, rows inner
CASES = [("2_man.png--3", "a person waves, he", "2_man.png"), ("2_man.png--12", "a chef cooks", "2_man.png"),
         ("10_woman.png--3", "a person waves", "10_woman.png"), ("10_woman.png--12", "a chef bakes, she", "10_woman.png")]
METRICS = ("facesim_arc", "facesim_cur", "clipscore", "face_fid")


def _face_video(n=4):
    return np.stack([face_image(at=(96, 160), seed=i) for i in range(n)]).astype(np.float32) / 255.0  # found at 320


def _models(root):
    """A tiny random ViT-B/32-shaped CLIP, CurricularFace and Inception v3, converted as a user would."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=64, patch_size=32), projection_dim=24)
    model = CLIPModel(cfg).eval()
    randomize_torch_params(model, 0)
    model.save_pretrained(root / "hf")
    _tokenizer().save_pretrained(root / "hf")
    cur = torch_backbone(TINY)
    randomize(cur)
    torch.save(cur.eval().state_dict(), root / "cur.bin")
    save_curricularface(root / "cur.bin", root / "cur.safetensors", TINY)
    save_inception(_inception_state_dict(), root / "inception.safetensors")
    return ["--clip", str(convert(root / "hf", root / "ckpt", ["clip"])), "--curricularface",
            str(root / "cur.safetensors"), "--inception", str(root / "inception.safetensors")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    root = tmp_path_factory.mktemp("consisid_bench")
    pack = make_pack(root / "models" / "buffalo_l")
    b = root / "ConsisID-preview-Data"
    (b / "eval" / "face_images").mkdir(parents=True)
    for name in PHOTOS:
        iio.imwrite(b / "eval" / "face_images" / name, face_image(at=(96, 160)))
    (b / "video_caption_eval_old.csv").write_text(CSV)
    (root / "videos").mkdir()
    for name, _, _ in CASES:
        np.save(root / "videos" / f"{name}.npy", _face_video())
    return root, b, pack


def test_reader_crosses_natsorted_photos_with_the_rows_as_their_script(bench):
    _, b, _ = bench
    cases = benchmarks.cases("consisid", b)
    assert [(c.id, c.prompt, c.ref) for c in cases] == [(n, p, b / "eval/face_images" / f) for n, p, f in CASES]
    assert sorted(["10_a", "2_a", "1_b", "2_b"], key=benchmarks.natural_key) == ["1_b", "2_a", "2_b", "10_a"]


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    """One ``eval_prompts.py --benchmark consisid`` run (a stand-in sampler writes every planned video), whose
    evaluation is ``python -m mm_jax.evaluate --benchmark consisid DIR --videos OUT/videos`` with all four models."""
    from benchmarks import eval_prompts

    root, b, pack = bench
    models = _models(tmp_path_factory.mktemp("models"))
    o = root / "o"
    lines = []

    def fake_sample(cmd):  # writes every planned video, as mm_jax.sample would
        todo = [json.loads(x) for x in open(cmd[cmd.index("--prompts") + 1])]
        lines.extend(todo)
        for t in todo:
            write_frames(t["out"], _face_video(), fps=8)
        return 0

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sample, "main", fake_sample)
        rc = eval_prompts.main(["--checkpoint", "ckpt", "--adapter", "ad", "--face-models", str(pack), "--out-dir",
                                str(o), "--benchmark", "consisid", str(b), *models])
    return dict(rc=rc, lines=lines, o=o, b=b, rep=json.loads((o / "report.json").read_text()))


@pytest.mark.slow
def test_eval_prompts_plans_one_line_per_case_with_seed_42(run):
    o, b = run["o"], run["b"]
    assert run["rc"] == 0
    assert run["lines"] == [{"prompt": p, "out": str(o / "videos" / f"{n}.mp4"),
                             "ref": str((b / "eval/face_images" / f).resolve()), "seed": 42} for n, p, f in CASES]


@pytest.mark.slow
def test_evaluate_scores_every_case_with_the_consisid_protocol_and_its_seed(run):
    rep, b = run["rep"], run["b"]
    assert rep["protocol"]["name"] == "consisid" and rep["protocol"]["seed"] == 42
    assert rep["settings"]["benchmark"] == {"name": "consisid", "dir": str(b), "seed": 42}
    assert [(v["name"], v["prompt"], v["ref"]) for v in rep["videos"]] == [
        (n, p, str(b / "eval/face_images" / f)) for n, p, f in CASES]
    assert rep["not_computed"] == {}
    assert all(isinstance(v[m], float) for v in rep["videos"] for m in METRICS)
    assert all(v["facesim_arc"] > 0 and v["facesim_arc_frames"] == np.linspace(0, 3, 16, dtype=int).tolist()
               for v in rep["videos"])
    assert rep["mean"]["videos_counted"] == {m: 4 for m in METRICS}
    for m in METRICS:  # statistics.mean over the cases, as eval_all_in_once.py averages
        assert rep["mean"][m] == pytest.approx(np.mean([v[m] for v in rep["videos"]]), rel=1e-12, abs=1e-12)
    print("consisid bench means", {m: round(rep["mean"][m], 6) for m in METRICS})


def test_a_missing_video_is_named_and_left_out_of_the_means(bench, tmp_path):
    root, b, _ = bench
    (tmp_path / "v").mkdir()
    for name, _, _ in CASES[1:]:
        (tmp_path / "v" / f"{name}.npy").symlink_to(root / "videos" / f"{name}.npy")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pairs = benchmarks.pairs("consisid", b, tmp_path / "v")
    assert [p.name for p in pairs] == [n for n, _, _ in CASES[1:]]
    assert any("1 of 4 cases have no video" in str(x.message) and "2_man.png--3" in str(x.message) for x in w)


def test_a_folder_not_in_the_layout_exits_2_naming_it(bench, tmp_path, capsys):
    from benchmarks import eval_prompts

    root, b, pack = bench
    no_faces, no_col = tmp_path / "no_faces", tmp_path / "no_col"
    no_faces.mkdir()
    (no_faces / "video_caption_eval_old.csv").write_text(CSV)
    (no_col / "eval" / "face_images").mkdir(parents=True)
    (no_col / "video_caption_eval_old.csv").write_text(CSV.replace("Refined_woman", "Refined_w"))
    clip = ["--clip", str(tmp_path / "ckpt")]  # the folder is refused before any model is read
    base = ["--face-models", str(pack), "--out", str(tmp_path / "r.json"), "--videos", str(root / "videos"), *clip]
    for folder, want in ((tmp_path, f"{tmp_path}: no video_caption_eval_old.csv"),
                         (no_faces, f"{no_faces}: no eval/face_images/ folder"),
                         (no_col, f"{no_col / 'video_caption_eval_old.csv'}: no column Refined_woman")):
        assert evaluate.main(["--benchmark", "consisid", str(folder), *base]) == 2
        assert want in capsys.readouterr().err
    ep = ["--checkpoint", "c", "--adapter", "a", "--face-models", str(pack), "--out-dir", str(tmp_path / "o")]
    assert eval_prompts.main(ep + ["--benchmark", "consisid", str(no_col), *clip]) == 2
    assert "no column Refined_woman" in capsys.readouterr().err
    assert eval_prompts.main(ep + ["--benchmark", "consisid", str(b)]) == 2  # its clipscore needs --clip
    assert "needs --clip" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "o").exists()
