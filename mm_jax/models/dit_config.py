"""``DiTConfig``: the CogVideoX DiT's architecture (diffusers ``config.json`` field names) and the
runtime choices (dtypes, remat, attention kernel, scan) that are not part of the checkpoint."""
from __future__ import annotations

import dataclasses
from typing import Optional

from mm_jax import presets
from mm_jax.models.block_runner import REMAT_POLICIES
from mm_jax.models.config_base import ConfigBase

_5B = presets.load("cogvideox5b_transformer")


@dataclasses.dataclass(frozen=True)
class DiTConfig(ConfigBase):
    """Architecture (diffusers ``config.json`` field names) plus runtime choices. The architecture
    defaults are the published CogVideoX-5B's, read from its preset (``mm_jax/presets``, their one home)."""

    num_attention_heads: int = _5B["num_attention_heads"]
    attention_head_dim: int = _5B["attention_head_dim"]
    in_channels: int = _5B["in_channels"]
    out_channels: Optional[int] = _5B["out_channels"]
    num_layers: int = _5B["num_layers"]
    patch_size: int = _5B["patch_size"]
    patch_size_t: Optional[int] = _5B["patch_size_t"]
    text_embed_dim: int = _5B["text_embed_dim"]
    time_embed_dim: int = _5B["time_embed_dim"]
    max_text_seq_length: int = _5B["max_text_seq_length"]
    sample_width: int = _5B["sample_width"]
    sample_height: int = _5B["sample_height"]
    sample_frames: int = _5B["sample_frames"]
    temporal_compression_ratio: int = _5B["temporal_compression_ratio"]
    norm_eps: float = _5B["norm_eps"]
    norm_elementwise_affine: bool = _5B["norm_elementwise_affine"]
    flip_sin_to_cos: bool = _5B["flip_sin_to_cos"]
    freq_shift: int = _5B["freq_shift"]
    patch_bias: bool = _5B["patch_bias"]
    attention_bias: bool = _5B["attention_bias"]
    use_rotary_positional_embeddings: bool = _5B["use_rotary_positional_embeddings"]
    use_learned_positional_embeddings: bool = _5B["use_learned_positional_embeddings"]
    spatial_interpolation_scale: float = _5B["spatial_interpolation_scale"]
    temporal_interpolation_scale: float = _5B["temporal_interpolation_scale"]
    activation_fn: str = _5B["activation_fn"]
    timestep_activation_fn: str = _5B["timestep_activation_fn"]
    ofs_embed_dim: Optional[int] = _5B["ofs_embed_dim"]
    dropout: float = _5B["dropout"]
    # runtime (not part of the checkpoint)
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: Optional[str] = None
    scan_layers: bool = True       # blocks under lax.scan (one compiled body) or unrolled
    attention_parallelism: Optional[str] = None  # over a context mesh axis: "ulysses" | "ring" | None (default)

    RUNTIME_FIELDS = ("dtype", "param_dtype", "remat_policy", "attention_impl", "scan_layers",
                      "attention_parallelism")
    TAG = {"_class_name": "CogVideoXTransformer3DModel"}
    STRICT = True

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    def validate(self) -> None:
        unsupported = {
            "patch_size_t": self.patch_size_t is not None,
            "ofs_embed_dim": self.ofs_embed_dim is not None,
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"CogVideoX variants with {bad} (CogVideoX 1.5) are not supported; supported: the 1.0 "
                             "models (2B sin-cos, 5B RoPE, 5B-I2V RoPE + learned positions)")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("use_learned_positional_embeddings needs use_rotary_positional_embeddings "
                             "(as diffusers: learned positions exist only beside RoPE)")
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(f"activation_fn {self.activation_fn!r} / timestep_activation_fn "
                             f"{self.timestep_activation_fn!r}: only 'gelu-approximate' / 'silu' are supported")
        if self.attention_head_dim % 16 and self.use_rotary_positional_embeddings:
            # 3D RoPE splits the head into t: Dh/4, h: 3Dh/8, w: 3Dh/8 channels, each in rotated pairs
            raise ValueError(f"attention_head_dim {self.attention_head_dim} must be a multiple of 16 for 3D RoPE")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy {self.remat_policy!r}; choose from {sorted(REMAT_POLICIES)}")
