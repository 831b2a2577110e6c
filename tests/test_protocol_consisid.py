"""``--protocol consisid`` equals ConsisID's evaluation scripts on the same inputs.

The reference below is a re-statement of the arithmetic of PKU-YuanGroup/ConsisID
``eval/get_facesim_fid.py`` (FaceSim-Arc: 16 linspace frames, insightface ``FaceAnalysis`` at 320,
largest face by a sorted()[-1], 25% grey-pad retry, cos clamped at 0, faceless frames skipped, 0 for
a video without a face) and ``eval/get_clipscore.py`` (16 frames int(i*N/16), BGR arrays into
transformers' ``CLIPProcessor``, mean ``logits_per_image``), run with insightface itself and
transformers' CLIPModel on the stand-in face pack and a tiny random ViT-B/32-shaped CLIP. FaceSim-Cur
(both scripts: the same faces, ``norm_crop(image_bgr, kps, 224)`` -> RGB -> ``inference`` (resize 112,
``(x/255-0.5)/0.5``, IR, L2) -> clamped cos; ConsisID averages the frames with a face, OpenS2V-Eval also
drops the zeros) runs TFace's IR restated in torch (``tests/test_curricularface.py``) with a tiny random
config saved as the published ``.bin`` and converted by ``tools/convert_weights/curricularface_save.py``."""
import json

import cv2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
from flax import nnx

from mm_jax import evaluate
from mm_jax.demo.standin_faces import face_image, make_pack
from mm_jax.models.inception_v3 import InceptionV3Config, InceptionV3Features
from tests.conftest import max_rel_err, randomize_torch_params
from tests.test_clip_alignment import _tokenizer
from tests.test_curricularface import TINY, randomize, torch_backbone
from tools.convert_weights.curricularface_save import convert as save_curricularface
from tools.convert_weights.from_torch import convert
from tools.convert_weights.inception_v3 import expected_keys as inception_keys
from tools.convert_weights.inception_v3 import load as load_inception
from tools.convert_weights.inception_v3 import save_kept as save_inception

FACE, FACE2, PAD_ONLY = (95, 160), (95, 200), (108, 148)  # PAD_ONLY: found at 320 only after the grey pad
PROMPT = "a man waves"


def _frame(kind, seed):
    if kind == "dark":
        return (np.random.default_rng(seed).random((240, 320, 3)) * 40).astype(np.uint8)
    if kind == "two":
        img = face_image(at=FACE, seed=seed)
        img[FACE2[0] - 2:FACE2[0] + 3, FACE2[1] - 2:FACE2[1] + 3] = 255
        return img
    return face_image(at=PAD_ONLY if kind == "pad" else FACE, seed=seed)


# 20 frames: linspace(0, 19, 16) skips 4, 9, 14, 18
MIX = ["face", "face", "dark", "face", "face", "pad", "pad", "face", "two", "face", "face", "dark", "face", "face",
       "face", "face", "pad", "face", "face", "face"]
VIDEOS = {"mix": MIX, "noface": ["dark"] * 3, "short": ["face", "pad", "two", "face", "dark"]}
INCEPTION = InceptionV3Config(pool_features=(2, 3, 4), channels_7x7=(3, 4, 5, 6))  # narrow where it may be


