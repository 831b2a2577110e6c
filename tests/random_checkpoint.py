"""Random-weight source checkpoints in the published layout, written tensor by tensor.

``build_5b`` writes a diffusers ``CogVideoXPipeline`` folder with the real CogVideoX-5B keys,
shapes and storage dtypes (``tests/data/manifests``): a bf16 transformer in two shards of at most
10 GB and a bf16 T5-XXL encoder in two of at most 5 GB (diffusers' and transformers' default shard
sizes, which give the published 9.93 + 1.22 GB and 4.99 + 4.53 GB), each with its
``*.safetensors.index.json``; T5's tied embedding stored once (``shared.weight``); the fp32 VAE in
one file; the scheduler config; a small SentencePiece tokenizer. ``layers`` keeps the first N
blocks of the transformer and of T5 (their configs say so) for small folders of the real widths.

Files are written tensor by tensor (``safetensors.numpy.save_file`` takes every tensor at once),
so the builder holds one tensor: building the 21 GB folder needs a few hundred MB of memory.
Values are random bfloat16 bit patterns of magnitude 2^-8..2^-5 with random signs (about the
entropy of trained bf16 weights, so compressed sizes are realistic), stored as they are in bf16
and exactly converted for fp32 tensors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes
import numpy as np

MANIFESTS = Path(__file__).resolve().parent / "data" / "manifests"

SAFETENSORS_DTYPES = {"bfloat16": "BF16", "float32": "F32", "float16": "F16"}
NUMPY_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}

# component -> (manifest, config, weights file stem, max shard bytes, block-key pattern, tied copy dropped)
LAYOUT_5B = {
    "transformer": ("cogvideox5b_transformer.json", "cogvideox5b_transformer_config.json",
                    "diffusion_pytorch_model", 10 * 10**9, r"^transformer_blocks\.(\d+)\.", None),
    "text_encoder": ("t5_v1_1_xxl_encoder.json", "t5_v1_1_xxl_encoder_config.json",
                     "model", 5 * 10**9, r"^encoder\.block\.(\d+)\.", "encoder.embed_tokens.weight"),
    "vae": ("cogvideox_vae.json", "cogvideox_vae_config.json", "diffusion_pytorch_model", None, None, None),
}


def random_values(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Random values of ``dtype`` (bf16 bit patterns: sign, exponent 119..122, 7 random mantissa bits)."""
    r = rng.integers(0, 2**16, size=tuple(shape), dtype=np.uint16)
    bits = (r & 0x807F) | ((119 + ((r >> 7) & 3)) << 7).astype(np.uint16)
    return bits.view(ml_dtypes.bfloat16).astype(NUMPY_DTYPES[dtype], copy=False)


def write_safetensors(path: Path, tensors: dict, rng: np.random.Generator, extra_metadata=None) -> int:
    """Write ``{name: (shape, dtype)}`` to one safetensors file, one random tensor at a time; -> bytes of data."""
    header, offset = {}, 0
    for name, (shape, dtype) in tensors.items():
        n = int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt", **(extra_metadata or {})}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little"))
        fh.write(raw)
        for shape, dtype in tensors.values():
            fh.write(random_values(rng, shape, dtype).tobytes())
    return offset


def write_component(folder: Path, tensors: dict, config: dict, stem: str, max_shard_bytes: int | None = None,
                    seed: int = 0) -> list[Path]:
    """A component folder: ``config.json`` and ``tensors`` in shards of at most ``max_shard_bytes``
    (filled in order, as Hugging Face's splitter does) with ``<stem>.safetensors.index.json``, or
    one ``<stem>.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    shards, size = [{}], 0
    for name, (shape, dtype) in tensors.items():
        n = int(np.prod(shape)) * np.dtype(NUMPY_DTYPES[dtype]).itemsize
        if max_shard_bytes and shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (shape, dtype)
        size += n
    rng = np.random.default_rng(seed)
    if len(shards) == 1:
        path = folder / f"{stem}.safetensors"
        write_safetensors(path, shards[0], rng)
        return [path]
    paths, weight_map, total = [], {}, 0
    for i, shard in enumerate(shards):
        path = folder / f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path, shard, rng)
        weight_map.update({name: path.name for name in shard})
        paths.append(path)
    (folder / f"{stem}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return paths


def manifest_component(name: str, layers: int | None = None) -> tuple[dict, dict]:
    """(``{key: (shape, dtype)}`` as stored, config) of a published 5B component, cut to ``layers`` blocks."""
    manifest, config, _, _, block, tied = LAYOUT_5B[name]
    listed = json.loads((MANIFESTS / manifest).read_text())
    cfg = json.loads((MANIFESTS / config).read_text())
    tensors = {}
    for key, (shape, dtype) in listed.items():
        m = re.match(block, key) if block else None
        if key == tied or (layers is not None and m and int(m.group(1)) >= layers):
            continue
        tensors[key] = (tuple(shape), dtype)
    if layers is not None and block:
        cfg["num_layers"] = layers
    return tensors, cfg


def build_5b(dst: Path, layers: int | None = None, seed: int = 0) -> Path:
    """The random-weight CogVideoX-5B pipeline folder (see the module docstring); -> ``dst``."""
    import tempfile

    from tests.tiny_pipeline import train_tokenizer

    dst = Path(dst)
    for i, (name, (_, _, stem, max_bytes, _, _)) in enumerate(LAYOUT_5B.items()):
        tensors, cfg = manifest_component(name, layers)
        write_component(dst / name, tensors, cfg, stem, max_bytes, seed + i)
    (dst / "scheduler").mkdir(parents=True, exist_ok=True)
    scheduler = (MANIFESTS / "cogvideox5b_scheduler_config.json").read_text()
    (dst / "scheduler" / "scheduler_config.json").write_text(scheduler)
    with tempfile.TemporaryDirectory() as spm:
        train_tokenizer(Path(spm)).save_pretrained(str(dst / "tokenizer"))
    (dst / "model_index.json").write_text((MANIFESTS / "cogvideox5b_model_index.json").read_text())
    return dst
