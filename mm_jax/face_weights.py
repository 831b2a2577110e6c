"""ConsisID's face networks from their published torch files: key names, array layouts, strict loading.

Three files of ConsisID's ``face_encoder/`` folder are torch state dicts, read here without torch
(``mm_jax.torch_pickle``) and placed into our modules:

- ``detection_Resnet50_Final.pth``: facexlib's RetinaFace-R50 (``mm_jax.models.retinaface``), keys
  possibly under DataParallel's ``module.``;
- ``parsing_bisenet.pth``: facexlib's BiSeNet (``mm_jax.models.bisenet``);
- ``EVA02_CLIP_L_336_psz14_s6B.pt``: a whole EVA-CLIP model, the vision tower under ``visual.``
  (``mm_jax.models.eva_clip``; the text tower and ``logit_scale`` are ignored); its sizes are read
  from the tensors' shapes (``eva_config``), so tiny test folders load the same way.

Our parameters carry the checkpoint's names: a torch key is our path joined with dots, the leaf
renamed (``kernel``/``scale`` -> ``weight``, BatchNorm ``mean``/``var`` -> ``running_*``) and a few
structural renames (a torch ``Sequential(conv, bn)`` is our ``ConvBN(conv, bn)``). A linear kernel
is transposed and a conv kernel moved from (out, in, kh, kw) to (kh, kw, in, out). Loading is strict:
every tensor of our module must be in the file with its shape and every tensor of the file must be
used (BatchNorm's ``num_batches_tracked`` and EVA's rope tables, checked against ours, aside);
otherwise ``FaceWeightsError`` lists every missing, unexpected and misshapen key. The converter CLIs
(``tools/convert_weights/{facexlib,eva_clip}.py``) are thin layers over this module.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax.models.eva_clip import EVAVisionConfig, EVAVisionTower, rope_tables


class FaceWeightsError(ValueError):
    """A face-network state dict that does not match our module; the message lists every problem."""


# -- facexlib: RetinaFace-R50 and BiSeNet ---------------------------------------------------------

FACEXLIB_FILES = {"retinaface": "detection_Resnet50_Final.pth", "bisenet": "parsing_bisenet.pth"}
FACEXLIB_LEAVES = {"kernel": "weight", "scale": "weight", "mean": "running_mean", "var": "running_var"}
# per network, our dotted path (regex) -> torch's: a torch Sequential(conv, bn) is our ConvBN(conv, bn)
FACEXLIB_RENAMES = {
    "retinaface": [(r"\.conv\.", ".0."), (r"\.bn\.", ".1.")],
    "bisenet": [(r"\.downsample\.conv\.", ".downsample.0."), (r"\.downsample\.bn\.", ".downsample.1.")],
}
DROPPED_SUFFIXES = ("num_batches_tracked",)
DDP_PREFIX = "module."


def build_facexlib(name: str, seed: int = 0) -> nnx.Module:
    """A randomly initialised facexlib network of that name (``retinaface`` or ``bisenet``)."""
    from mm_jax.models.bisenet import BiSeNet
    from mm_jax.models.retinaface import RetinaFace

    if name not in FACEXLIB_FILES:
        raise ValueError(f"network {name!r}: choose from {', '.join(FACEXLIB_FILES)}")
    return (RetinaFace if name == "retinaface" else BiSeNet)(rngs=nnx.Rngs(seed))


def facexlib_key(name: str, path: tuple) -> str:
    """Our state path (``("body", "layer1", 0, "conv1", "kernel")``) -> facexlib's key."""
    parts = [str(p) for p in path]
    parts[-1] = FACEXLIB_LEAVES.get(parts[-1], parts[-1])
    key = "." + ".".join(parts) + "."
    for pat, rep in FACEXLIB_RENAMES[name]:
        key = re.sub(pat, rep, key)
    return key.strip(".")


def _conv_torch_shape(leaf: str, shape: tuple) -> tuple:
    return (shape[3], shape[2], shape[0], shape[1]) if leaf == "kernel" else tuple(shape)


def _numpy(v) -> np.ndarray:
    return np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)