def _inception_state_dict(seed=0) -> dict:
    """Random torchvision-named Inception v3 tensors (scaled He init, BN near identity), as the published file."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: InceptionV3Features(INCEPTION, rngs=nnx.Rngs(0)))
    sd = {}
    for k, shape in inception_keys(abstract).items():
        if k.endswith("conv.weight"):
            sd[k] = rng.standard_normal(shape).astype(np.float32) * np.sqrt(2.0 / np.prod(shape[1:]))
        elif k.endswith("running_var"):
            sd[k] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[k] = (rng.standard_normal(shape) * 0.1 + (k.endswith("bn.weight"))).astype(np.float32)
    sd["fc.weight"], sd["fc.bias"] = np.zeros((1000, 2048), np.float32), np.zeros((1000,), np.float32)
    return sd


def _insightface_app(root):
    from insightface.app import FaceAnalysis

    app = FaceAnalysis(name="buffalo_l", root=str(root), providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_size=(320, 320))
    return app


def _their_process_image(app, rgb):
    """Their ``process_image``: (224 RGB crop, ArcFace embedding) of the largest face, or (None, None)."""
    from insightface.utils import face_align

    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    faces = app.get(bgr)
    shift = None
    if not faces:
        h, w = bgr.shape[:2]
        faces = app.get(cv2.copyMakeBorder(bgr, int(h * 0.25), int(h * 0.25), int(w * 0.25), int(w * 0.25),
                                           cv2.BORDER_CONSTANT, value=(128, 128, 128)))
        if not faces:
            return None, None
        shift = np.array([int(w * 0.25), int(h * 0.25)])
    f = sorted(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))[-1]
    kps = f["kps"]
    if shift is not None:
        kps -= shift  # in place on float32, as their face_kps -= np.array(sub_coord)
    crop = cv2.cvtColor(face_align.norm_crop(bgr, landmark=kps, image_size=224), cv2.COLOR_BGR2RGB)
    return crop, f["embedding"]


def _their_facesim(app, frame_files, ref_file, num_frames=16, cur_model=None):
    """Their arithmetic: (frame indices, per-frame clamped arc cos or None, arc score[, per-frame cur
    cos or None, ConsisID cur score, OpenS2V-Eval cur score (zeros dropped)] with ``cur_model``);
    OpenS2V-Eval's get_facesim.py is the same with 32 frames (its arc zero check tests the list: zeros stay)."""
    process_image = lambda rgb: _their_process_image(app, rgb)

    @torch.no_grad()
    def inference(img):
        img = torch.from_numpy(np.transpose(cv2.resize(img, (112, 112)), (2, 0, 1))).unsqueeze(0).float()
        img.div_(255).sub_(0.5).div_(0.5)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a one-image forward: 5 ms on one thread, ~0.8 s with 2 on a busy 2-core host
        try:
            e = cur_model(img).numpy()[0]
        finally:
            torch.set_num_threads(threads)
        return e / np.linalg.norm(e)

    cos = lambda a, b: max(0.0, torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=-1).item())
    ref_crop, ref = process_image(cv2.cvtColor(cv2.imread(str(ref_file)), cv2.COLOR_BGR2RGB))
    ref_cur = None if cur_model is None else inference(ref_crop)
    idx = np.linspace(0, len(frame_files) - 1, num_frames, dtype=int)
    per, per_cur = [], []
    for i in idx:
        crop, e = process_image(cv2.cvtColor(cv2.imread(str(frame_files[i])), cv2.COLOR_BGR2RGB))
        per.append(None if e is None else cos(ref, e))
        if cur_model is not None:
            per_cur.append(None if crop is None else cos(ref_cur, inference(crop)))
    scores = [s for s in per if s is not None]
    out = (idx.tolist(), per, (float(np.mean(scores)) if scores else 0.0))
    if cur_model is None:
        return out
    cur = [s for s in per_cur if s is not None]
    nonzero = [s for s in cur if s != 0.0]
    return out + (per_cur, float(np.mean(cur)) if cur else 0.0, float(np.mean(nonzero)) if nonzero else 0.0)


