"""A tiny random diffusers ``CogVideoXPipeline`` (T5 + tokenizer, 2-block RoPE DiT, small VAE),
built offline: the tokenizer comes from a SentencePiece model trained on a few sentences."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import randomize_torch_params

CORPUS = [
    "a man is walking on the beach at sunset with a dog",
    "a woman plays the guitar in a small room full of plants",
    "a person rides a bicycle through a busy city street at night",
    "the boy and the girl are laughing while they eat ice cream",
    "close up of a face smiling, soft light, high quality video",
    "an old man reads a book by the window while it rains outside",
] * 20


def train_tokenizer(folder: Path, vocab_size: int = 64):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "spiece"), vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    return T5Tokenizer.from_pretrained(str(folder), extra_ids=0)


def make_pipeline(folder: Path, *, snr_shift_scale: float = 1.0, seed: int = 0, heads: int = 2):
    """Save a tiny pipeline to ``folder`` and return the diffusers object (``heads`` DiT heads of 16)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    tok = train_tokenizer(folder.parent / f"{folder.name}_spm")
    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2,
                                 feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, dropout_rate=0.0)).eval()
    dit = CogVideoXTransformer3DModel(num_attention_heads=heads, attention_head_dim=16, in_channels=4, out_channels=4,
                                      num_layers=2, text_embed_dim=32, time_embed_dim=16, sample_width=8,
                                      sample_height=8, sample_frames=9, max_text_seq_length=226,
                                      use_rotary_positional_embeddings=True).eval()
    vae = AutoencoderKLCogVideoX(in_channels=3, out_channels=3, latent_channels=4,
                                 down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
                                 block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                                 temporal_compression_ratio=4, sample_height=64, sample_width=64).eval()
    for i, m in enumerate((t5, dit, vae)):
        randomize_torch_params(m, seed + i, scale=0.1)
    sched = CogVideoXDDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                   set_alpha_to_one=True, timestep_spacing="trailing", snr_shift_scale=snr_shift_scale,
                                   clip_sample=False)
    pipe = CogVideoXPipeline(tokenizer=tok, text_encoder=t5, vae=vae, transformer=dit, scheduler=sched)
    pipe.save_pretrained(folder)
    return pipe
