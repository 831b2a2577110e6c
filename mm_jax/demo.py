"""A self-contained demo: build a tiny random CogVideoX checkpoint (no downloads, no torch) and
sample a short video from it through the real pipeline.

    python -m mm_jax.demo --out demo.mp4 [--workdir runs/demo] [--steps 4]

The weights are random, so the video is noise-like; the point is that every stage (tokenizer,
T5, compiled denoising loop, VAE decode, video writing) runs on a fresh machine in seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from flax import nnx

SCHEDULER = {"_class_name": "CogVideoXDDIMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
             "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
             "snr_shift_scale": 1.0, "steps_offset": 0, "timestep_spacing": "trailing"}
CORPUS = ["a man is walking on the beach at sunset", "a woman plays the guitar in a small room",
          "a person rides a bicycle through the city at night", "a child laughs while eating ice cream"] * 30


def build_tiny_checkpoint(folder: Path) -> Path:
    import sentencepiece as spm
    from transformers import T5Tokenizer

    from mm_jax import checkpoint
    from mm_jax.models.dit import CogVideoXTransformer3D, DiTConfig
    from mm_jax.models.t5 import T5Config, T5Encoder
    from mm_jax.models.vae import AutoencoderKLCogVideoX, VAEConfig

    folder.mkdir(parents=True, exist_ok=True)
    spm_dir = folder / "_spm"
    spm_dir.mkdir(exist_ok=True)
    (spm_dir / "corpus.txt").write_text("\n".join(CORPUS))
    spm.SentencePieceTrainer.train(input=str(spm_dir / "corpus.txt"), model_prefix=str(spm_dir / "spiece"),
                                   vocab_size=48, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   minloglevel=2)
    tok = T5Tokenizer.from_pretrained(str(spm_dir), extra_ids=0)
    tok.save_pretrained(folder / "tokenizer")
    rngs = nnx.Rngs(0)
    t5 = T5Encoder(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2), rngs=rngs)
    dit = CogVideoXTransformer3D(DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
                                           num_layers=2, text_embed_dim=32, time_embed_dim=16, sample_width=8,
                                           sample_height=8, sample_frames=9), rngs=rngs)
    vae = AutoencoderKLCogVideoX(VAEConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
                                           norm_num_groups=4, sample_height=64, sample_width=64), rngs=rngs)
    for name, module in (("text_encoder", t5), ("transformer", dit), ("vae", vae)):
        checkpoint.save_module(folder, name, module)
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER))
    checkpoint.write_index(folder, ["text_encoder", "transformer", "vae", "tokenizer", "scheduler"])
    return folder


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mm_jax.demo", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", default="demo.mp4")
    ap.add_argument("--workdir", default="runs/demo", help="where the tiny checkpoint is written")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args(argv)
    from mm_jax import sample

    ckpt = build_tiny_checkpoint(Path(args.workdir) / "tiny_checkpoint")
    return sample.main(["--checkpoint", str(ckpt), "--prompt", "a man is walking on the beach at sunset",
                        "--frames", "9", "--height", "64", "--width", "64", "--steps", str(args.steps),
                        "--out", args.out])


if __name__ == "__main__":
    sys.exit(main())
