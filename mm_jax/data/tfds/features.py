"""The typed TFDS features of a training example, and the conversions both ways.

One TFDS feature per field of ``mm_jax.data.records`` (so ``tfds`` tools show the frames and the
reference face as images, the boxes and embeddings as tensors):

    kind, source, caption        Text
    frames                       Sequence(Image(jpeg)): the record's JPEG frames, stored as they are
    height, width, ref_frame     Scalar int32
    similarity                   Scalar float64 (the record's Python float, exactly)
    boxes (F, 4), kps (F, 5, 2)  Tensor float32;  face_found (F,) Tensor bool
    ref_crop                     Image(jpeg): the CLIP-aligned reference face (the encoder's image_size)
    ref_embedding, target_embedding  Tensor (512,) float32
    with precompute: latents, latents_std (f, h, w, C) and text_embedding (L, T) as Tensor float32
    (encoding "bytes": TFDS requires an encoding for several unknown dimensions), precomputed Text (JSON).

Without TensorFlow (verified with tensorflow-datasets 4.9.10): every one of these encodes in a Beam
build and decodes through ``tfds.data_source`` (JPEGs are decoded with OpenCV, as the shard path
does). The frames are a ``Sequence(Image)``, not ``Video``: TFDS's Video feature encodes through
ffmpeg from arrays or a file, while the records already hold JPEG frames (Sequence(Image) is what
``Video`` is made of, without re-encoding). Reading decodes every frame of a record (TFDS's
``SkipDecoding`` and ``DESERIALIZE_NO_DECODE`` need TensorFlow), so the image stage pays for all
frames of the clips it reads one frame of.
"""
from __future__ import annotations

import json

import numpy as np

PRECOMPUTED = ("latents", "latents_std", "text_embedding")


def features(precomputed: bool = False):
    """The ``tfds.features.FeaturesDict`` of the examples (with the precompute fields if asked)."""
    import tensorflow_datasets as tfds

    f = tfds.features
    jpeg = f.Image(shape=(None, None, 3), encoding_format="jpeg")
    spec = {"kind": f.Text(), "source": f.Text(), "caption": f.Text(),
            "frames": f.Sequence(jpeg), "height": f.Scalar(dtype=np.int32), "width": f.Scalar(dtype=np.int32),
            "boxes": f.Tensor(shape=(None, 4), dtype=np.float32), "kps": f.Tensor(shape=(None, 5, 2), dtype=np.float32),
            "face_found": f.Tensor(shape=(None,), dtype=np.bool_),
            "ref_crop": f.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "ref_embedding": f.Tensor(shape=(512,), dtype=np.float32),
            "target_embedding": f.Tensor(shape=(512,), dtype=np.float32),
            "ref_frame": f.Scalar(dtype=np.int32), "similarity": f.Scalar(dtype=np.float64)}
    if precomputed:
        spec.update({"latents": f.Tensor(shape=(None,) * 4, dtype=np.float32, encoding="bytes"),
                     "latents_std": f.Tensor(shape=(None,) * 4, dtype=np.float32, encoding="bytes"),
                     "text_embedding": f.Tensor(shape=(None, None), dtype=np.float32, encoding="bytes"),
                     "precomputed": f.Text()})
    return f.FeaturesDict(spec)


def to_features(record: dict) -> dict:
    """A record's fields (``ExampleMaker``'s example) -> the TFDS example to encode."""
    out = dict(record)
    if "precomputed" in out:
        out["precomputed"] = json.dumps(out["precomputed"], sort_keys=True)
    return out


def from_features(example: dict) -> dict:
    """A decoded TFDS example -> the record's fields as the loaders take them (text as str, the
    frames and the reference as RGB uint8 arrays, ``precomputed`` as a dict)."""
    r = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}
    if "precomputed" in r:
        r["precomputed"] = json.loads(r["precomputed"])
    return r
