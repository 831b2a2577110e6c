"""Tiny models and settings for the planner's tests (tests/test_plan_*.py, tests/test_quantize.py).

Tiny sizes are chosen so every parameter fills whole TPU tiles ((8, 128) for 32-bit types, whole
128-lane rows on the 2x2 mesh too): XLA:TPU stores an array padded to its tiles, and with whole
tiles the compiler's argument bytes must equal the bytes of the parameters as sharded, exactly.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from flax import nnx

from mm_jax import plan as planner
from mm_jax.demo.tiny_checkpoint import SCHEDULER
from mm_jax.models.clip_vision import CLIPVisionConfig
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.t5 import T5Config
from mm_jax.models.vae import VAEConfig
from mm_jax.training.models import adapter_config

D, HEADS, DH, T_EMB, T_TEXT = 256, 2, 128, 128, 256   # DiT width = HEADS * DH; T_TEXT = the T5 width
PATCH, C_LAT = 2, 16


def tiny_models(layers: int = 2) -> planner.Models:
    dit = DiTConfig(num_attention_heads=HEADS, attention_head_dim=DH, in_channels=C_LAT, out_channels=C_LAT,
                    num_layers=layers, patch_size=PATCH, text_embed_dim=T_TEXT, time_embed_dim=T_EMB,
                    sample_width=8, sample_height=8, sample_frames=9)
    t5 = T5Config(vocab_size=256, d_model=T_TEXT, d_kv=1, num_heads=256, d_ff=512, num_layers=2)
    vae = VAEConfig(latent_channels=C_LAT, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
                    sample_height=64, sample_width=64)
    clip = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    adapter = adapter_config(dit, 32, dict(width=32, depth=1, heads=2, head_dim=16, num_face_tokens=4, num_id_tokens=2,
                                           id_mlp_hidden=32), "float32")
    return planner.Models(dit, vae, t5, clip, SCHEDULER, adapter, "tiny")


SAMPLE = planner.SampleSettings(frames=9, height=64, width=64, steps=4, max_sequence_length=16)


def plan_tiny(target, workload="sample", mesh=None, only=("denoise",), **settings):
    """The tiny models planned for ``target`` (only the denoising step by default), ``settings``
    replacing fields of ``SAMPLE`` or of the tiny training settings."""
    sample = dataclasses.replace(SAMPLE, **settings) if workload == "sample" else None
    train = (planner.TrainSettings(batch=2, frames=9, height=64, width=64, text_length=16, **settings)
             if workload != "sample" else None)
    return planner.plan(target, workload, mesh=mesh, models=tiny_models(), sample=sample, train=train, only=only)


def sharded_bytes(module) -> int:
    """Per-device bytes of a module's parameters as the mesh splits them (shape / shards x itemsize)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
