"""Precompute in both builders: the shard builder (``build --precompute``) and the TFDS builders on
Beam (``prepare --precompute``) run the one ``precompute.Encoders`` and store the same latents and
text embeddings, which the loader reads from either (null text included)."""
import numpy as np
import pytest

from mm_jax import config
from mm_jax.data.build import build_dataset
from mm_jax.data.loader import make_loader
from mm_jax.data.precompute import PrecomputeSettings, precompute
from mm_jax.data.prepare import prepare
from mm_jax.data.record_sources import find_tfds_dir
from mm_jax.data.records import decode_record
from mm_jax.demo.assets import standin_faces
from mm_jax.demo.synthetic import make_demo_source
from mm_jax.demo.tiny_checkpoint import build_tiny_checkpoint, build_tokenizer

PRE = dict(frames=9, frame_stride=2, height=48, width=64)


def _cfg(path, **over):
    cfg = config.load("configs/video.py:tiny", [f"data.path={path}"])
    for k, v in dict(PRE, precomputed=True, shuffle=False, max_text_length=32, **over).items():
        cfg.data[k] = v
    return cfg.data


@pytest.mark.slow  # builds the tiny checkpoint and runs its VAE and T5 in both builders (about 90 s on 2 cores)
def test_both_builders_precompute_the_same_latents_and_the_loader_reads_either(tmp_path):
    import tensorflow_datasets as tfds
    from array_record.python.array_record_module import ArrayRecordReader

    from mm_jax.data.tfds.features import from_features

    src = make_demo_source(tmp_path / "src", num_clips=2, num_images=1, frames=17, height=64, width=64, seed=3)
    pack, ckpt = standin_faces(tmp_path), build_tiny_checkpoint(tmp_path / "ckpt")
    build_dataset(src, tmp_path / "shards", pack, progress=False)
    precompute(tmp_path / "shards", ckpt, max_text_length=32, progress=False, **PRE)
    settings = PrecomputeSettings(str(ckpt), max_text_length=32, **PRE)
    s = prepare("mm_faces_manifest", src, tmp_path / "tfds", pack, workers=0, progress=False, precompute=settings)
    assert s["records"] == {"video": 2} and s["counters"]["skipped/other_kind"] == 1  # the image: not this stage's
    reader = ArrayRecordReader(str(tmp_path / "shards" / "video-00000.array_record"))
    shards = {r["source"]: r for r in (decode_record(x) for x in reader.read_all())}
    reader.close()
    ds = tfds.builder_from_directory(str(find_tfds_dir(tmp_path / "tfds"))).as_data_source(split="video")
    beam = {r["source"]: r for r in (from_features(ds[i]) for i in range(len(ds)))}
    assert set(beam) == set(shards) and len(beam) == 2
    for source, r in shards.items():
        assert beam[source]["precomputed"] == r["precomputed"] == settings.record_settings()
        for field in ("latents", "latents_std", "text_embedding"):
            np.testing.assert_allclose(beam[source][field], r[field], rtol=1e-6, atol=1e-6, err_msg=field)
    null = [np.load(p / "null_text.npy") for p in (tmp_path / "shards", find_tfds_dir(tmp_path / "tfds"))]
    np.testing.assert_allclose(null[0], null[1], rtol=1e-6, atol=1e-6)
    tok = build_tokenizer(tmp_path / "tok")
    kw = dict(tokenizer=tok, global_batch_size=2, seed=0, process_index=0, process_count=1)
    a, b = next(make_loader(_cfg(tmp_path / "tfds"), **kw)), next(make_loader(_cfg(tmp_path / "shards"), **kw))
    channels = next(iter(shards.values()))["latents"].shape[-1]
    assert a["latents"].shape == b["latents"].shape == (2, 3, 6, 8, channels) and "pixels" not in a
    assert sorted(map(float, a["latents"].sum(axis=(1, 2, 3, 4)))) == pytest.approx(
        sorted(map(float, b["latents"].sum(axis=(1, 2, 3, 4)))), rel=1e-5)
