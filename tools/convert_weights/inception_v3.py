"""Load torchvision's Inception v3 (``inception_v3_google-0cc3c7bd.pth``) into ``mm_jax.models.inception_v3``.

    python tools/convert_weights/inception_v3.py PATH/inception_v3_google-0cc3c7bd.pth [--out inception_v3.safetensors]

``--out`` writes the used tensors (torchvision's names and layout) to a ``.safetensors`` that :func:`load` reads
without torch, so evaluation needs torch only once, here.

The file (torchvision's ``Inception_V3_Weights.IMAGENET1K_V1``, https://download.pytorch.org/models/
inception_v3_google-0cc3c7bd.pth, BSD-3-Clause code; weights ported by torchvision from the paper's release) is a
torch state dict under torchvision's names (``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``,
...). ``AuxLogits.*`` and ``fc.*`` are dropped (ConsisID replaces ``fc`` by ``Identity``; the auxiliary head only
runs in training), as are BatchNorm's ``num_batches_tracked`` counters. Everything else is strict: every tensor
of our module must be in the file with its shape and every other tensor of the file must be used; otherwise a
``CheckpointError`` lists every missing, unexpected and misshapen key. A conv kernel goes from (out, in, kh, kw)
to (kh, kw, in, out); BatchNorm tensors are copied. Run as a script it checks the file and prints the tensor
count; exit 2 when the file is absent.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax.numpy as jnp
import numpy as np
from flax import nnx

from tools.convert_weights.safetensors_io import CheckpointError
from tools.convert_weights.torch_files import read_state_dict

FILE_NAME = "inception_v3_google-0cc3c7bd.pth"
LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
DROPPED_PREFIXES = ("AuxLogits.", "fc.")
DROPPED_SUFFIXES = ("num_batches_tracked",)


def torch_key(path: tuple) -> str:
    """Our state path (``("Mixed_5b", "branch1x1", "bn", "mean")``) -> torchvision's key."""
    parts = [str(p) for p in path]
    parts[-1] = LEAF_RENAMES.get(parts[-1], parts[-1])
    return ".".join(parts)


def _torch_shape(leaf: str, shape: tuple) -> list:
    if leaf == "kernel":
        return [shape[3], shape[2], shape[0], shape[1]]
    return list(shape)


def expected_keys(model: nnx.Module) -> dict[str, list]:
    """``{torch key: torch shape}`` that a state dict for ``model`` must hold (works on abstract models)."""
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return {torch_key(path): _torch_shape(str(path[-1]), tuple(var.get_value().shape)) for path, var in flat}


def kept(state_dict: dict) -> dict:
    """The tensors of ``state_dict`` the feature extractor uses: without AuxLogits, fc and BN counters."""
    return {k: v for k, v in state_dict.items()
            if not k.startswith(DROPPED_PREFIXES) and not k.endswith(DROPPED_SUFFIXES)}


def load_state_dict(model: nnx.Module, state_dict: dict, source: str = "state dict") -> int:
    """Fill ``model`` (an ``InceptionV3Features``) in place from a torchvision state dict (``{key: array}``,
    numpy or torch); returns the number of tensors loaded. Nothing is written unless every key matches."""
    found = kept(state_dict)
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    problems, used, values = [], set(), []
    for path, var in flat:
        tk, leaf = torch_key(path), str(path[-1])
        want = _torch_shape(leaf, tuple(var.get_value().shape))
        if tk not in found:
            problems.append(f"missing key {tk} (expected shape {want})")
            continue
        used.add(tk)
        src = found[tk]
        arr = np.asarray(src.detach().cpu().float().numpy() if hasattr(src, "detach") else src, np.float32)
        if want != list(arr.shape):
            problems.append(f"shape mismatch for {tk}: expected {want}, found {list(arr.shape)}")
            continue
        values.append((var, arr.transpose(2, 3, 1, 0) if leaf == "kernel" else arr))
    problems += [f"unexpected key {k} (shape {list(np.shape(found[k]))}): not part of Inception v3's features"
                 for k in sorted(set(found) - used)]
    if problems:
        raise CheckpointError(f"{source} does not match Inception v3 ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    for var, arr in values:
        var.set_value(jnp.asarray(arr, var.get_value().dtype))
    return len(values)


def read_pth(path: str | Path) -> dict:
    """The torch state dict at ``path`` as ``{key: float32 numpy array}`` (torch is needed here only)."""
    return read_state_dict(path, f"torchvision publishes it as {FILE_NAME}")


def read_weights(path: str | Path) -> dict:
    """``{key: float32 array}`` from the published ``.pth`` (needs torch) or a ``.safetensors`` written by ``--out``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return read_pth(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (write it with tools/convert_weights/inception_v3.py --out)")
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


def save_kept(state_dict: dict, out: str | Path) -> int:
    """Write the used tensors of ``state_dict`` (torch names and layout) to ``out`` (.safetensors); the count."""
    from safetensors.numpy import save_file

    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in kept(state_dict).items()}
    save_file(tensors, str(out), metadata={"source": FILE_NAME})
    return len(tensors)


def load(path: str | Path, config=None):
    """The feature extractor (``config`` or the published sizes, transform_input on) with the weights at ``path``."""
    from mm_jax.models.inception_v3 import InceptionV3Config, InceptionV3Features

    model = nnx.eval_shape(lambda: InceptionV3Features(config or InceptionV3Config(), rngs=nnx.Rngs(0)))
    load_state_dict(model, read_weights(path), source=str(path))  # fills every abstract tensor (strict)
    return model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = None
    if len(argv) == 3 and argv[1] == "--out" and argv[2].endswith(".safetensors"):
        argv, out = argv[:1], argv[2]
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: python tools/convert_weights/inception_v3.py PATH/{FILE_NAME} [--out X.safetensors]",
              file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"{argv[0]}: no such file (torchvision publishes it as {FILE_NAME})", file=sys.stderr)
        return 2
    sd = read_weights(argv[0])
    from mm_jax.models.inception_v3 import InceptionV3Features

    model = nnx.eval_shape(lambda: InceptionV3Features(rngs=nnx.Rngs(0)))
    n = load_state_dict(model, sd, source=argv[0])  # strict check before anything is written
    print(f"{argv[0]}: {n} tensors loaded into Inception v3 (features)")
    if out:
        print(f"{out}: {save_kept(sd, out)} tensors written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
