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
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax
import numpy as np
from flax import nnx

from tools.convert_weights.safetensors_io import CheckpointError
from tools.convert_weights.torch_files import read_state_dict

# our leaf name -> torch's
LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
# per network, our dotted path (regex) -> torch's: a torch Sequential(conv, bn) is our ConvBN(conv, bn)
RENAMES = {
    "retinaface": [(r"\.conv\.", ".0."), (r"\.bn\.", ".1.")],
    "bisenet": [(r"\.downsample\.conv\.", ".downsample.0."), (r"\.downsample\.bn\.", ".downsample.1.")],
}
DROPPED_SUFFIXES = ("num_batches_tracked",)
STRIP_PREFIX = "module."
FILES = {"retinaface": "detection_Resnet50_Final.pth", "bisenet": "parsing_bisenet.pth"}


def build(name: str, seed: int = 0) -> nnx.Module:
    """A randomly initialised network of that name (``retinaface`` or ``bisenet``)."""
    from mm_jax.models.bisenet import BiSeNet
    from mm_jax.models.retinaface import RetinaFace

    if name not in FILES:
        raise ValueError(f"network {name!r}: choose from {', '.join(FILES)}")
    return (RetinaFace if name == "retinaface" else BiSeNet)(rngs=nnx.Rngs(seed))


def torch_key(name: str, path: tuple) -> str:
    """Our state path (``("body", "layer1", 0, "conv1", "kernel")``) -> facexlib's key."""
    parts = [str(p) for p in path]
    parts[-1] = LEAF_RENAMES.get(parts[-1], parts[-1])
    key = "." + ".".join(parts) + "."
    for pat, rep in RENAMES[name]:
        key = re.sub(pat, rep, key)
    return key.strip(".")


def _to_ours(leaf: str, arr: np.ndarray) -> np.ndarray:
    return arr.transpose(2, 3, 1, 0) if leaf == "kernel" else arr


def load_state_dict(model: nnx.Module, name: str, state_dict: dict, source: str = "state dict") -> int:
    """Fill ``model`` (a ``build(name)`` module) in place from a facexlib state dict
    (``{key: array}``, numpy or torch); returns the number of tensors loaded."""
    found = {}
    for k, v in state_dict.items():
        kk = k[len(STRIP_PREFIX):] if k.startswith(STRIP_PREFIX) else k
        if not kk.endswith(DROPPED_SUFFIXES):
            found[kk] = v
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    problems, used, values = [], set(), []
    for path, var in flat:
        tk, leaf = torch_key(name, path), str(path[-1])
        want = tuple(var.get_value().shape)
        if tk not in found:
            problems.append(f"missing key {tk} (expected shape {list(_torch_shape(leaf, want))})")
            continue
        used.add(tk)
        arr = _to_ours(leaf, np.asarray(found[tk].detach().cpu().numpy() if hasattr(found[tk], "detach")
                                        else found[tk], np.float32))
        if arr.shape != want:
            problems.append(f"shape mismatch for {tk}: expected {list(_torch_shape(leaf, want))}, "
                            f"found {list(_torch_shape(leaf, arr.shape))}")
            continue
        values.append((var, arr))
    problems += [f"unexpected key {k} (shape {list(np.shape(found[k]))}): not part of {name}"
                 for k in sorted(set(found) - used)]
    if problems:
        raise CheckpointError(f"{source} does not match facexlib's {name} ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    for var, arr in values:
        var.set_value(arr.astype(var.get_value().dtype))
    return len(values)


def _torch_shape(leaf: str, shape: tuple) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else tuple(shape)


def read_pth(path: str | Path) -> dict:
    """A torch ``.pth`` state dict as ``{key: float32 numpy array}`` (torch is needed here only)."""
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
