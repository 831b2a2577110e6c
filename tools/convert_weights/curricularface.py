"""Load CurricularFace's published IR-101 into ``mm_jax.models.curricularface``.

    python tools/convert_weights/curricularface.py CKPTS/face_encoder/glint360k_curricular_face_r101_backbone.bin

The file (in ConsisID's ``BestWishYsh/ConsisID-preview`` release, ``face_encoder/``) is a torch state dict of
TFace's ``IR_101([112, 112])`` under its key names (``input_layer.0.weight``, ``body.12.res_layer.4.weight``,
``output_layer.3.bias``, ...); a DataParallel ``module.`` prefix is stripped. The conversion is strict:
every tensor of our module must be in the file with its shape and every tensor of the file must be used
(only BatchNorm's ``num_batches_tracked`` counters are dropped); otherwise a ``CheckpointError`` lists
every missing, unexpected and misshapen key. A conv kernel goes from (out, in, kh, kw) to
(kh, kw, in, out), the Linear's from (out, in) to (in, out), everything else is copied. Run as a script
it checks the file and prints the tensor count; exit 2 when the file is absent.
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

FILE_NAME = "glint360k_curricular_face_r101_backbone.bin"
LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
DROPPED_SUFFIXES = ("num_batches_tracked",)
STRIP_PREFIX = "module."


def torch_key(path: tuple) -> str:
    """Our state path (``("body", 3, "res_layer", 4, "kernel")``) -> TFace's key."""
    from mm_jax.models.curricularface import OUTPUT_LAYER_INDEX

    parts = [str(p) for p in path]
    parts[-1] = LEAF_RENAMES.get(parts[-1], parts[-1])
    if parts[0] in OUTPUT_LAYER_INDEX:
        parts = ["output_layer", str(OUTPUT_LAYER_INDEX[parts[0]])] + parts[1:]
    return ".".join(parts)


def _to_ours(leaf: str, arr: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
    return arr


def _torch_shape(leaf: str, shape: tuple) -> list:
    if leaf == "kernel":
        return [shape[3], shape[2], shape[0], shape[1]] if len(shape) == 4 else [shape[1], shape[0]]
    return list(shape)


def expected_keys(model: nnx.Module) -> dict[str, list]:
    """``{torch key: torch shape}`` that a state dict for ``model`` must hold (works on abstract models)."""
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return {torch_key(path): _torch_shape(str(path[-1]), tuple(var.get_value().shape)) for path, var in flat}


def load_state_dict(model: nnx.Module, state_dict: dict, source: str = "state dict") -> int:
    """Fill ``model`` (a ``CurricularFaceIR``) in place from a TFace state dict (``{key: array}``,
    numpy or torch); returns the number of tensors loaded."""
    found = {}
    for k, v in state_dict.items():
        kk = k[len(STRIP_PREFIX):] if k.startswith(STRIP_PREFIX) else k
        if not kk.endswith(DROPPED_SUFFIXES):
            found[kk] = v
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    problems, used, values = [], set(), []
    for path, var in flat:
        tk, leaf = torch_key(path), str(path[-1])
        want = tuple(var.get_value().shape)
        if tk not in found:
            problems.append(f"missing key {tk} (expected shape {_torch_shape(leaf, want)})")
            continue
        used.add(tk)
        src = found[tk]
        arr = np.asarray(src.detach().cpu().float().numpy() if hasattr(src, "detach") else src, np.float32)
        if _torch_shape(leaf, want) != list(arr.shape):
            problems.append(f"shape mismatch for {tk}: expected {_torch_shape(leaf, want)}, found {list(arr.shape)}")
            continue
        values.append((var, _to_ours(leaf, arr)))
    problems += [f"unexpected key {k} (shape {list(np.shape(found[k]))}): not part of the IR backbone"
                 for k in sorted(set(found) - used)]
    if problems:
        raise CheckpointError(f"{source} does not match CurricularFace IR ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    for var, arr in values:
        var.set_value(jnp.asarray(arr, var.get_value().dtype))
    return len(values)


def read_bin(path: str | Path) -> dict:
    """The torch state dict at ``path`` as ``{key: float32 numpy array}`` (torch is needed here only)."""
    return read_state_dict(path, f"ConsisID publishes it as face_encoder/{FILE_NAME}")


def load(path: str | Path, config=None):
    """The IR-101 (or ``config``'s IR backbone) with the weights of the published file ``path``."""
    from mm_jax.models.curricularface import CurricularFaceConfig, CurricularFaceIR

    model = nnx.eval_shape(lambda: CurricularFaceIR(config or CurricularFaceConfig(), rngs=nnx.Rngs(0)))
    load_state_dict(model, read_bin(path), source=str(path))  # fills every abstract tensor (strict)
    return model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: python tools/convert_weights/curricularface.py PATH/{FILE_NAME}", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"{argv[0]}: no such file (ConsisID publishes it as face_encoder/{FILE_NAME})", file=sys.stderr)
        return 2
    model = load(argv[0])
    n = len(expected_keys(model))
    print(f"{argv[0]}: {n} tensors loaded into CurricularFace IR-101")
    return 0


if __name__ == "__main__":
    sys.exit(main())
