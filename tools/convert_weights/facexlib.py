"""Load facexlib's published face networks into our Flax modules: RetinaFace-R50 and BiSeNet.

    python tools/convert_weights/facexlib.py FACEDIR/detection_Resnet50_Final.pth FACEDIR/parsing_bisenet.pth

``detection_Resnet50_Final.pth`` (RetinaFace, ``mm_jax.models.retinaface``) and ``parsing_bisenet.pth``
(BiSeNet, ``mm_jax.models.bisenet``) are torch state dicts under facexlib's key names; the detector's
may carry DataParallel's ``module.`` prefix, stripped as facexlib's loader does. The conversion is
strict, as ``from_torch.py``'s: every tensor of our module must be in the file with its shape, and
every tensor of the file must be used (only BatchNorm's ``num_batches_tracked`` counters are
dropped); otherwise a ``CheckpointError`` lists every missing, unexpected and misshapen key. The
transform follows from the kind of tensor: a conv kernel goes from (out, in, kh, kw) to
(kh, kw, in, out), everything else is copied. Run as a script it checks files and prints counts.
The mapping itself is ``mm_jax.face_weights`` (sampling reads the published files with it, without
torch); this module keeps the converter's names for it.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import numpy as np
from flax import nnx

from mm_jax import face_weights as fw
from tools.convert_weights.safetensors_io import CheckpointError
from tools.convert_weights.torch_files import read_state_dict

# the key mapping lives in mm_jax (sampling reads the published files with it): its names here
LEAF_RENAMES = fw.FACEXLIB_LEAVES
RENAMES = fw.FACEXLIB_RENAMES
DROPPED_SUFFIXES = fw.DROPPED_SUFFIXES
STRIP_PREFIX = fw.DDP_PREFIX
FILES = fw.FACEXLIB_FILES
build = fw.build_facexlib
torch_key = fw.facexlib_key


def load_state_dict(model: nnx.Module, name: str, state_dict: dict, source: str = "state dict") -> int:
    """Fill ``model`` (a ``build(name)`` module) in place from a facexlib state dict
    (``{key: array}``, numpy or torch); returns the number of tensors loaded. A mismatch is a
    ``CheckpointError`` listing every missing, unexpected and misshapen key."""
    try:
        return fw.load_facexlib_state_dict(model, name, state_dict, source)
    except fw.FaceWeightsError as e:
        raise CheckpointError(str(e)) from None


def read_pth(path: str | Path) -> dict:
    """A torch ``.pth`` state dict as ``{key: float32 numpy array}``."""
    return read_state_dict(path, f"facexlib publishes it as {', '.join(FILES.values())}")


def load(name: str, path: str | Path) -> nnx.Module:
    """The network ``name`` with the weights of facexlib's published file ``path``."""
    model = build(name)
    load_state_dict(model, name, read_pth(path), source=str(path))
    return model


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Check facexlib's RetinaFace/BiSeNet .pth files against our modules.",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("files", nargs="+", help=f"{FILES['retinaface']} and/or {FILES['bisenet']}")
    args = ap.parse_args(argv)
    by_file = {v: k for k, v in FILES.items()}
    names = [by_file.get(Path(f).name) for f in args.files]
    unknown = [f for f, n in zip(args.files, names) if n is None]
    if unknown:
        print(f"error: {', '.join(unknown)}: expected files named {' or '.join(FILES.values())}", file=sys.stderr)
        return 2
    try:
        for f, n in zip(args.files, names):
            model = build(n)
            count = load_state_dict(model, n, read_pth(f), source=f)
            params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
            print(f"OK: {f}: {count} tensors -> {n} ({params:,} params)")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
