"""Precomputed latents (build --precompute): the loader's face mask of the encoded frames, records of
other settings refused by field, and the real precompute against the VAE of the loader's pixels."""
import shutil

import numpy as np
import pytest

from mm_jax.data.build import build_dataset
from mm_jax.data.loader import make_loader
from mm_jax.data.records import decode_record
from mm_jax.demo.synthetic import make_demo_source
from tests.data_fixtures import build_once, data_cfg


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_once(tmp_path_factory)


@pytest.fixture(scope="module")
def long_clips(built):
    """Two 17-frame clips: data.frames=9 at data.frame_stride=2 spans them, so every loader starts at frame 0."""
    root, _, _ = built
    src = make_demo_source(root / "long_src", num_clips=2, frames=17, height=64, width=64, seed=3)
    build_dataset(src, root / "long", root / "standin_faces", progress=False)
    return root / "long"


PRE = dict(frames=9, frame_stride=2, height=48, width=64)  # what the tests' config reads


def _fake_precomputed(src, dst, **over):
    """``src``'s video records with stand-in latents and a ``precomputed`` dict as --precompute writes it
    (PRE, frame indices 0, 2, ..., 16), ``over`` replacing its values (None: the key is absent)."""
    from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

    from mm_jax.data.records import encode_record

    dst.mkdir()
    settings = dict(PRE, frame_indices=list(range(0, 17, 2)), max_text_length=32, checkpoint="ckpt")
    settings.update(over)
    settings = {k: v for k, v in settings.items() if v is not None}
    rng = np.random.default_rng(0)
    for path in sorted(src.glob("video-*.array_record")):
        r_in = ArrayRecordReader(str(path))
        w = ArrayRecordWriter(str(dst / path.name), "group_size:1")
        for x in r_in.read_all():
            r = decode_record(x)
            r.update(latents=rng.normal(size=(3, 6, 8, 4)).astype(np.float32),
                     latents_std=np.ones((3, 6, 8, 4), np.float32),
                     text_embedding=rng.normal(size=(32, 32)).astype(np.float32), precomputed=settings)
            w.write(encode_record(r))
        w.close()
        r_in.close()
    np.save(dst / "null_text.npy", np.zeros((32, 32), np.float32))
    return dst


def test_precomputed_latents_load_with_the_face_mask_of_the_frames_they_encode(built, long_clips, tmp_path):
    root, _, tok = built
    data = _fake_precomputed(long_clips, tmp_path / "pre")
    kw = dict(tokenizer=tok, global_batch_size=2, seed=0, process_index=0, process_count=1)
    pre = next(make_loader(data_cfg(data, precomputed=True, shuffle=False, **PRE), **kw))
    pixels = next(make_loader(data_cfg(long_clips, shuffle=False, **PRE), **kw))  # 17 frames, span 17: start 0
    assert pre["latents"].shape == (2, 3, 6, 8, 4) and "pixels" not in pre
    assert pre["face_mask"].shape == (2, 9, 48, 64) and np.array_equal(pre["face_mask"], pixels["face_mask"])
    stride1 = next(make_loader(data_cfg(long_clips, shuffle=False, frames=9, frame_stride=1, height=48, width=64),
                               **kw))
    assert not np.array_equal(stride1["face_mask"], pixels["face_mask"])  # the face moves: the stride matters


@pytest.mark.parametrize("field,recorded", [("frames", 17), ("frame_stride", 1), ("frame_stride", None),
                                            ("height", 64), ("width", 48)])
def test_precomputed_latents_of_other_settings_are_refused_naming_the_field(built, long_clips, tmp_path, field,
                                                                            recorded):
    root, _, tok = built
    data = _fake_precomputed(long_clips, tmp_path / "pre", **{field: recorded})
    ld = make_loader(data_cfg(data, precomputed=True, **PRE), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=rf"video-00000.array_record, record \d: latents precomputed with "
                                         rf"{field}={recorded}, but data.{field}={PRE[field]}; set "
                                         rf"data.{field}={recorded} or rebuild with python -m mm_jax.data.build "
                                         rf"--precompute --frames 9 --frame-stride 2 --height 48 --width 64"):
        next(ld)


def test_precomputed_latents_of_other_frames_are_refused(built, long_clips, tmp_path):
    root, _, tok = built
    data = _fake_precomputed(long_clips, tmp_path / "pre", frame_indices=list(range(9)))  # an older precompute
    ld = make_loader(data_cfg(data, precomputed=True, **PRE), tokenizer=tok, global_batch_size=1, seed=0)
    with pytest.raises(ValueError, match=r"latents precomputed from frames \[0, 1, 2, 3, 4, 5, 6, 7, 8\], but the "
                                         r"loader masks frames \[0, 2, 4, 6, 8, 10, 12, 14, 16\]"):
        next(ld)


@pytest.mark.slow  # builds the tiny checkpoint (about 40 s on 2 cores)
def test_precompute_encodes_the_frames_and_size_the_loader_reads(built, long_clips, tmp_path):
    """The real ``precompute`` at frame_stride 2 and 48x64: its latents are the VAE posterior of the
    loader's own pixels for those settings, and the record says which frames and size it encoded."""
    import jax
    import jax.numpy as jnp

    from mm_jax import checkpoint
    from mm_jax.data.precompute import precompute
    from mm_jax.demo.tiny_checkpoint import build_tiny_checkpoint

    from array_record.python.array_record_module import ArrayRecordReader

    root, _, tok = built
    ckpt = build_tiny_checkpoint(tmp_path / "ckpt")
    data = tmp_path / "pre"
    shutil.copytree(long_clips, data)
    precompute(data, ckpt, max_text_length=32, progress=False, **PRE)
    reader = ArrayRecordReader(str(data / "video-00000.array_record"))
    records = [decode_record(x) for x in reader.read_all()]
    reader.close()
    assert all(r["precomputed"] == dict(PRE, frame_indices=[0, 2, 4, 6, 8, 10, 12, 14, 16], max_text_length=32,
                                        checkpoint=str(ckpt)) for r in records)
    kw = dict(tokenizer=tok, global_batch_size=2, seed=0, process_index=0, process_count=1)
    pixels = next(make_loader(data_cfg(long_clips, shuffle=False, **PRE), **kw))["pixels"]
    pre = next(make_loader(data_cfg(data, shuffle=False, precomputed=True, **PRE), **kw))
    vae = checkpoint.load_component(ckpt, "vae")
    expected = np.asarray(jax.jit(lambda x: vae.encode(x).mean)(jnp.asarray(pixels)) * vae.cfg.scaling_factor)
    assert pre["latents"].shape == expected.shape == (2, 3, 6, 8, vae.cfg.latent_channels)
    np.testing.assert_allclose(pre["latents"], expected, rtol=1e-5, atol=1e-5)