def load_facexlib_state_dict(model: nnx.Module, name: str, state_dict: dict, source: str = "state dict") -> int:
    """Fill ``model`` (a ``build_facexlib(name)`` module) in place from a facexlib state dict
    (``{key: array}``, numpy or torch); returns the number of tensors loaded."""
    found = {}
    for k, v in state_dict.items():
        kk = k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k
        if not kk.endswith(DROPPED_SUFFIXES):
            found[kk] = v
    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    problems, used, values = [], set(), []
    for path, var in flat:
        tk, leaf = facexlib_key(name, path), str(path[-1])
        want = tuple(var.get_value().shape)
        if tk not in found:
            problems.append(f"missing key {tk} (expected shape {list(_conv_torch_shape(leaf, want))})")
            continue
        used.add(tk)
        arr = _numpy(found[tk])
        arr = arr.transpose(2, 3, 1, 0) if leaf == "kernel" and arr.ndim == 4 else arr
        if arr.shape != want:
            problems.append(f"shape mismatch for {tk}: expected {list(_conv_torch_shape(leaf, want))}, "
                            f"found {list(_conv_torch_shape(leaf, arr.shape))}")
            continue
        values.append((var, arr))
    problems += [f"unexpected key {k} (shape {list(np.shape(found[k]))}): not part of {name}"
                 for k in sorted(set(found) - used)]
    if problems:
        raise FaceWeightsError(f"{source} does not match facexlib's {name} ({len(problems)} problem(s)):\n  "
                               + "\n  ".join(problems))
    for var, arr in values:
        var.set_value(arr.astype(var.get_value().dtype))
    return len(values)


def load_facexlib(name: str, path: str | Path) -> nnx.Module:
    """The network ``name`` with the weights of facexlib's published file ``path`` (read without torch)."""
    from mm_jax import torch_pickle

    model = build_facexlib(name)
    load_facexlib_state_dict(model, name, torch_pickle.state_dict(path), source=str(path))
    return model


# -- EVA02-CLIP vision tower ------------------------------------------------------------------------

