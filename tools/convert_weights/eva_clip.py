"""EVA02-CLIP vision tower: a ``consisid_eva_clip`` / EVA-CLIP ``.pt`` state dict -> our parameters.

ConsisID's ``face_encoder/EVA02_CLIP_L_336_psz14_s6B.pt`` is a whole EVA-CLIP model: the vision tower's
tensors under ``visual.`` (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.{norm1,
attn.{q_bias,v_bias,q_proj,k_proj,v_proj,inner_attn_ln,proj}, norm2, mlp.{w1,w2,ffn_ln,w3}}``, ``norm``,
``head``), the text tower under ``text.`` and ``logit_scale``. A bare tower's ``state_dict()`` (no
prefix) is taken too. As in ``mapping.py``, our parameters carry the checkpoint's names, the array
transform follows from the kind of parameter (linear kernels transposed, the patch conv moved to
channels-last) and the blocks are one stack (``blocks``, leading ``layers`` axis).

Strict: every tower tensor must be used, and missing, unexpected and wrongly shaped ones are listed
together. The rotary tables (``rope.freqs_cos``/``freqs_sin``, repeated in every block's attention)
are buffers that we compute from the config (``mm_jax.models.eva_clip.rope_tables``; the reference also
drops them on load and recomputes them); when present they are compared with ours, which checks
``head_width`` and ``pt_hw_seq_len``.
"""
from __future__ import annotations

import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mm_jax import checkpoint
from mm_jax.models.eva_clip import EVAVisionConfig, EVAVisionTower, rope_tables
from tools.convert_weights import mapping as mp

COMPONENT = "eva_clip"
STACK = "blocks"
VISUAL_PREFIX = "visual."
OTHER_TOWER = ("text.", "logit_scale")   # the rest of a whole EVA-CLIP checkpoint
ROPE_BUFFER = re.compile(r"^(blocks\.\d+\.attn\.)?rope\.freqs_(cos|sin)$")
ROPE_ATOL = 1e-5   # float32 tables computed by torch and by numpy from the same float32 inputs


def load_pt(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of an EVA-CLIP ``.pt`` (a state dict, possibly under ``model``/``module``/``state_dict``
    and with DDP's ``module.`` prefix, as ``consisid_eva_clip.factory.load_state_dict`` reads it) as
    float32 numpy arrays. Loads with ``weights_only=True``: tensors only, no pickled code."""
    import torch  # the converter side only

    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: not a state dict (found {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v)
    return out


def tower_tensors(state_dict: dict) -> tuple[dict, dict]:
    """Split a state dict into (the vision tower's tensors without ``visual.``, its rope buffers)."""
    whole = any(k.startswith(VISUAL_PREFIX) for k in state_dict)
    tower, rope = {}, {}
    for k, v in state_dict.items():
        if whole:
            if k.startswith(OTHER_TOWER):
                continue
            if not k.startswith(VISUAL_PREFIX):
                tower[k] = v  # reported as unexpected
                continue
            k = k[len(VISUAL_PREFIX):]
        (rope if ROPE_BUFFER.match(k) else tower)[k] = v
    return tower, rope


def config_from_state_dict(state_dict: dict, **overrides) -> EVAVisionConfig:
    """The tower's sizes read from its tensors: width and token count from ``pos_embed``, patch from
    the conv, layers from the block indices, MLP width from ``w1``, embed_dim from ``head``, and
    ``head_width`` from the rope table when there is one. ``pt_hw_seq_len`` and the hidden-state
    blocks are not in the weights: the release's values unless overridden."""
    tower, rope = tower_tensors(state_dict)
    need = ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.w1.weight", "head.weight")
    missing = [k for k in need if k not in tower]
    if missing:
        raise ValueError(f"not an EVA vision tower state dict: missing {missing}")
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


def build_mapping(cfg: EVAVisionConfig) -> dict[str, mp.Mapping]:
    """``{torch key: Mapping}`` for every parameter of the tower (each block's tensors -> its layer of
    the ``blocks`` stack)."""
    shapes = checkpoint.param_shapes(nnx.eval_shape(lambda: EVAVisionTower(cfg, rngs=nnx.Rngs(0))))
    out: dict[str, mp.Mapping] = {}
    for ours, (shape, _) in shapes.items():
        stacked = ours.startswith(STACK + "/")
        for i in range(shape[0]) if stacked else [None]:
            path = ours if i is None else f"{STACK}/{i}/{ours[len(STACK) + 1:]}"
            shp = tuple(shape[1:] if stacked else shape)
            perm = mp._KERNEL_PERMS.get(len(shp)) if ours.endswith("/kernel") else None
            tshape = shp if perm is None else tuple(shp[j] for j in np.argsort(perm))
            tk = mp.torch_key(COMPONENT, path)
            out[tk] = mp.Mapping(ours, tk, shp, tshape, perm, i)
    return out


def check_rope(cfg: EVAVisionConfig, rope: dict) -> list[str]:
    """Problems between stored rope buffers and the tables our config gives, one line each."""
    cos, sin = rope_tables(cfg)
    problems = []
    for k, v in sorted(rope.items()):
        want = cos if k.endswith("cos") else sin
        if np.shape(v) != want.shape:
            problems.append(f"rope buffer {k} has shape {list(np.shape(v))}; the config gives {list(want.shape)} "
                            f"(grid {cfg.grid}^2, head_width {cfg.head_width})")
        elif not np.allclose(v, want, atol=ROPE_ATOL, rtol=0):
            problems.append(f"rope buffer {k} differs from the table of pt_hw_seq_len={cfg.pt_hw_seq_len}, "
                            f"rope_theta={cfg.rope_theta} by {np.max(np.abs(v - want)):.2e}")
    return problems


def convert_state_dict(state_dict: dict, cfg: EVAVisionConfig | None = None) -> tuple[EVAVisionConfig, dict]:
    """-> (config, ``{our flat key: np.ndarray}``) with each block stack assembled; raises
    ``ValueError`` listing every missing, unexpected or misshapen tensor."""
    cfg = cfg or config_from_state_dict(state_dict)
    tower, rope = tower_tensors(state_dict)
    mapping = build_mapping(cfg)
    problems = mp.check_source(COMPONENT, mapping, {k: tuple(np.shape(v)) for k, v in tower.items()})
    problems += check_rope(cfg, rope)
    if problems:
        raise ValueError(f"the state dict does not match the EVA vision tower of {cfg} "
                         f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))
    params = {}
    for ours, ms in mp.by_parameter(mapping).items():
        arrays = [m.to_ours(np.asarray(tower[m.torch], np.float32)) for m in ms]
        params[ours] = np.stack(arrays) if ms[0].index is not None else arrays[0]
    return cfg, params


def to_module(cfg: EVAVisionConfig, params: dict) -> EVAVisionTower:
    """A tower holding ``params`` (from ``convert_state_dict``) in ``cfg.param_dtype``; built abstractly
    (no random init) and filled."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: EVAVisionTower(cfg, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(jnp.asarray(params[checkpoint.flat_key(path)], var.get_value().dtype))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save(ckpt_dir: str | Path, cfg: EVAVisionConfig, params: dict, name: str = COMPONENT) -> None:
    """Write the tower as component ``name`` of an mm_jax checkpoint folder (config.json + params, the
    ``blocks`` stack as one group). Loading it back (``checkpoint.load_component``) needs ``name``
    registered in ``mm_jax.components`` with ``stacks=("blocks",)``."""
    checkpoint.save_component(ckpt_dir, name, cfg, params)