def _consisid_clipscore(model, processor, frame_files, prompt):
    """Their arithmetic: (frame indices, mean logits_per_image) with BGR frames as OpenCV reads them."""
    n = len(frame_files)
    idx = [int(i * n / 16) for i in range(16)]
    frames = [cv2.imread(str(frame_files[i])) for i in idx]
    inputs = processor(text=prompt, images=frames, return_tensors="pt", padding=True, truncation=True)
    with torch.no_grad():
        return idx, model(**inputs).logits_per_image.mean().item()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One CLI run over three videos, and everything the references need."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("consisid")
    pack = make_pack(root / "models" / "buffalo_l")
    files = {}
    for name, kinds in VIDEOS.items():
        (root / "videos" / name).mkdir(parents=True)
        files[name] = [root / "videos" / name / f"{i:03d}.png" for i in range(len(kinds))]
        for i, (k, f) in enumerate(zip(kinds, files[name])):
            iio.imwrite(f, _frame(k, seed=i + 1))
        (root / "refs").mkdir(exist_ok=True)
        iio.imwrite(root / "refs" / f"{name}.png", face_image(at=FACE, seed=0))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=2),
                     vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=64, patch_size=32), projection_dim=24)
    model = CLIPModel(cfg).eval()
    randomize_torch_params(model, 0)
    model.save_pretrained(root / "hf")
    tok = _tokenizer()
    tok.save_pretrained(root / "hf")
    ckpt = convert(root / "hf", root / "ckpt", ["clip"])
    cur_model = torch_backbone(TINY)
    randomize(cur_model)
    cur_model.eval()
    torch.save(cur_model.state_dict(), root / "cur.bin")
    save_curricularface(root / "cur.bin", root / "cur.safetensors", TINY)
    save_inception(_inception_state_dict(), root / "inception.safetensors")  # the converter's --out writer
    (root / "prompts.jsonl").write_text("".join(json.dumps({"id": n, "prompt": PROMPT}) + "\n" for n in VIDEOS))
    rc = evaluate.main(["--protocol", "consisid", "--videos", str(root / "videos"), "--refs", str(root / "refs"),
                        "--face-models", str(pack), "--clip", str(ckpt), "--prompts", str(root / "prompts.jsonl"),
                        "--curricularface", str(root / "cur.safetensors"),
                        "--inception", str(root / "inception.safetensors"),
                        "--out", str(root / "r.json"), "--quiet", "--compare", "published"])
    rep = json.loads((root / "r.json").read_text())
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 64},
                                                                 crop_size={"height": 64, "width": 64}), tokenizer=tok)
    return dict(rc=rc, rep=rep, files=files, root=root, app=_insightface_app(root), model=model, processor=processor,
                cur_model=cur_model)


def _assert_cur(v, per_cur, score, faces):
    """Our facesim_cur row equals their per-frame clamped cosines (same frames skipped) and score."""
    assert [s is None for s in v["per_frame"]["facesim_cur"]] == [s is None for s in per_cur]
    got, want = ([s for s in p if s is not None] for p in (v["per_frame"]["facesim_cur"], per_cur))
    err = np.max(np.abs(np.subtract(got, want)), initial=0.0)
    assert err <= 1e-5 and abs(v["facesim_cur"] - score) <= 1e-5 and v["facesim_cur_faces"] == faces
    return err


def test_facesim_arc_and_cur_equal_consisids_arithmetic_on_insightface_and_torch(run):
    by_name = {v["name"]: v for v in run["rep"]["videos"]}
    assert run["rc"] == 0
    errs = []
    for name in VIDEOS:
        idx, per, score, per_cur, cur, _ = _their_facesim(run["app"], run["files"][name],
                                                          run["root"] / "refs" / f"{name}.png",
                                                          cur_model=run["cur_model"])
        v = by_name[name]
        errs.append(_assert_cur(v, per_cur, cur, sum(s is not None for s in per_cur)))
        assert v["facesim_arc_frames"] == idx
        assert [s is None for s in v["per_frame"]["facesim_arc"]] == [s is None for s in per]
        assert v["facesim_arc_faces"] == sum(s is not None for s in per)
        got = [s for s in v["per_frame"]["facesim_arc"] if s is not None]
        assert np.max(np.abs(np.subtract(got, [s for s in per if s is not None])), initial=0.0) <= 1e-5
        assert abs(v["facesim_arc"] - score) <= 1e-5
    mix = by_name["mix"]
    assert mix["facesim_arc_frames"] == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 19]
    assert sum(mix["per_frame"]["facesim_arc_padded"]) == 3  # frames 5, 6, 16 only found after the pad
    assert mix["facesim_arc_faces"] == 14  # 16 read, frames 2 and 11 have no face
    assert mix["facesim_cur_faces"] == 14 and by_name["noface"]["facesim_cur"] == 0.0
    assert len({round(s, 6) for s in mix["per_frame"]["facesim_cur"] if s is not None}) > 3  # not a constant net
    print("facesim_cur per-frame max abs err vs torch", max(errs))