EVA_STACK = "blocks"
VISUAL_PREFIX = "visual."
OTHER_TOWER = ("text.", "logit_scale")   # the rest of a whole EVA-CLIP checkpoint
ROPE_BUFFER = re.compile(r"^(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
ROPE_ATOL = 1e-5   # float32 tables computed by torch and by numpy from the same float32 inputs
_KERNEL_PERMS = {2: (1, 0), 4: (2, 3, 1, 0)}   # torch layout -> ours
_EVA_LEAVES = {"kernel": "weight", "scale": "weight"}


@dataclasses.dataclass(frozen=True)
class TensorMap:
    """One torch tensor: our flat key, the torch key, both shapes, the transpose torch -> ours
    (None: copied), and its layer in our ``blocks`` stack (None: not stacked)."""
    ours: str
    torch: str
    our_shape: tuple[int, ...]
    torch_shape: tuple[int, ...]
    perm: tuple[int, ...] | None
    index: int | None = None

    def to_ours(self, arr: np.ndarray) -> np.ndarray:
        return arr if self.perm is None else arr.transpose(self.perm)


def eva_tower_tensors(state_dict: dict) -> tuple[dict, dict]:
    """Split a state dict into (the vision tower's tensors without ``visual.``, its rope buffers)."""
    whole = any(k.startswith(VISUAL_PREFIX) for k in state_dict)
    tower, rope = {}, {}
    for k, v in state_dict.items():
        k = k[len(DDP_PREFIX):] if k.startswith(DDP_PREFIX) else k
        if whole:
            if k.startswith(OTHER_TOWER):
                continue
            if not k.startswith(VISUAL_PREFIX):
                tower[k] = v  # reported as unexpected
                continue
            k = k[len(VISUAL_PREFIX):]
        (rope if ROPE_BUFFER.match(k) else tower)[k] = v
    return tower, rope


def eva_config(state_dict: dict, **overrides) -> EVAVisionConfig:
    """The tower's sizes read from its tensors: width and token count from ``pos_embed``, patch from
    the conv, layers from the block indices, MLP width from ``w1``, embed_dim from ``head``, and
    ``head_width`` from the rope table when there is one (else the release's 64). ``pt_hw_seq_len``
    and the hidden-state blocks are not in the weights: the release's values unless overridden."""
    tower, rope = eva_tower_tensors(state_dict)
    need = ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.w1.weight", "head.weight")
    missing = [k for k in need if k not in tower]
    if missing:
        raise FaceWeightsError(f"not an EVA vision tower state dict: missing {missing}")
    _, tokens, width = np.shape(tower["pos_embed"])
    patch = np.shape(tower["patch_embed.proj.weight"])[-1]
    grid = int(round((tokens - 1) ** 0.5))
    fields = dict(image_size=grid * patch, patch_size=patch, width=width,
                  layers=1 + max(int(k.split(".")[1]) for k in tower if k.startswith("blocks.")),
                  mlp_hidden=np.shape(tower["blocks.0.mlp.w1.weight"])[0], embed_dim=np.shape(tower["head.weight"])[0])
    if rope:
        fields["head_width"] = np.shape(next(iter(rope.values())))[-1]
    fields.update(overrides)
    cfg = EVAVisionConfig(**fields)
    cfg.validate()
    return cfg


def eva_mapping(cfg: EVAVisionConfig) -> dict[str, TensorMap]:
    """``{torch key: TensorMap}`` for every parameter of the tower (each block's tensors -> its
    layer of the ``blocks`` stack)."""
    from mm_jax import checkpoint

    shapes = checkpoint.param_shapes(nnx.eval_shape(lambda: EVAVisionTower(cfg, rngs=nnx.Rngs(0))))
    out: dict[str, TensorMap] = {}
    for ours, (shape, _) in shapes.items():
        stacked = ours.startswith(EVA_STACK + "/")
        for i in range(shape[0]) if stacked else [None]:
            path = ours if i is None else f"{EVA_STACK}/{i}/{ours[len(EVA_STACK) + 1:]}"
            shp = tuple(shape[1:] if stacked else shape)
            perm = _KERNEL_PERMS.get(len(shp)) if ours.endswith("/kernel") else None
            tshape = shp if perm is None else tuple(shp[j] for j in np.argsort(perm))
            parts = path.split("/")
            parts[-1] = _EVA_LEAVES.get(parts[-1], parts[-1])
            tk = ".".join(parts)
            out[tk] = TensorMap(ours, tk, shp, tshape, perm, i)
    return out


def check_eva_source(mapping: dict[str, TensorMap], found: dict[str, tuple]) -> list[str]:
    """Problems between the expected mapping and a tower's ``{key: shape}``, one line each."""
    problems = []
    for tk, m in mapping.items():
        if tk not in found:
            problems.append(f"missing key {tk} (expected shape {list(m.torch_shape)})")
        elif tuple(found[tk]) != m.torch_shape:
            problems.append(f"shape mismatch for {tk}: expected {list(m.torch_shape)}, found {list(found[tk])}")
    problems += [f"unexpected key {k} (shape {list(found[k])}): not part of the eva_clip architecture"
                 for k in sorted(set(found) - set(mapping))]
    return problems


def check_eva_rope(cfg: EVAVisionConfig, rope: dict) -> list[str]:
    """Problems between stored rope buffers and the tables our config gives, one line each."""
    cos, sin = rope_tables(cfg)
    problems = []
    for k, v in sorted(rope.items()):
        want = cos if k.endswith("cos") else sin
        if np.shape(v) != want.shape:
            problems.append(f"rope buffer {k} has shape {list(np.shape(v))}; the config gives {list(want.shape)} "
                            f"(grid {cfg.grid}^2, head_width {cfg.head_width})")
        elif not np.allclose(np.asarray(v, np.float32), want, atol=ROPE_ATOL, rtol=0):
            problems.append(f"rope buffer {k} differs from the table of pt_hw_seq_len={cfg.pt_hw_seq_len}, "
                            f"rope_theta={cfg.rope_theta} by {np.max(np.abs(v - want)):.2e}")
    return problems


def convert_eva(state_dict: dict, cfg: EVAVisionConfig | None = None) -> tuple[EVAVisionConfig, dict]:
    """-> (config, ``{our flat key: float32 array}``) with the block stack assembled; raises
    ``FaceWeightsError`` listing every missing, unexpected or misshapen tensor."""
    cfg = cfg or eva_config(state_dict)
    tower, rope = eva_tower_tensors(state_dict)
    mapping = eva_mapping(cfg)
    problems = check_eva_source(mapping, {k: tuple(np.shape(v)) for k, v in tower.items()})
    problems += check_eva_rope(cfg, rope)
    if problems:
        raise FaceWeightsError(f"the state dict does not match the EVA vision tower of {cfg} "
                               f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    grouped: dict[str, list[TensorMap]] = {}
    for m in mapping.values():
        grouped.setdefault(m.ours, []).append(m)
    params = {}
    for ours, ms in grouped.items():
        ms.sort(key=lambda m: -1 if m.index is None else m.index)
        arrays = [m.to_ours(_numpy(tower[m.torch])) for m in ms]
        params[ours] = np.stack(arrays) if ms[0].index is not None else arrays[0]
    return cfg, params


def eva_module(cfg: EVAVisionConfig, params: dict) -> EVAVisionTower:
    """A tower holding ``params`` (``convert_eva``'s) in ``cfg.param_dtype``; built abstractly and filled."""
    from mm_jax import checkpoint

    graphdef, state = nnx.split(nnx.eval_shape(lambda: EVAVisionTower(cfg, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[checkpoint.flat_key(path)], var.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def load_eva(path: str | Path, dtype: str = "float32") -> EVAVisionTower:
    """The vision tower of an EVA-CLIP ``.pt`` (read without torch), computing and holding ``dtype``."""
    from mm_jax import torch_pickle

    sd = torch_pickle.state_dict(path)
    try:
        cfg = dataclasses.replace(eva_config(sd), dtype=dtype, param_dtype=dtype)
        cfg, params = convert_eva(sd, cfg)
    except FaceWeightsError as e:
        raise FaceWeightsError(f"{path}: {e}") from None
    return eva_module(cfg, params)
