"""Config presets load by ``file.py:preset`` and build the DiT they describe."""
import jax
import pytest

from mm_jax import config as mm_config
from mm_jax.checkpoint import abstract_model, param_shapes
from mm_jax.models.dit import DiTConfig


@pytest.mark.parametrize("preset,params", [("cogvideox_5b", 5_570_283_072), ("tiny", None), ("cogvideox_2b", None)])
def test_model_presets_build_the_dit(preset, params):
    cfg = mm_config.load(f"configs/model.py:{preset}")
    dit = DiTConfig.from_dict(cfg.transformer.to_dict())
    n = sum(int(jax.numpy.prod(jax.numpy.array(s))) for s, _ in param_shapes(abstract_model("transformer", dit)).values())
    if params:
        assert n == params
    assert n > 0


def test_config_override_sets_a_nested_field():
    cfg = mm_config.load("configs/model.py:tiny", ["transformer.num_layers=4", "--config.transformer.dtype=bfloat16"])
    assert cfg.transformer.num_layers == 4 and cfg.transformer.dtype == "bfloat16"
    with pytest.raises(KeyError, match="nope"):
        mm_config.load("configs/model.py:tiny", ["transformer.nope=1"])
