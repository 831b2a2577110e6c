"""The reference face crop follows the image encoder's ``image_size`` (a 336-px tower such as
ConsisID's EVA-CLIP), in the builder and in the loader, instead of a hard-coded 224."""
import warnings

import numpy as np
import pytest

from mm_jax import config
from mm_jax.data.build import build_dataset
from mm_jax.data.loader import make_loader
from mm_jax.data.records import DEFAULT_REF_SIZE, decode_record
from mm_jax.data.transform import decode_jpeg
from mm_jax.demo.assets import standin_faces
from mm_jax.demo.synthetic import make_demo_source
from mm_jax.demo.tiny_checkpoint import build_tokenizer


@pytest.fixture(scope="module")
def two_sizes(tmp_path_factory):
    root = tmp_path_factory.mktemp("ref_size")
    src = make_demo_source(root / "src", num_clips=2, num_images=0, frames=9, height=64, width=64, seed=3)
    pack = standin_faces(root)
    for size in (DEFAULT_REF_SIZE, 336):
        build_dataset(src, root / f"out{size}", pack, workers=0, ref_size=size, progress=False)
    return root, build_tokenizer(root / "tok")


def _records(folder):
    from array_record.python.array_record_module import ArrayRecordReader

    r = ArrayRecordReader(str(next(folder.glob("video-*.array_record"))))
    out = [decode_record(x) for x in r.read_all()]
    r.close()
    return out


def _cfg(path):
    cfg = config.load("configs/video.py:tiny", [f"data.path={path}"])
    return cfg.data


def test_the_default_reference_size_is_the_published_clip_towers():
    from mm_jax.models.clip_vision import CLIPVisionConfig

    assert DEFAULT_REF_SIZE == CLIPVisionConfig().image_size == 224


def test_a_336_encoder_gets_336_crops_of_the_same_face_region(two_sizes):
    import cv2

    root, _ = two_sizes
    small, large = _records(root / f"out{DEFAULT_REF_SIZE}"), _records(root / "out336")
    assert all(decode_jpeg(r["ref_crop"]).shape == (336, 336, 3) for r in large)
    assert all(decode_jpeg(r["ref_crop"]).shape == (224, 224, 3) for r in small)
    # the aligned crop scales with its size: the 336 crop shrunk to 224 is the 224 crop (JPEG + resampling apart)
    for a, b in zip(small, large):
        down = cv2.resize(decode_jpeg(b["ref_crop"]), (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32)
        assert np.abs(down - decode_jpeg(a["ref_crop"]).astype(np.float32)).mean() < 4.0


def test_the_loader_gives_ref_pixels_of_the_encoders_size_and_warns_on_upsampling(two_sizes):
    root, tok = two_sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = next(make_loader(_cfg(root / "out336"), tokenizer=tok, global_batch_size=2, seed=0, ref_size=336))
    assert b["ref_pixels"].shape == (2, 336, 336, 3)
    with pytest.warns(UserWarning, match="reference crop of 224 px upsampled to the image encoder's 336; rebuild "
                                         "with --ref-size 336"):
        b = next(make_loader(_cfg(root / f"out{DEFAULT_REF_SIZE}"), tokenizer=tok, global_batch_size=2, seed=0,
                             ref_size=336))
    assert b["ref_pixels"].shape == (2, 336, 336, 3)
