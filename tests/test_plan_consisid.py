"""The planner compiles ConsisID's sampler deviceless (``mm_jax/plan/consisid.py``): the I2V phases
plus ``face`` (EVA-CLIP + the Local Facial Extractor, once per video) and the denoising step with
the precomputed face tokens; ``--model consisid`` plans the release's transformer preset."""
from __future__ import annotations

import dataclasses
import math

import jax
import pytest
from flax import nnx

from mm_jax import plan as planner
from mm_jax.models.consisid import ConsisIDConfig
from mm_jax.models.eva_clip import EVAVisionConfig
from mm_jax.plan import __main__ as cli
from mm_jax.plan import targets
from tests.tiny_plan import SAMPLE, tiny_models

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")

EVA = EVAVisionConfig(image_size=28, patch_size=14, width=32, layers=6, head_width=16, mlp_hidden=64, embed_dim=32,
                      hidden_state_blocks=(1, 2, 3, 4, 5))


def tiny_consisid_models() -> planner.Models:
    m = tiny_models()
    fields = {f.name: getattr(m.transformer, f.name) for f in dataclasses.fields(m.transformer)}
    fields.update(in_channels=2 * m.transformer.out_channels, max_text_seq_length=SAMPLE.max_sequence_length,
                  use_learned_positional_embeddings=True, LFE_id_dim=512 + EVA.embed_dim, LFE_vit_dim=EVA.width,
                  LFE_depth=5, LFE_num_heads=2, LFE_dim_head=16, LFE_num_id_token=2, LFE_num_querie=4,
                  LFE_ff_mult=1, LFE_output_dim=int(m.transformer.inner_dim / 3 * 2), cross_attn_num_heads=2,
                  cross_attn_dim_head=64)
    return dataclasses.replace(m, transformer=ConsisIDConfig(**fields), image_encoder=EVA, adapter=None,
                               source="tiny consisid")


@pytest.mark.slow
def test_the_consisid_face_and_denoise_phases_compile_and_fit_a_tpu():
    sample = dataclasses.replace(SAMPLE, identity=False)
    names = [ph.name for ph in planner.phases_for("sample", tiny_consisid_models(), "tpu", sample)]
    assert names == ["text_encoder", "vae_encode", "face", "denoise", "vae_decode"]
    # text encoder, VAE encode and decode are the I2V programs (tests/test_plan_i2v.py compiles them)
    p = planner.plan("v5e-1", "sample", models=tiny_consisid_models(), sample=sample, only=("face", "denoise"))
    assert all(ph.compiled is not None for ph in p.phases), [ph.error for ph in p.phases]
    assert all(p.fits(ph) for ph in p.phases)
    face, denoise = p.phases
    assert face.runs == 1 and "face tokens (1, 4, 170)" in face.what
    assert denoise.runs == SAMPLE.steps and "ConsisID DiT + 1 face cross-attentions" in denoise.what
    assert "(32 input channels, learned positions True), CFG batch 2" in denoise.what
    # the step's arguments hold the face tokens (batch 1), the face phase's the EVA tower and the LFE
    assert face.compiled.flops > 0 and denoise.compiled.flops > 0


def test_consisid_plans_refuse_an_identity_adapter_and_uncovered_sizes():
    with pytest.raises(ValueError, match="ConsisID takes no identity adapter"):
        planner.plan("v5e-1", "sample", models=tiny_consisid_models(), sample=SAMPLE)
    with pytest.raises(ValueError, match="latent height x width 4 x 8: this transformer's learned positional table"):
        planner.plan("v5e-1", "sample", models=tiny_consisid_models(),
                     sample=dataclasses.replace(SAMPLE, identity=False, height=32))


def test_cli_model_consisid_plans_the_released_transformer(tmp_path, capsys):
    assert cli.main(["--model", "consisid", "--checkpoint", str(tmp_path), "--target", "v5e-1",
                     "--workload", "sample"]) == 2
    assert "--model consisid plans the real ConsisID" in capsys.readouterr().err
    from mm_jax import checkpoint
    from mm_jax.plan import consisid

    m = consisid.real_models()
    assert consisid.is_consisid(m) and m.transformer.in_channels == 32 and m.transformer.num_layers == 42
    dit = checkpoint.abstract_model("consisid_transformer", m.transformer)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(dit, nnx.Param)))
    # diffusers counts 6,162,495,040 parameters plus the persistent buffer pos_embedding (1, 17776, 3072),
    # which the JAX model holds as a parameter (the checkpoint's learned table)
    assert n == 6_162_495_040 + 17776 * 3072
    eva = checkpoint.abstract_model("eva_clip", m.image_encoder)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(eva, nnx.Param))) == 304_432_832
    assert cli._settings(cli.build_parser().parse_args(["--model", "consisid"]), "sample", None)[0].identity is False
