"""Convert PyTorch (diffusers / transformers) checkpoints into an mm_jax checkpoint folder.

    python tools/convert_weights/from_torch.py --src DIR --dst DIR [--components transformer,...]
        [--dtype bfloat16|float32|source] [--overwrite]
    python tools/convert_weights/from_torch.py --check-manifest MANIFEST.json [--config CONFIG.json]

``--src`` is a diffusers pipeline folder (with ``model_index.json``) or one component folder
(``config.json`` + ``*.safetensors``, sharded with an index or not). Every source is checked
against the architecture its config describes before anything is written: missing, unexpected
and wrongly shaped tensors are listed together. Tensors are read one at a time from memory-mapped
shards and written as they are read (a stacked parameter layer by layer), so the host memory
converting needs does not grow with the model. The output folder appears only once it is
complete (written beside it, then renamed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from mm_jax import checkpoint, components
from tools.convert_weights import mapping as mp
from tools.convert_weights.safetensors_io import CheckpointError, read_folder, DTYPES

DTYPE_CHOICES = ("source", "float32", "bfloat16")


def _source_class(cfg: dict) -> str:
    return cfg.get("_class_name") or (cfg.get("architectures") or [""])[0]


def component_for_config(cfg: dict, requested: str | None = None) -> components.ComponentSpec:
    if requested:
        return components.get(requested)
    spec = components.from_source_class(_source_class(cfg))
    if spec is None:  # configs written without a class name: recognise them by their fields
        if cfg.get("model_type") == "t5" or {"d_kv", "d_ff", "num_heads"} <= cfg.keys():
            spec = components.get("text_encoder")
        elif cfg.get("model_type") in ("clip_vision_model", "clip") or {"patch_size", "image_size", "hidden_act"} <= cfg.keys():
            spec = components.get("image_encoder")
    if spec is None:
        raise CheckpointError(f"cannot tell which component config class {_source_class(cfg)!r} is; "
                              f"pass --components with one of {', '.join(components.COMPONENTS)}")
    return spec


def plan_component(spec: components.ComponentSpec, folder: Path):
    """Read config + headers, check them against the architecture; return (cfg, mapping, tensors)."""
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{folder}: no config.json for component {spec.name!r}")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    try:
        cfg = spec.config_from_dict(hf_cfg)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    mapping = mp.build_mapping(spec.name, checkpoint.param_shapes(checkpoint.abstract_model(spec.name, cfg)))
    stored = read_folder(folder)
    tensors = {k: stored[v] for k, v in mp.normalize_source_keys(spec.name, stored).items()}
    problems = mp.check_source(spec.name, mapping, {k: t.shape for k, t in tensors.items()})
    if problems:
        raise CheckpointError(f"{folder} does not match the {spec.name} architecture of its config.json "
                              f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return cfg, mapping, tensors


def convert_component(spec, cfg, mapping, tensors, out_dir: Path, dtype: str) -> int:
    """Write one component, tensor by tensor: a stacked parameter goes to the checkpoint writer as
    a ``checkpoint.Stacked`` whose layers are read from the shards as they are written, so host
    memory holds one layer (not the 42 of a stack, nor the component) at any time."""
    target = None if dtype == "source" else np.dtype(DTYPES["BF16"] if dtype == "bfloat16" else np.float32)

    def source(m):
        return tensors[mp.resolve(spec.name, m.torch, tensors)]

    def load(m):
        arr = m.to_ours(source(m).load())
        return arr if target is None else arr.astype(target, copy=False)

    def reader(ms):  # read only while its group (or its layer) is written
        if ms[0].index is None:
            return lambda: np.asarray(load(ms[0]), order="C")  # keeps 0-d (CLIP logit_scale) 0-d
        # a stack: layers first, in the dtype np.stack of the layers would give
        stacked_dtype = target or np.result_type(*{source(m).np_dtype for m in ms})
        return checkpoint.Stacked((len(ms), *ms[0].our_shape), stacked_dtype, lambda i: load(ms[i]))

    params = mp.by_parameter(mapping)
    flat = {ours: reader(ms) for ours, ms in params.items()}
    nparams = int(sum(np.prod(m.our_shape) for m in mapping.values()))
    t0 = time.time()
    print(f"{spec.name}: writing {len(flat)} parameters from {len(mapping)} tensors ({nparams:,} params)",
          file=sys.stderr)
    checkpoint.save_component(out_dir, spec.name, cfg, flat, progress=True)
    print(f"{spec.name}: done in {time.time() - t0:.1f}s", file=sys.stderr)
    return nparams


def _subclass_spec(spec: components.ComponentSpec, folder: Path) -> components.ComponentSpec:
    """The component a pipeline subfolder converts to: its config's class may name another one than
    the folder (a ConsisID pipeline's transformer/ holds a ``ConsisIDTransformer3DModel``)."""
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        return spec
    try:
        cls = _source_class(json.loads(cfg_path.read_text()))
    except json.JSONDecodeError:
        return spec  # plan_component names the bad JSON
    other = components.from_source_class(cls)
    return other if other is not None and other.name != spec.name else spec


def resolve_sources(src: Path, requested: list[str] | None):
    """-> (list of (spec, folder)), list of folders to copy verbatim."""
    if (src / "model_index.json").exists():
        index = json.loads((src / "model_index.json").read_text())
        present = [k for k in index if not k.startswith("_")]
        wanted = requested or [k for k in present if k in components.COMPONENTS or k in components.COPIED_COMPONENTS]
        plan, copies = [], []
        for name in wanted:
            folder = src / name
            if name in components.COPIED_COMPONENTS:
                if not folder.is_dir():
                    raise CheckpointError(f"{src}: pipeline folder has no {name}/ subfolder")
                copies.append(folder)
                continue
            spec = components.get(name)
            if not folder.is_dir():
                raise CheckpointError(f"{src}: pipeline folder has no {name}/ subfolder "
                                      f"(model_index.json lists: {', '.join(present)})")
            spec = _subclass_spec(spec, folder)
            plan.append((spec, folder))
        return plan, copies
    if (src / "config.json").exists():
        if requested and len(requested) != 1:
            raise CheckpointError(f"{src} is a single component folder; --components names {requested}")
        cfg = json.loads((src / "config.json").read_text())
        return [(component_for_config(cfg, requested[0] if requested else None), src)], []
    raise CheckpointError(f"{src}: neither a pipeline folder (model_index.json) nor a component folder (config.json)")


# tokenizer files kept beside a converted component that needs its own tokenizer (CLIP's BPE)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")
OWN_TOKENIZER = ("clip",)


def tokenizer_files(spec: components.ComponentSpec, folder: Path) -> list[Path]:
    """The tokenizer files to copy into ``<dst>/<component>/tokenizer`` ([] for components without one)."""
    if spec.name not in OWN_TOKENIZER:
        return []
    found = [folder / f for f in TOKENIZER_FILES if (folder / f).is_file()]
    names = {f.name for f in found}
    if "tokenizer.json" not in names and not {"vocab.json", "merges.txt"} <= names:
        raise CheckpointError(f"{folder}: the {spec.name} component needs its tokenizer (tokenizer.json, or vocab.json "
                              "+ merges.txt, as in the Hugging Face CLIP folders); none found")
    return found


def convert(src: str | Path, dst: str | Path, components_: list[str] | None = None, dtype: str = "source",
            overwrite: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    if dtype not in DTYPE_CHOICES:
        raise CheckpointError(f"--dtype {dtype!r}: choose from {', '.join(DTYPE_CHOICES)}")
    if not src.is_dir():
        raise CheckpointError(f"--src {src}: not a folder")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"--dst {dst} exists; pass --overwrite to replace it")
    plan, copies = resolve_sources(src, components_)
    if components_ is None:  # ConsisID's folder: sampling reads face_encoder/ as published; check it holds it all
        from mm_jax.consisid_faces import check_pipeline_folder

        check_pipeline_folder(src)
    checked = [(spec, *plan_component(spec, folder)) for spec, folder in plan]  # all checks before writing
    tokenizers = {spec.name: tokenizer_files(spec, folder) for spec, folder in plan}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        for spec, cfg, mapping, tensors in checked:
            convert_component(spec, cfg, mapping, tensors, tmp, dtype)
            if tokenizers[spec.name]:
                (tmp / spec.name / "tokenizer").mkdir()
                for f in tokenizers[spec.name]:
                    shutil.copy2(f, tmp / spec.name / "tokenizer" / f.name)
        for folder in copies:
            shutil.copytree(folder, tmp / folder.name)
        checkpoint.write_index(tmp, [spec.name for spec, *_ in checked] + [f.name for f in copies])
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def check_manifest(manifest: str | Path, config: str | Path | None = None, component: str | None = None) -> int:
    """Check that a ``{key: [shape, dtype]}`` manifest maps exactly onto our tree; return the param count."""
    manifest = Path(manifest)
    config = Path(config) if config else manifest.with_name(manifest.stem + "_config.json")
    if not config.exists():
        raise CheckpointError(f"no config for manifest {manifest}: {config} missing (pass --config)")
    hf_cfg = json.loads(config.read_text())
    spec = component_for_config(hf_cfg, component)
    cfg = spec.config_from_dict(hf_cfg)
    mapping = mp.build_mapping(spec.name, checkpoint.param_shapes(checkpoint.abstract_model(spec.name, cfg)))
    listed = json.loads(manifest.read_text())
    found = {k: tuple(listed[v][0]) for k, v in mp.normalize_source_keys(spec.name, listed).items()}
    problems = mp.check_source(spec.name, mapping, found)
    if problems:
        raise CheckpointError(f"{manifest} does not match the {spec.name} architecture "
                              f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    return int(sum(np.prod(m.our_shape) for m in mapping.values()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--src", help="diffusers pipeline folder or one component folder")
    ap.add_argument("--dst", help="output mm_jax checkpoint folder")
    ap.add_argument("--components", default=None,
                    help=f"comma-separated subset of {', '.join(list(components.COMPONENTS) + list(components.COPIED_COMPONENTS))}, "
                         "or 'all' (default: all found)")
    ap.add_argument("--dtype", default="source", choices=DTYPE_CHOICES, help="storage dtype of the output params")
    ap.add_argument("--overwrite", action="store_true", help="replace --dst if it exists")
    ap.add_argument("--check-manifest", metavar="FILE", help="validate the mapping against a key/shape manifest")
    ap.add_argument("--config", metavar="FILE", help="config for --check-manifest (default: <manifest>_config.json)")
    args = ap.parse_args(argv)
    comps = None if args.components in (None, "all") else [c.strip() for c in args.components.split(",") if c.strip()]
    try:
        if args.check_manifest:
            n = check_manifest(args.check_manifest, args.config, comps[0] if comps else None)
            print(f"OK: {args.check_manifest} maps onto our tree: {n:,} params")
            return 0
        if not args.src or not args.dst:
            ap.error("--src and --dst are required (or --check-manifest)")
        out = convert(args.src, args.dst, comps, args.dtype, args.overwrite)
        print(f"wrote {out}")
        return 0
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