def test_opens2v_facesim_arc_and_cur_read_32_linspace_frames_as_its_script(run):
    root = run["root"]
    rc = evaluate.main(["--protocol", "opens2v", "--videos", str(root / "videos"), "--refs", str(root / "refs"),
                        "--face-models", str(root / "models" / "buffalo_l"), "--out", str(root / "o.json"), "--quiet",
                        "--curricularface", str(root / "cur.safetensors")])
    rep = json.loads((root / "o.json").read_text())
    by_name = {v["name"]: v for v in rep["videos"]}
    assert rc == 0 and "facesim_cur" not in rep["not_computed"]
    zeros, errs = 0, []
    for name in VIDEOS:
        idx, per, score, per_cur, _, cur = _their_facesim(run["app"], run["files"][name],
                                                          root / "refs" / f"{name}.png", 32, run["cur_model"])
        v = by_name[name]
        assert v["facesim_arc_frames"] == idx and len(idx) == 32
        assert [s is None for s in v["per_frame"]["facesim_arc"]] == [s is None for s in per]
        assert abs(v["facesim_arc"] - score) <= 1e-5
        errs.append(_assert_cur(v, per_cur, cur, sum(s is not None and s != 0.0 for s in per_cur)))
        zeros += sum(s == 0.0 for s in per_cur)
    print("opens2v: facesim_cur per-frame max abs err", max(errs), "frames clamped to 0 and dropped", zeros)


def test_facesim_cur_clamps_negative_cosines_and_opens2v_drops_the_zeros(monkeypatch):
    from mm_jax.metrics import consisid, facesim_cur

    embs = {0: [1.0, 0.0], 1: [-0.6, 0.8], 3: [0.6, 0.8]}  # frame 2 has no face
    monkeypatch.setattr(consisid, "aligned_face", lambda frame, hit: frame)
    monkeypatch.setattr(facesim_cur, "embed_faces", lambda m, crops: np.array([embs[int(c[0, 0, 0])] for c in crops]))
    frames = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    hit = consisid.FaceHit(np.zeros(2), np.zeros((5, 2)), False)
    hits = (np.array([0, 1, 2, 3]), [hit, hit, None, hit])
    ours = facesim_cur.facesim_cur(frames, hits, np.array([1.0, 0.0]), model=None)
    assert ours["per_frame"]["facesim_cur"] == pytest.approx([1.0, 0.0, None, 0.6])  # -0.6 clamped to 0
    assert ours["facesim_cur"] == pytest.approx(1.6 / 3, abs=1e-12) and ours["facesim_cur_faces"] == 3
    theirs = facesim_cur.facesim_cur(frames, hits, np.array([1.0, 0.0]), model=None, drop_zeros=True)
    assert theirs["facesim_cur"] == pytest.approx(0.8, abs=1e-12) and theirs["facesim_cur_faces"] == 2
    none = facesim_cur.facesim_cur(frames, (np.array([2]), [None]), np.array([1.0, 0.0]), model=None)
    assert none["facesim_cur"] == 0.0 and none["facesim_cur_faces"] == 0


