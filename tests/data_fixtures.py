"""The shared data of the data tests (test_build_shards, test_data_loader, test_data_workers,
test_data_precomputed): one synthetic source built with the shard builder, the config of its
loaders, and batch comparisons."""
import json
import shutil

import numpy as np

from mm_jax import config
from mm_jax.data.build import build_dataset
from mm_jax.demo.assets import standin_faces
from mm_jax.demo.synthetic import make_demo_source
from mm_jax.demo.tiny_checkpoint import build_tokenizer


def build_once(tmp_path_factory):
    """(root, build summary, tokenizer): the synthetic source at root/src (5 clips, 3 images, an
    undecodable clip, a faceless image, a caption without a class word) built once per session
    into root/out (each test module's ``built`` fixture calls this; the build is shared on disk)."""
    root = tmp_path_factory.getbasetemp() / "data_built"
    if (root / "built.json").exists():
        return root, json.loads((root / "built.json").read_text()), build_tokenizer(root / "tok")
    shutil.rmtree(root, ignore_errors=True)
    src = make_demo_source(root / "src", num_clips=5, num_images=3, frames=9, height=64, width=64, seed=1)
    (root / "src" / "broken.mp4").write_bytes(b"not a video")
    import imageio.v3 as iio

    iio.imwrite(root / "src" / "dark.png", np.full((64, 64, 3), 10, np.uint8))
    with open(root / "src" / "captions.jsonl", "a") as f:
        f.write(json.dumps({"file": "broken.mp4", "caption": "a man runs"}) + "\n")
        f.write(json.dumps({"file": "dark.png", "caption": "a woman waves"}) + "\n")
        f.write(json.dumps({"file": "scenery.png", "caption": "a sunset over the sea"}) + "\n")
    shutil.copy(root / "src" / "image_0005.png", root / "src" / "scenery.png")
    (root / "src" / "clip_0000.txt").write_text("ignored: captions.jsonl wins")
    pack = standin_faces(root)
    summary = build_dataset(src, root / "out", pack, progress=False)
    tok = build_tokenizer(root / "tok")
    (root / "built.json").write_text(json.dumps(summary))
    return root, summary, tok


def data_cfg(path, stage="video", **over):
    cfg = config.load(f"configs/{stage}.py:tiny", [f"data.path={path}"])
    for k, v in over.items():
        cfg.data[k] = v
    return cfg.data


def same_batch(x, y):
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x)


def joined(*parts):
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
