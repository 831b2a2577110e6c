"""The planner compiles the image-to-video sampler (``mm_jax.image_to_video``) deviceless: a model
whose transformer takes 2 x the VAE's latent channels gets the I2V phases, with the VAE encode of
the first frame and the DiT on noise ++ image latents."""
from __future__ import annotations

import dataclasses

import pytest

from mm_jax import plan as planner
from mm_jax.plan import __main__ as cli
from mm_jax.plan import targets
from tests.tiny_plan import C_LAT, SAMPLE, tiny_models

pytestmark = pytest.mark.skipif(not targets.libtpu_installed(), reason="libtpu missing: the test extra installs it")


def tiny_i2v_models() -> planner.Models:
    m = tiny_models()
    dit = dataclasses.replace(m.transformer, in_channels=2 * C_LAT, max_text_seq_length=SAMPLE.max_sequence_length,
                              use_learned_positional_embeddings=True)
    return dataclasses.replace(m, transformer=dit, adapter=None, source="tiny i2v")


@pytest.mark.slow
def test_the_i2v_sampler_phases_compile_for_a_tpu():
    p = planner.plan("v5e-1", "sample", models=tiny_i2v_models(), sample=dataclasses.replace(SAMPLE, identity=False))
    assert [ph.name for ph in p.phases] == ["text_encoder", "vae_encode", "denoise", "vae_decode"]
    assert all(ph.compiled is not None for ph in p.phases), [ph.error for ph in p.phases]
    assert p.phases[2].runs == SAMPLE.steps and "I2V DiT (32 input channels, learned positions True)" in p.phases[2].what


def test_i2v_plans_refuse_an_identity_and_sizes_the_learned_table_does_not_cover():
    with pytest.raises(ValueError, match="image-to-video takes no identity adapter"):
        planner.plan("v5e-1", "sample", models=tiny_i2v_models(), sample=SAMPLE)
    with pytest.raises(ValueError, match="latent height x width 4 x 8: this transformer's learned positional table"):
        planner.plan("v5e-1", "sample", models=tiny_i2v_models(),
                     sample=dataclasses.replace(SAMPLE, identity=False, height=32))


def test_cli_model_i2v_plans_the_real_i2v_preset_and_refuses_a_checkpoint(tmp_path, capsys):
    assert cli.main(["--model", "i2v", "--checkpoint", str(tmp_path), "--target", "v5e-1", "--workload", "sample"]) == 2
    assert "--model i2v plans the real CogVideoX-5B-I2V" in capsys.readouterr().err
    from mm_jax.plan import i2v

    m = i2v.real_models()
    assert i2v.is_i2v(m) and m.transformer.in_channels == 32 and m.transformer.use_learned_positional_embeddings
