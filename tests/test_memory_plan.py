"""mm_jax.memory_plan: parameter arithmetic, the DiT activation shapes, fits/doesn't fit, and the
text-encoder offload switch it recommends."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mm_jax import memory_plan as mp
from mm_jax.models import layers, splash
from tests.conftest import MANIFESTS


@pytest.fixture(scope="module")
def configs():
    return mp.real_configs()


@pytest.fixture(scope="module")
def leaves(configs):
    return {k: mp.param_leaves(k, c) for k, c in configs.items()}


def test_param_bytes_equal_the_sum_over_eval_shape_leaves_of_the_real_configs(configs, leaves):
    from mm_jax import components

    manifest = json.loads((MANIFESTS / "cogvideox5b_transformer.json").read_text())
    for name, cfg in configs.items():
        spec = components.get(name)
        abstract = nnx.eval_shape(lambda: spec.build(cfg, nnx.Rngs(0)))
        arrays = jax.tree.leaves(nnx.state(abstract, nnx.Param))
        expected = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in arrays)
        assert mp.param_bytes(leaves[name]) == expected, name
    n_dit = sum(math.prod(s) for s, _, _ in leaves["transformer"])
    assert n_dit == sum(math.prod(shape) for shape, _ in manifest.values())  # 5,570,283,072: the real 5B DiT


def test_per_device_params_shrink_with_fsdp_and_never_below_an_even_split(leaves):
    total = mp.param_bytes(leaves["transformer"])
    per_dev = mp.param_bytes(leaves["transformer"], {"data": 1, "fsdp": 8, "tensor": 1})
    assert total / 8 <= per_dev < total


def test_dit_sequence_and_tensor_sizes_match_what_the_tiny_dit_forms():
    """The plan's token count and padded kernel shapes against shapes captured under eval_shape."""
    from mm_jax.models.dit import CogVideoXTransformer3D, DiTConfig

    cfg = DiTConfig(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=1,
                    text_embed_dim=32, time_embed_dim=16, sample_width=8, sample_height=8, sample_frames=9,
                    attention_impl="capture")
    seen = []
    layers.ATTENTION_IMPLS["capture"] = lambda q, k, v, m, s: (seen.append(q.shape), q)[1]
    try:
        dit = CogVideoXTransformer3D(cfg, rngs=nnx.Rngs(0))
        w = mp.Workload(frames=9, height=48, width=80, text_tokens=10, with_face=False)
        lat = jax.ShapeDtypeStruct((2, 3, 6, 10, 4), jnp.float32)
        jax.eval_shape(lambda x, c, t: dit(x, c, t), lat, jax.ShapeDtypeStruct((2, 10, 32), jnp.float32),
                       jax.ShapeDtypeStruct((2,), jnp.float32))
    finally:
        del layers.ATTENTION_IMPLS["capture"]
    tokens = mp.dit_tokens(cfg, w, face_tokens=0)
    assert seen[0] == (2, tokens["total"], 2, 16) and tokens["total"] == 10 + 3 * 3 * 5
    q = jax.ShapeDtypeStruct(seen[0], jnp.bfloat16)
    (qp, *_), _ = jax.eval_shape(lambda a: splash.pad_inputs(a, a, a, None, None), q)
    _, _, sp, _, dhp = splash.padded_sizes(tokens["total"], tokens["total"], 16)
    assert qp.shape == (2, 2, sp, dhp)
    act = mp.dit_activations(cfg, w, 0, {"data": 1, "fsdp": 1, "tensor": 1})
    u, p = math.prod(seen[0]) * 2, math.prod(qp.shape) * 2
    assert act["kernel"] == u + 4 * p and act["ff"] == 2 * u + 2 * 4 * u


def test_a_phase_fits_only_within_the_usable_hbm():
    rt = mp.Runtime("toy", 1, 2.0)
    usable = int((2.0 - mp.RESERVED_GIB) * mp.GIB)
    assert mp.fits(mp.Phase("p", usable - 10, 10), rt)
    assert not mp.fits(mp.Phase("p", usable, 1), rt)


def test_real_plan_fits_every_runtime_and_offload_moves_t5_to_the_host(configs, leaves):
    for rt in mp.RUNTIMES.values():
        phases = mp.plan(rt, configs=configs, leaves=leaves)
        assert [p.name.split(" ")[0] for p in phases] == ["identity", "text", "denoising", "decoding"]
        assert all(mp.fits(p, rt) for p in phases), mp.format_plan(rt, phases)
    off = mp.plan(mp.RUNTIMES["v5e-1"], configs=configs, leaves=leaves, offload_text_encoder=True)[1]
    assert off.peak == 0 and off.host >= mp.param_bytes(leaves["text_encoder"])
    with pytest.raises(ValueError, match="devices"):
        mp.plan(mp.RUNTIMES["v2-8"], mesh_shape={"fsdp": 4}, configs=configs, leaves=leaves)


def test_cli_help_and_printout(capsys):
    with pytest.raises(SystemExit) as e:
        mp.main(["--help"])
    assert e.value.code == 0
    assert mp.main(["--runtime", "v5e-1", "--markdown"]) == 0
    assert "| v5e-1" in capsys.readouterr().out


def test_text_encoder_on_host_gives_the_same_embeddings(tmp_path):
    """On this CPU-only machine both paths use the CPU device: this checks the switch's plumbing."""
    from mm_jax import checkpoint, pipeline
    from mm_jax.models.t5 import T5Config, T5Encoder
    from mm_jax.demo.tiny_checkpoint import build_tokenizer

    tok = build_tokenizer(tmp_path / "tokenizer")
    t5 = T5Encoder(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=1),
                   rngs=nnx.Rngs(0))
    checkpoint.save_module(tmp_path, "text_encoder", t5)
    prompts = ["", "a man is walking on the beach"]
    dev = pipeline.prompt_embeddings(tmp_path, prompts, max_length=32)
    host = pipeline.prompt_embeddings(tmp_path, prompts, max_length=32, on_host=True)
    assert dev.shape == (2, 32, 32)
    np.testing.assert_array_equal(dev, host)