def test_a_video_without_a_face_scores_zero_and_short_videos_repeat_frames(run):
    by_name = {v["name"]: v for v in run["rep"]["videos"]}
    assert by_name["noface"]["facesim_arc"] == 0.0 and by_name["noface"]["facesim_arc_faces"] == 0
    assert by_name["noface"]["per_frame"]["facesim_arc"] == [None] * 16
    short = by_name["short"]
    assert short["facesim_arc_frames"] == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4]  # linspace(0, 4, 16)
    assert short["facesim_arc_faces"] == 15  # every read but the one of frame 4 (dark); repeats count
    per = short["per_frame"]["facesim_arc"]
    assert per[:4] == [per[0]] * 4 and per[15] is None
    assert short["facesim_arc"] == pytest.approx(np.mean([s for s in per if s is not None]), abs=1e-12)
    mean = run["rep"]["mean"]
    assert mean["facesim_arc"] == pytest.approx(np.mean([v["facesim_arc"] for v in by_name.values()]), abs=1e-12)


def test_clipscore_equals_consisids_script_with_transformers_clip(run):
    by_name = {v["name"]: v for v in run["rep"]["videos"]}
    for name in VIDEOS:
        idx, score = _consisid_clipscore(run["model"], run["processor"], run["files"][name], PROMPT)
        assert by_name[name]["clipscore_frames"] == idx
        assert abs(by_name[name]["clipscore"] - score) <= 1e-5 * max(1.0, abs(score))
    assert by_name["mix"]["clipscore_frames"] == [0, 1, 2, 3, 5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18]
    assert by_name["short"]["clipscore_frames"] == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]  # int(i * 5 / 16)


def test_b32_image_features_of_bgr_frames_equal_transformers(run):
    from mm_jax.metrics.text_alignment import TextAlignment

    scorer = TextAlignment(run["root"] / "ckpt", batch_size=4)
    frames = [cv2.imread(str(f)) for f in run["files"]["mix"][:4]]  # BGR, as their script feeds them
    px = run["processor"](images=frames, return_tensors="pt").pixel_values
    with torch.no_grad():
        want = run["model"].get_image_features(pixel_values=px)
    want = getattr(want, "pooler_output", want).numpy()
    want = want / np.linalg.norm(want, axis=-1, keepdims=True)
    assert scorer.model.cfg.vision.patch_size == 32
    assert max_rel_err(scorer.image_embeddings(np.stack(frames)), want) <= 1e-5


def test_the_report_names_the_protocol_and_what_is_not_computed(run):
    rep = run["rep"]
    assert rep["protocol"]["name"] == "consisid" and "ConsisID" in rep["protocol"]["compares_with"]
    assert rep["not_computed"] == {} and rep["absent"] == {}
    assert all(v[m] is not None for v in rep["videos"] for m in ("facesim_arc", "facesim_cur", "clipscore", "face_fid"))
    assert rep["mean"]["facesim_cur"] == pytest.approx(np.mean([v["facesim_cur"] for v in rep["videos"]]), abs=1e-12)
    assert rep["mean"]["face_fid"] == pytest.approx(np.mean([v["face_fid"] for v in rep["videos"]]), rel=1e-12)
    assert rep["mean"]["videos_counted"] == {m: 3 for m in ("facesim_arc", "facesim_cur", "clipscore", "face_fid")}
    assert "squared L2 distance" in rep["protocol"]["notes"]
    yours = rep["compare"]["rows"][-1]
    assert yours["model"] == "yours" and yours["facesim_arc"] == rep["mean"]["facesim_arc"]
    assert [r["model"] for r in rep["compare"]["rows"][:-1]] == ["ConsisID", "ID-Animator"]


