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
``head_width`` and ``pt_hw_seq_len``. The mapping itself is ``mm_jax.face_weights`` (sampling reads the
published ``.pt`` with it, without torch); this module keeps the converter's names for it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from mm_jax import checkpoint
from mm_jax import face_weights as fw
from mm_jax.models.eva_clip import EVAVisionConfig, rope_tables  # noqa: F401  (re-exported for the tests)

COMPONENT = "eva_clip"
STACK = fw.EVA_STACK
VISUAL_PREFIX = fw.VISUAL_PREFIX
OTHER_TOWER = fw.OTHER_TOWER
ROPE_BUFFER = fw.ROPE_BUFFER
ROPE_ATOL = fw.ROPE_ATOL

# the key mapping lives in mm_jax (sampling reads the published .pt as it is): these are its names here
tower_tensors = fw.eva_tower_tensors
config_from_state_dict = fw.eva_config
build_mapping = fw.eva_mapping
check_rope = fw.check_eva_rope
convert_state_dict = fw.convert_eva
to_module = fw.eva_module


def load_pt(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of an EVA-CLIP ``.pt`` (a state dict, possibly under ``model``/``module``/``state_dict``
    and with DDP's ``module.`` prefix, as ``consisid_eva_clip.factory.load_state_dict`` reads it) as
    float32 numpy arrays, read without torch (``mm_jax.torch_pickle``: tensors only, no pickled code)."""
    from mm_jax import torch_pickle

    out = {}
    for k, v in torch_pickle.state_dict(path).items():
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = np.asarray(v, np.float32)
    return out


def save(ckpt_dir: str | Path, cfg: EVAVisionConfig, params: dict, name: str = COMPONENT) -> None:
    """Write the tower as component ``name`` of an mm_jax checkpoint folder (config.json + params, the
    ``blocks`` stack as one group). Loading it back (``checkpoint.load_component``) needs ``name``
    registered in ``mm_jax.components`` with ``stacks=("blocks",)``."""
    checkpoint.save_component(ckpt_dir, name, cfg, params)
