"""Model presets: ``configs/model.py:cogvideox_5b`` (default), ``:cogvideox_2b``, ``:tiny``.

``transformer`` holds the diffusers ``config.json`` fields of the DiT plus runtime choices
(dtype, param_dtype, remat_policy, attention_impl). The 5B's fields are its published config
(``mm_jax/presets/cogvideox5b_transformer.json``, their one home); the 2B and ``tiny`` say only
how they differ from it. ``tiny`` exercises the same code paths with small widths (RoPE, 2 layers)
for CPU tests and demos.
"""
import ml_collections

from mm_jax import presets

_5B = {k: v for k, v in presets.load("cogvideox5b_transformer").items() if not k.startswith("_")}

PRESETS = {
    "cogvideox_5b": {},
    "cogvideox_2b": dict(num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False),
    "tiny": dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, text_embed_dim=32,
                 time_embed_dim=16, sample_width=12, sample_height=8, sample_frames=9, max_text_seq_length=16),
}


def get_config(preset=None):
    preset = preset or "cogvideox_5b"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = ml_collections.ConfigDict()
    cfg.transformer = ml_collections.ConfigDict(dict(_5B, **PRESETS[preset]))
    accel = preset != "tiny"
    cfg.transformer.dtype = "bfloat16" if accel else "float32"
    cfg.transformer.param_dtype = "bfloat16" if accel else "float32"
    cfg.transformer.remat_policy = "none"
    cfg.transformer.attention_impl = ml_collections.config_dict.placeholder(str)
    return cfg