def test_facesim_arc_clamps_negative_cosines_and_skips_faceless_frames(monkeypatch):
    from mm_jax.metrics import consisid

    embs = {0: np.array([1.0, 0.0]), 1: np.array([-0.6, 0.8]), 2: None, 3: np.array([0.6, 0.8])}
    hit = lambda e: None if e is None else consisid.FaceHit(e, np.zeros((5, 2)), False)
    monkeypatch.setattr(consisid, "face_embedding", lambda an, frame: hit(embs[int(frame[0, 0, 0])]))
    frames = np.arange(4, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    out = consisid.facesim_arc(frames, np.array([2.0, 0.0]), analyzer=None)
    # linspace(0, 3, 16, dtype=int) reads frames 0, 1, 2 five times each and frame 3 once
    assert out["facesim_arc_frames"] == [0] * 5 + [1] * 5 + [2] * 5 + [3]
    per = out["per_frame"]["facesim_arc"]
    assert per[:10] == pytest.approx([1.0] * 5 + [0.0] * 5) and per[10:15] == [None] * 5  # -0.6 clamped to 0
    assert per[15] == pytest.approx(0.6)
    assert out["facesim_arc"] == pytest.approx(5.6 / 11, abs=1e-12) and out["facesim_arc_faces"] == 11


def test_a_face_found_after_the_pad_has_its_landmarks_in_the_original_pixels(run):
    from mm_jax.face import FaceAnalyzer
    from mm_jax.metrics import consisid

    an = FaceAnalyzer(run["root"] / "models" / "buffalo_l", det_size=320)
    hit = consisid.face_embedding(an, _frame("pad", seed=1))
    assert hit.padded and np.abs(hit.kps.mean(axis=0) - [PAD_ONLY[1], PAD_ONLY[0]]).max() < 6  # not +(80, 60)
    bgr = _frame("pad", seed=1)[..., ::-1].copy()  # their process_image: kps of the padded find - (left, top)
    faces = run["app"].get(cv2.copyMakeBorder(bgr, 60, 60, 80, 80, cv2.BORDER_CONSTANT, value=(128, 128, 128)))
    np.testing.assert_allclose(hit.kps, faces[-1]["kps"] - np.array([80, 60]), atol=1e-4)
    direct = consisid.face_embedding(an, _frame("face", seed=1))
    assert not direct.padded and np.abs(direct.kps.mean(axis=0) - [FACE[1], FACE[0]]).max() < 6


@pytest.mark.slow  # an Inception v3 compile of its own: ~75 s on a busy 2-core host
def test_face_fid_equals_face_fid_py_on_their_crops_through_the_converters_model(run):
    """face_fid from the CLI (our loader of the converter's file, crops shared with FaceSim-Cur) equals
    ``face_fid.frame_fids`` (checked against torchvision and ConsisID's script in tests/torch_refs) on the crops of
    their ``process_image`` through the converter's own loader: 'short' reads frames 0-4 as linspace(0, 4, 16),
    frame 4 has no face; 'noface' scores 0."""
    from mm_jax.metrics import face_fid as ff

    by_name = {v["name"]: v for v in run["rep"]["videos"]}
    model = load_inception(run["root"] / "inception.safetensors", INCEPTION)
    jitted = nnx.jit(lambda m, x: m(x))
    app = run["app"]
    ref_crop, _ = _their_process_image(app, iio.imread(run["root"] / "refs" / "short.png")[..., :3])
    crops = [_their_process_image(app, iio.imread(f)[..., :3])[0] for f in run["files"]["short"]]
    with_face = [i for i, c in enumerate(crops) if c is not None]
    assert with_face == [0, 1, 2, 3]
    fids = ff.frame_fids(lambda x: jitted(model, x), ref_crop, [crops[i] for i in with_face])
    reads = np.linspace(0, 4, 16, dtype=int)
    want = [None if i not in with_face else float(fids[with_face.index(i)]) for i in reads]
    short = by_name["short"]
    got = short["per_frame"]["face_fid"]
    assert [g is None for g in got] == [w is None for w in want] and short["face_fid_faces"] == 15
    err = max(abs(g - w) / abs(w) for g, w in zip(got, want) if w is not None)
    assert err <= 1e-5 and len({float(f) for f in fids}) == 4  # four different crops, four different values
    assert short["face_fid"] == pytest.approx(np.mean([w for w in want if w is not None]), rel=1e-5)
    assert by_name["noface"]["face_fid"] == 0.0 and by_name["noface"]["face_fid_faces"] == 0
    print("face_fid per-frame max rel err vs face_fid.py on their crops", err)
