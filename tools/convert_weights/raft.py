"""Load RAFT's published ``raft-things.pth`` into ``mm_jax.models.raft``.

    python tools/convert_weights/raft.py CKPTS/raft/raft-things.pth [--out raft.safetensors]

The file (princeton-vl/RAFT's ``models.zip``; VBench fetches the same file as
``~/.cache/vbench/raft_model/models/raft-things.pth``) is a torch state dict saved through
``DataParallel``: every key carries a ``module.`` prefix, stripped here as VBench strips it. The conversion
is strict: every tensor of our module must be in the file with its shape and every tensor of the file must be
used, otherwise a ``CheckpointError`` lists every missing, unexpected and misshapen key. Two kinds of keys
are not tensors of ours: BatchNorm's ``num_batches_tracked`` counters (dropped) and the ``norm3`` entries of
a strided residual block, which torch saves twice (as ``norm3.*`` and as ``downsample.1.*``, one module);
those must equal their ``downsample.1`` twin. A conv kernel goes from (out, in, kh, kw) to
(kh, kw, in, out), everything else is copied. Run as a script it checks the file and prints the tensor
count; exit 2 when the file is absent. ``--out`` writes the loaded tensors (torch names and layout, the config
in the metadata) to the ``.safetensors`` that ``python -m mm_jax.evaluate --raft`` reads without torch.
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

FILE_NAME = "raft-things.pth"
LEAF_RENAMES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
DROPPED_SUFFIXES = ("num_batches_tracked",)
STRIP_PREFIX = "module."
ALIAS = (".norm3.", ".downsample.1.")  # torch registers the strided block's shortcut norm twice


def torch_key(path: tuple) -> str:
    """Our state path (``("cnet", "layer2", 0, "downsample", 1, "bn", "scale")``) -> the torch key
    (``cnet.layer2.0.downsample.1.weight``): the ``bn`` holder of a norm is not a torch module."""
    parts = [str(p) for p in path if str(p) != "bn"]
    parts[-1] = LEAF_RENAMES.get(parts[-1], parts[-1])
    return ".".join(parts)


def _torch_shape(leaf: str, shape: tuple) -> list:
    if leaf == "kernel":
        return [shape[3], shape[2], shape[0], shape[1]]
    return list(shape)


def expected_keys(model: nnx.Module) -> dict[str, list]:
    """``{torch key: torch shape}`` a state dict for ``model`` must hold (works on abstract models)."""
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return {torch_key(path): _torch_shape(str(path[-1]), tuple(var.get_value().shape)) for path, var in flat}


def load_state_dict(model: nnx.Module, state_dict: dict, source: str = "state dict") -> int:
    """Fill ``model`` (a ``RAFT``) in place from RAFT's state dict (``{key: array}``, numpy or torch,
    with or without the ``module.`` prefix); returns the number of tensors loaded."""
    found = {}
    for k, v in state_dict.items():
        kk = k[len(STRIP_PREFIX):] if k.startswith(STRIP_PREFIX) else k
        if not kk.endswith(DROPPED_SUFFIXES):
            found[kk] = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    problems, used, values = [], set(), []
    for path, var in flat:
        tk, leaf = torch_key(path), str(path[-1])
        want = _torch_shape(leaf, tuple(var.get_value().shape))
        if tk not in found:
            problems.append(f"missing key {tk} (expected shape {want})")
            continue
        used.add(tk)
        arr = found[tk]
        if want != list(arr.shape):
            problems.append(f"shape mismatch for {tk}: expected {want}, found {list(arr.shape)}")
            continue
        values.append((var, arr.transpose(2, 3, 1, 0) if leaf == "kernel" else arr))
    for k in sorted(set(found) - used):
        twin = k.replace(*ALIAS)
        if ALIAS[0] in k and twin in used:
            if found[twin].shape != found[k].shape or not np.array_equal(found[twin], found[k]):
                problems.append(f"key {k} differs from its twin {twin} (torch saves one module twice)")
            continue
        problems.append(f"unexpected key {k} (shape {list(found[k].shape)}): not part of RAFT")
    if problems:
        raise CheckpointError(f"{source} does not match RAFT ({len(problems)} problem(s)):\n  "
                              + "\n  ".join(problems))
    for var, arr in values:
        var.set_value(jnp.asarray(arr, var.get_value().dtype))
    return len(values)


def read_pth(path: str | Path) -> dict:
    """The torch state dict at ``path`` as ``{key: float32 numpy array}`` (torch is needed here only)."""
    return read_state_dict(path, f"princeton-vl/RAFT publishes it in models.zip as {FILE_NAME}")


def load(path: str | Path, config=None):
    """RAFT (``config`` or the release sizes) with the weights of the published file ``path``."""
    from mm_jax.models.raft import RAFT, RAFTConfig

    model = nnx.eval_shape(lambda: RAFT(config or RAFTConfig(), rngs=nnx.Rngs(0)))
    load_state_dict(model, read_pth(path), source=str(path))  # fills every abstract tensor (strict)
    return model


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = None
    if len(argv) == 3 and argv[1] == "--out" and argv[2].endswith(".safetensors"):
        argv, out = argv[:1], argv[2]
    if len(argv) != 1 or argv[0].startswith("-"):
        print(f"usage: python tools/convert_weights/raft.py PATH/{FILE_NAME} [--out X.safetensors]", file=sys.stderr)
        return 2
    if not Path(argv[0]).is_file():
        print(f"{argv[0]}: no such file (princeton-vl/RAFT publishes it in models.zip)", file=sys.stderr)
        return 2
    model = load(argv[0])
    print(f"{argv[0]}: {len(expected_keys(model))} tensors loaded into RAFT")
    if out:
        from mm_jax.metrics.dynamic_degree import save_raft

        print(f"{out}: {save_raft(model, out)} tensors written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
