"""A tiny random diffusers ``ConsisIDPipeline`` (T5 + tokenizer, a 4-block ConsisID DiT with
in_channels 2 x 4, RoPE + learned positions and its face modules, small VAE with the 5B's scaling
factor), built offline, and a random identity of the sizes it takes."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tests.conftest import randomize_torch_params
from tests.tiny_pipeline import train_tokenizer

# LFE_output_dim must be int(inner_dim * 2 / 3) = 21 for inner_dim 32 (diffusers' cross-attention width);
# the id and ViT widths are those of tests/tiny_consisid_faces' folder: 512 (antelopev2) + 24 (its EVA's
# embed_dim), its EVA width 32 and (42 / 14)^2 + 1 = 10 tokens
FACE = dict(is_train_face=True, cross_attn_interval=2, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=536,
            LFE_vit_dim=32, LFE_depth=10, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=5, LFE_num_querie=4,
            LFE_output_dim=21, LFE_ff_mult=2, LFE_num_scale=5, local_face_scale=1.0)
VIT_TOKENS = 10


def make_consisid_pipeline(folder: Path, *, seed: int = 0):
    """Save a tiny ConsisID pipeline to ``folder`` and return the diffusers object. Sizes: 64 x 64
    pixels, 8 x 8 x 4 latents, 9 frames (3 latent frames: the learned table's own size)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, ConsisIDPipeline, ConsisIDTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tok = train_tokenizer(folder.parent / f"{folder.name}_spm")
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, dropout_rate=0.0)).eval()
    dit = ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4,
                                     num_layers=4, text_embed_dim=32, time_embed_dim=16, sample_width=8,
                                     sample_height=8, sample_frames=9, max_text_seq_length=226,
                                     use_rotary_positional_embeddings=True, use_learned_positional_embeddings=True,
                                     **FACE).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4, sample_height=64, sample_width=64,
                                 scaling_factor=0.7).eval()
    for i, m in enumerate((t5, dit, vae)):
        randomize_torch_params(m, seed + i, scale=0.1)
    with torch.no_grad():  # the learned table is a buffer: random too, text rows included
        pe = dit.patch_embed.pos_embedding
        pe.copy_(0.1 * torch.randn(pe.shape, generator=torch.Generator().manual_seed(seed + 3)))
    sched = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   set_alpha_to_one=True, timestep_spacing="trailing", snr_shift_scale=1.0,
                                   clip_sample=False)
    pipe = ConsisIDPipeline(tokenizer=tok, text_encoder=t5, vae=vae, transformer=dit, scheduler=sched)
    pipe.save_pretrained(folder)
    return pipe


def random_identity(seed: int, size: int = 96) -> dict:
    """The three ``ConsisIDPipeline`` face arguments for the tiny transformer, as numpy under their
    diffusers names: a smooth uint8 face crop (size x size: resized to 64 x 64 by both pipelines),
    ``id_cond`` (1, 536) and ``id_vit_hidden`` (5, 1, 10, 32)."""
    rng = np.random.default_rng(seed)
    image = np.clip(128 + np.cumsum(rng.normal(0, 12, (size, size, 3)), axis=1), 0, 255).astype(np.uint8)
    return dict(image=image, id_cond=rng.standard_normal((1, FACE["LFE_id_dim"])).astype(np.float32),
                id_vit_hidden=rng.standard_normal((FACE["LFE_num_scale"], 1, VIT_TOKENS, FACE["LFE_vit_dim"]))
                .astype(np.float32))
