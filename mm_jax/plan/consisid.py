"""ConsisID's sampler phases (the released ConsisID on CogVideoX-5B-I2V), beside ``plan/i2v.py``:

    text_encoder  as text-to-video                                                 once per video
    vae_encode    as image-to-video: the face crop as the first frame              once per video
    face          the EVA02-CLIP-L-14-336 tower on one 336 x 336 grey face crop,    once per video
                  id_cond = [ArcFace 512 ++ the L2-normalised EVA vector], then
                  the transformer's Local Facial Extractor: the face tokens (1, 32, 2048)
                  (the sampler runs these as two programs, ``consisid_faces.FaceEncoder.embed``
                  and ``consisid_pipeline.face_tokens_fn`` with the DiT resident; here one, with
                  the EVA tower and the LFE's own weights as arguments)
    denoise       ``denoising.denoise_step_fn(kind, cfg, consisid_pipeline.model_fn)``  ``steps`` per video
                  (the sampler's step): the I2V DiT on noise ++ image latents with the precomputed face
                  tokens (batch 1, shared by the CFG pair) in the 21 PerceiverCrossAttentions
    vae_decode    as text-to-video                                                 once per video

Host side, not planned: the face detection and parsing before the EVA tower (RetinaFace-R50 and
BiSeNet, 27.3 M and 13.3 M parameters, once per reference photo at the photo's own size, so no
fixed shape to compile) and insightface's antelopev2 (onnxruntime, not JAX).

``--model consisid`` plans ``real_models()``: the transformer preset
``mm_jax/presets/consisid_transformer.json`` (the release's config), the 5B's VAE, T5 and
scheduler, the EVA tower's release config.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mm_jax.plan.phases import Models, Phase, SampleSettings

FACE_COMPONENT = "consisid_transformer"
ARCFACE_DIM = 512  # antelopev2's glintr100 embedding: id_cond = [this ++ the EVA vector]


def real_models() -> Models:
    """The released ConsisID: its transformer preset, the 5B's VAE, T5 and scheduler, and EVA02-CLIP-L-336
    as the image encoder (``EVAVisionConfig``'s defaults are the release's)."""
    from mm_jax import components, presets
    from mm_jax.models.eva_clip import EVAVisionConfig

    dit = components.get(FACE_COMPONENT).config_from_dict(presets.load("consisid_transformer"))
    return dataclasses.replace(Models.real(), transformer=dit, image_encoder=EVAVisionConfig(),
                               source="mm_jax.presets (ConsisID on CogVideoX-5B-I2V, T5-XXL, EVA02-CLIP-L-336)")


def is_consisid(models: Models) -> bool:
    from mm_jax.models.consisid import ConsisIDConfig

    return isinstance(models.transformer, ConsisIDConfig)


def face_tokens(eva, lfe, pixels, arcface):
    """EVA tower + Local Facial Extractor: pixels (1, S, S, 3) (the preprocessed grey crop) and the
    ArcFace embedding (1, 512) -> the face tokens (1, LFE_num_querie, LFE_output_dim)."""
    emb, hidden = eva(pixels)
    emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)  # torch F.normalize
    id_cond = jnp.concatenate([arcface.astype(emb.dtype), emb], axis=-1)
    return lfe(id_cond, hidden)


@functools.lru_cache(maxsize=None)
def face_fn():
    """The compiled ``face_tokens`` (the ``face`` phase)."""
    return jax.jit(face_tokens)


def sample_phases(models: Models, s: SampleSettings, platform: str, kind: str | None = None) -> list[Phase]:
    """text_encoder, vae_encode, face, denoise (x steps), vae_decode."""
    from mm_jax import checkpoint, consisid_pipeline, denoising
    from mm_jax.plan import i2v
    from mm_jax.plan.aot import replicated

    p = i2v.parts(models, s, platform, kind, component=FACE_COMPONENT, what="ConsisID")
    cfg = p.dit_cfg
    eva_cfg = models.image_encoder
    size = eva_cfg.image_size
    face_shape = (1, cfg.LFE_num_querie, cfg.LFE_output_dim)
    if cfg.LFE_id_dim != ARCFACE_DIM + eva_cfg.embed_dim:
        raise ValueError(f"LFE_id_dim {cfg.LFE_id_dim} must be {ARCFACE_DIM} (ArcFace) + the EVA tower's embed_dim "
                         f"{eva_cfg.embed_dim}")

    def face(mesh):
        dit = checkpoint.abstract_model(FACE_COMPONENT, cfg, mesh)
        return face_fn(), (checkpoint.abstract_model("eva_clip", eva_cfg, mesh), dit.local_facial_extractor,
                           replicated(mesh, (1, size, size, 3), jnp.float32),
                           replicated(mesh, (1, ARCFACE_DIM), jnp.float32))

    def denoise(mesh):
        extras = (p.image_latents(mesh), replicated(mesh, face_shape, jnp.dtype(s.dtype)))
        return denoising.denoise_step_fn(s.scheduler, p.cfg_on, consisid_pipeline.model_fn), p.step_args(mesh, extras)

    cross = len(cfg.cross_attn_layers)
    return [p.text_phase, p.vae_encode,
            Phase("face", face, 1, f"EVA02-CLIP tower ({eva_cfg.layers} layers, {size} px, {eva_cfg.dtype}) + "
                                   f"Local Facial Extractor ({s.dtype}): face tokens {face_shape}"),
            Phase("denoise", denoise, s.steps, p.denoise_what(f"ConsisID DiT + {cross} face cross-attentions, "
                                                              "face tokens batch 1")),
            p.vae_decode]
