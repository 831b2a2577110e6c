"""The Flax ConsisID transformer (mm_jax.models.consisid) equals diffusers' ConsisIDTransformer3DModel
after conversion by our tool: the whole transformer on the CFG batch with one shared face, the Local
Facial Extractor alone, and the converter's refusal of a checkpoint with a missing tensor."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flax import nnx

from mm_jax import checkpoint
from tests.conftest import max_rel_err, randomize_torch_params
from tests.test_dit import _torch_rope
from tools.convert_weights.from_torch import convert
from tools.convert_weights.safetensors_io import CheckpointError

# 4 blocks (cross-attentions after blocks 0 and 2); LFE: 5 scales of 2 layers, as the release's 10/5;
# LFE_output_dim must be int(inner_dim * 2 / 3) = 21 for inner_dim 32
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, num_layers=4,
            text_embed_dim=24, time_embed_dim=16, sample_width=12, sample_height=8, sample_frames=9,
            max_text_seq_length=7, patch_size=2, is_train_face=True, cross_attn_interval=2,
            cross_attn_dim_head=8, cross_attn_num_heads=2, LFE_id_dim=12, LFE_vit_dim=16, LFE_depth=10,
            LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=5, LFE_num_querie=4, LFE_output_dim=21,
            LFE_ff_mult=2, LFE_num_scale=5, local_face_scale=0.7)
VIT_TOKENS = 9


def _torch_model(rope: bool, seed: int = 0):
    from diffusers import ConsisIDTransformer3DModel

    torch.manual_seed(seed)
    m = ConsisIDTransformer3DModel(**TINY, use_rotary_positional_embeddings=rope).eval()
    randomize_torch_params(m, seed)
    return m


def _face(batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    id_cond = torch.randn(batch, TINY["LFE_id_dim"], generator=g)
    vit = torch.randn(TINY["LFE_num_scale"], batch, VIT_TOKENS, TINY["LFE_vit_dim"], generator=g)
    return id_cond, vit


@pytest.fixture(scope="module", params=["rope", "sincos"])
def converted(request, tmp_path_factory):
    """The rope model goes through a ConsisIDPipeline folder (its transformer/ is recognised by
    ``_class_name``), the sin-cos one through a lone component folder."""
    rope = request.param == "rope"
    m = _torch_model(rope)
    src = tmp_path_factory.mktemp("src")
    if rope:
        (src / "model_index.json").write_text(json.dumps(
            {"_class_name": "ConsisIDPipeline", "transformer": ["diffusers", "ConsisIDTransformer3DModel"]}))
        m.save_pretrained(src / "transformer", max_shard_size="100KB")
    else:
        src = src / "transformer"
        m.save_pretrained(src)
    dst = convert(src, tmp_path_factory.mktemp("dst") / "ckpt")
    assert checkpoint.read_index(dst) == ["consisid_transformer"]
    return rope, m, dst, checkpoint.load_component(dst, "consisid_transformer")


def test_consisid_transformer_matches_diffusers_on_a_cfg_batch_sharing_one_face(converted):
    """Video batch 2 (the CFG pair) with id_cond / id_vit_hidden of batch 1, as ConsisIDPipeline
    passes them; 1e-5, with the blocks scanned (default) and unrolled. The face visibly changes the
    reference output, so the face path is tested."""
    rope, m, dst, ours = converted
    frames, h, w = 3, 8, 12
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, frames, 4, h, w, generator=g)
    text = torch.randn(2, 7, 24, generator=g)
    t = torch.tensor([999, 17])
    rot = _torch_rope(m, frames, h, w) if rope else None

    def ref(id_cond, vit):
        with torch.no_grad():
            return m(hidden_states=x, encoder_hidden_states=text, timestep=t, image_rotary_emb=rot,
                     id_cond=id_cond, id_vit_hidden=list(vit), return_dict=False)[0].permute(0, 1, 3, 4, 2).numpy()

    id_cond, vit = _face(1, 2)
    want = ref(id_cond, vit)
    args = (x.permute(0, 1, 3, 4, 2).numpy(), text.numpy(), t.numpy(), id_cond.numpy(), vit.numpy())
    unrolled = checkpoint.load_component(dst, "consisid_transformer", scan_layers=False)
    for model in (ours, unrolled):
        err = max_rel_err(np.asarray(model(*args)), want)
        assert err <= 1e-5, (model.cfg.scan_layers, err)
    assert max_rel_err(ref(*_face(1, 3)), want) > 1e-3  # another face moves the output 100x the tolerance


def test_local_facial_extractor_matches_diffusers(converted):
    """The LFE alone, on a face batch of 2: (2, 12) and 5 x (2, 9, 16) -> (2, 4, 21); 1e-5."""
    _, m, _, ours = converted
    id_cond, vit = _face(2, 4)
    with torch.no_grad():
        want = m.local_facial_extractor(id_cond, list(vit)).numpy()
    got = np.asarray(ours.face_tokens(id_cond.numpy(), vit.numpy()))
    assert got.shape == (2, TINY["LFE_num_querie"], TINY["LFE_output_dim"])
    err = max_rel_err(got, want)
    assert err <= 1e-5, err


def test_converter_names_a_missing_face_tensor(tmp_path):
    from safetensors.torch import save_file

    m = _torch_model(rope=True)
    m.save_pretrained(tmp_path / "transformer")
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if k != "perceiver_cross_attention.1.to_kv.weight"}
    for f in (tmp_path / "transformer").glob("*.safetensors"):
        f.unlink()
    save_file(sd, str(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing key perceiver_cross_attention\.1\.to_kv\.weight"):
        convert(tmp_path / "transformer", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_refuses_a_face_width_the_cross_attention_cannot_take():
    from mm_jax.models.consisid import ConsisIDConfig

    with pytest.raises(ValueError, match="LFE_output_dim 2048 must equal int"):
        ConsisIDConfig.from_dict(dict(TINY, LFE_output_dim=2048))
    with pytest.raises(ValueError, match="num_layers 3 must be a multiple of cross_attn_interval 2"):
        ConsisIDConfig.from_dict(dict(TINY, num_layers=3))


def test_release_sized_model_has_the_parameter_count_of_diffusers():
    """The released shapes (5B-I2V backbone: 48 heads, 42 blocks, 32 input channels; face modules at
    their defaults): 6,162,495,040 parameters in both, counted abstractly (torch on "meta")."""
    import jax
    from diffusers import ConsisIDTransformer3DModel

    from mm_jax.models.consisid import ConsisIDConfig, ConsisIDTransformer3D

    release = dict(num_attention_heads=48, attention_head_dim=64, in_channels=32, num_layers=42, is_train_face=True,
                   use_rotary_positional_embeddings=True)
    with torch.device("meta"):
        want = sum(p.numel() for p in ConsisIDTransformer3DModel(**release).parameters())
    abstract = nnx.eval_shape(lambda: ConsisIDTransformer3D(ConsisIDConfig.from_dict(release), rngs=nnx.Rngs(0)))
    got = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert got == want == 6_162_495_040
