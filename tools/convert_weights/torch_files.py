"""Reading a published torch state-dict file (``.pth`` / ``.bin``) for the strict converters of the
face and metric networks (facexlib, CurricularFace, Inception v3, RAFT). torch is imported here only."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tools.convert_weights.safetensors_io import CheckpointError


def read_state_dict(path: str | Path, published_as: str) -> dict[str, np.ndarray]:
    """The torch state dict at ``path`` as ``{key: float32 numpy array}``. A missing file or one that
    holds no state dict is a ``CheckpointError``; ``published_as`` says where the file comes from."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file ({published_as})")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, dict):
        raise CheckpointError(f"{path}: holds a {type(sd).__name__}, not a state dict")
    return {k: v.float().numpy() for k, v in sd.items()}
