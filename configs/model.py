"""Model presets: ``configs/model.py:cogvideox_5b`` (default), ``:cogvideox_2b``, ``:tiny``.

``transformer`` holds the diffusers ``config.json`` fields of the DiT plus runtime choices
(dtype, param_dtype, remat_policy, attention_impl). ``tiny`` exercises the same code paths with
small widths (RoPE, 2 layers) for CPU tests and demos.
"""
import ml_collections

_5B = dict(num_attention_heads=48, attention_head_dim=64, in_channels=16, out_channels=16, num_layers=42,
           patch_size=2, text_embed_dim=4096, time_embed_dim=512, max_text_seq_length=226, sample_width=90,
           sample_height=60, sample_frames=49, use_rotary_positional_embeddings=True,
           spatial_interpolation_scale=1.875, temporal_interpolation_scale=1.0)

PRESETS = {
    "cogvideox_5b": dict(_5B),
    "cogvideox_2b": dict(_5B, num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
    "tiny": dict(_5B, num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32,
                 time_embed_dim=16, sample_width=12, sample_height=8, sample_frames=9, max_text_seq_length=16),
}


def get_config(preset=None):
    preset = preset or "cogvideox_5b"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = ml_collections.ConfigDict()
    cfg.transformer = ml_collections.ConfigDict(PRESETS[preset])
    accel = preset != "tiny"
    cfg.transformer.dtype = "bfloat16" if accel else "float32"
    cfg.transformer.param_dtype = "bfloat16" if accel else "float32"
    cfg.transformer.remat_policy = "none"
    cfg.transformer.attention_impl = ml_collections.config_dict.placeholder(str)
    return cfg
