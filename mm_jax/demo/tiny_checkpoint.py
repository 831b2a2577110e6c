"""Tiny random checkpoints in our own format, built offline with no torch: a CogVideoX backbone
(tokenizer, T5, DiT, VAE, scheduler; text-to-video, image-to-video or ConsisID) and a Magic Mirror
adapter folder (CLIP tower + adapter).

The sizes are the smallest that still exercise every code path (RoPE DiT with 2 blocks, a 4-level
VAE with 8x spatial / 4x temporal compression, a 2-layer T5). Used by the demo, the notebook's
tiny mode and the tests."""
from __future__ import annotations

import json
from pathlib import Path

import jax
from flax import nnx

SCHEDULER = {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
             "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing"}
CORPUS = ["a man is walking on the beach at sunset", "a woman plays the guitar in a small room",
          "a person rides a bicycle through the city at night", "a child laughs while eating ice cream",
          "a boy and a girl are smiling at the camera", "close up of a face, soft light"] * 30


def build_tokenizer(folder: Path, vocab_size: int = 64):
    """A SentencePiece T5 tokenizer trained on a few sentences, saved to ``folder``."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    spm_dir = folder.parent / f"_{folder.name}_spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    (spm_dir / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(spm_dir / "corpus.txt"), model_prefix=str(spm_dir / "spiece"),
                                   vocab_size=vocab_size, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    tok = T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
    tok.save_pretrained(folder)
    return tok


# ConsisID's face modules at tiny sizes (LFE_output_dim = int(inner_dim * 2 / 3) = 21 for the DiT's width 32)
TINY_FACE_MODULES = dict(cross_attn_interval=2, cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_depth=10,
                         LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=5, LFE_num_querie=4, LFE_output_dim=21,
                         LFE_ff_mult=2, LFE_num_scale=5)


def build_tiny_checkpoint(folder: Path, seed: int = 0, image_to_video: bool = False) -> Path:
    """Write a tiny random backbone checkpoint folder (the layout the converter produces).
    ``image_to_video``: a CogVideoX-5B-I2V stand-in instead: the DiT takes 2 x the VAE's latent
    channels (noise ++ image latents) and adds a random learned positional table on top of RoPE,
    covering 9 frames of 64 x 64 (its only size)."""
    from mm_jax.models.dit import CogVideoXTransformer3D
    from mm_jax.models.dit_config import DiTConfig

    return _build(folder, seed, image_to_video, "transformer",
                  lambda fields, rngs: CogVideoXTransformer3D(DiTConfig(**fields), rngs=rngs))


def build_tiny_consisid_checkpoint(folder: Path, id_dim: int, vit_dim: int, seed: int = 0) -> Path:
    """Write a tiny random ConsisID checkpoint folder (what the converter writes from a
    ``ConsisIDPipeline``): the image-to-video stand-in's DiT with ConsisID's face modules
    (component ``consisid_transformer``) taking ``id_cond`` of width ``id_dim`` and EVA hidden
    states of width ``vit_dim`` (a face encoder folder's sizes)."""
    from mm_jax.models.consisid import ConsisIDConfig, ConsisIDTransformer3D

    def make(fields, rngs):
        cfg = ConsisIDConfig(**fields, **TINY_FACE_MODULES, LFE_id_dim=id_dim, LFE_vit_dim=vit_dim)
        return ConsisIDTransformer3D(cfg, rngs=rngs)

    return _build(folder, seed, True, "consisid_transformer", make)


def _build(folder: Path, seed: int, image_to_video: bool, dit_name: str, make_dit) -> Path:
    """The tokenizer, T5, VAE and scheduler, and the DiT ``make_dit(fields, rngs)`` saved as ``dit_name``."""
    from mm_jax import checkpoint
    from mm_jax.models.t5 import T5Config, T5Encoder
    from mm_jax.models.vae import AutoencoderKLCogVideoX, VAEConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder / "tokenizer")
    rngs = nnx.Rngs(seed)
    t5 = T5Encoder(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2), rngs=rngs)
    dit = make_dit(dict(num_attention_heads=2, attention_head_dim=16, in_channels=8 if image_to_video else 4,
                        out_channels=4, num_layers=2, text_embed_dim=32, time_embed_dim=16, sample_width=8,
                        sample_height=8, sample_frames=9, use_learned_positional_embeddings=image_to_video), rngs)
    if image_to_video:  # the table starts as sin-cos with zero text rows: random, so the test sees every row
        table = dit.patch_embed.pos_embedding
        table.value = 0.1 * jax.random.normal(jax.random.key(seed + 3), table.value.shape, table.value.dtype)
    vae = AutoencoderKLCogVideoX(VAEConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                           norm_num_groups=4, sample_height=64, sample_width=64), rngs=rngs)
    for name, module in (("text_encoder", t5), (dit_name, dit), ("vae", vae)):
        checkpoint.save_module(folder, name, module)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    checkpoint.write_index(folder, ["text_encoder", dit_name, "vae", "tokenizer", "scheduler"])
    return folder


def build_tiny_adapter(folder: Path, backbone: Path, seed: int = 0) -> Path:
    """Write a tiny adapter folder for ``backbone``: a random CLIP tower (``image_encoder``) and a
    freshly initialized adapter (CAN copied from the DiT's text expert, residuals and Linear_id at
    zero), exactly what training starts from."""
    from mm_jax import checkpoint
    from mm_jax.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
    from mm_jax.models.id_adapter import AdapterConfig, MagicMirrorAdapter

    folder = Path(folder)
    rngs = nnx.Rngs(seed)
    clip = CLIPVisionTower(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=224, patch_size=14), rngs=rngs)
    dit = checkpoint.load_component(backbone, "transformer")
    cfg = AdapterConfig.for_dit(dit.cfg, clip_width=32, width=32, depth=1, heads=2, head_dim=16, num_face_tokens=4,
                                num_id_tokens=2, id_mlp_hidden=32)
    adapter = MagicMirrorAdapter(cfg, rngs=rngs)
    adapter.init_from_dit(dit)
    checkpoint.save_module(folder, "image_encoder", clip)
    checkpoint.save_module(folder, "adapter", adapter)
    checkpoint.write_index(folder, ["image_encoder", "adapter"])
    return folder
