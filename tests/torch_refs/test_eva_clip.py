"""The JAX EVA02-CLIP vision tower and its preprocessing equal ``consisid_eva_clip``'s tower and
torchvision's resize, as ConsisID (diffusers ``consisid_utils``) runs them."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import max_rel_err

# The release's vision_cfg (consisid_eva_clip model_configs/EVA02-CLIP-L-14-336.json) and a tiny one: 21 layers
# so that the hard-coded hidden-state blocks 4..20 all exist; head_width 16 -> 2 heads, RoPE on 16 channels.
RELEASE = dict(image_size=336, layers=24, width=1024, head_width=64, mlp_ratio=2.6667, patch_size=14,
               eva_model_name="eva-clip-l-14-336", drop_path_rate=0, xattn=True, fusedLN=True, rope=True,
               pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True)
TINY = dict(RELEASE, image_size=42, layers=21, width=32, head_width=16)
TINY_EMBED = 24


def _torch_tower(vision_cfg: dict, embed_dim: int, seed: int = 0):
    import torch
    from consisid_eva_clip.model import _build_vision_tower

    torch.manual_seed(seed)
    tower = _build_vision_tower(embed_dim, vision_cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every parameter random (zero biases and unit norms would hide a swapped tensor)
        for name, p in tower.named_parameters():
            noise = 0.2 * torch.randn(p.shape, generator=g)
            p.copy_(1.0 + noise if name.endswith(("norm1.weight", "norm2.weight", "ln.weight", "norm.weight"))
                    else noise)
    return tower


@pytest.fixture(scope="module")
def tiny_pair():
    import torch

    from tools.convert_weights import eva_clip as ec

    tower = _torch_tower(TINY, TINY_EMBED)
    cfg, params = ec.convert_state_dict({k: v.numpy() for k, v in tower.state_dict().items()})
    x = torch.randn(2, 3, 42, 42, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        feats, hidden = tower(x, return_all_features=False, return_hidden=True, shuffle=False)
    return cfg, params, x.permute(0, 2, 3, 1).numpy(), feats.numpy(), torch.stack(hidden).numpy()


@pytest.mark.slow  # ~40 s on 2 busy cores: 21 layers scanned and unrolled
def test_tiny_tower_features_and_five_hidden_states_match_consisid_eva_clip(tiny_pair):
    import dataclasses

    from tools.convert_weights import eva_clip as ec

    cfg, params, pixels, want_feats, want_hidden = tiny_pair
    assert (cfg.layers, cfg.heads, cfg.mlp_hidden, cfg.embed_dim) == (21, 2, 85, TINY_EMBED)
    assert want_hidden.shape == (5, 2, 10, 32)
    for scan in (True, False):
        feats, hidden = ec.to_module(dataclasses.replace(cfg, scan_layers=scan), params)(pixels)
        assert feats.shape == want_feats.shape and hidden.shape == want_hidden.shape
        assert max_rel_err(feats, want_feats) <= 1e-5, (scan, max_rel_err(feats, want_feats))
        errs = [max_rel_err(h, w) for h, w in zip(hidden, want_hidden)]
        assert max(errs) <= 1e-5, (scan, errs)


def test_release_tower_tensors_map_exactly_onto_ours():
    # the full-size tower built without memory (parameters on 'meta'; buffers are real): every key and shape
    import torch
    from accelerate import init_empty_weights

    from mm_jax.models.eva_clip import EVAVisionConfig
    from tools.convert_weights import eva_clip as ec
    from tools.convert_weights import mapping as mp

    with init_empty_weights():
        from consisid_eva_clip.model import _build_vision_tower

        tower = _build_vision_tower(768, RELEASE)
    sd = tower.state_dict()
    cfg = ec.config_from_state_dict({k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in sd.items()})
    assert cfg == EVAVisionConfig()  # every size read from the tensors is the release default
    found, rope = ec.tower_tensors({k: tuple(v.shape) for k, v in sd.items()})
    assert mp.check_source(ec.COMPONENT, ec.build_mapping(cfg), found) == []
    assert ec.check_rope(cfg, {k: sd[k].numpy() for k in rope}) == []  # 24 + 1 pairs of (576, 64) tables
    assert sum(int(np.prod(s)) for s in found.values()) == sum(p.numel() for p in tower.parameters()) == 304_432_832
    assert torch.is_tensor(sd["rope.freqs_cos"])


def _torchvision_eva_input(faces_nchw):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import normalize, resize

    from mm_jax.face import CLIP_MEAN, CLIP_STD

    # consisid_utils.process_face_embeddings, with consisid_eva_clip's OPENAI_DATASET_MEAN/STD
    from consisid_eva_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert np.allclose(OPENAI_DATASET_MEAN, CLIP_MEAN) and np.allclose(OPENAI_DATASET_STD, CLIP_STD)
    x = resize(faces_nchw, 336, InterpolationMode.BICUBIC)
    return normalize(x, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)


# Measured (torch 2.13.0 / torchvision 0.28.0 CPU, float32 images): max |ours - torchvision| 4.8e-7 on [0, 1]
# pixels (the astronaut face and t1.jpg at 336, 512 and 700) and 1.9e-6 after the CLIP normalisation (1/std
# ~3.8x). The weights are computed in float32 as ATen does (float64 weights differ by 1.4e-5); what remains is
# the sums: torch accumulates the taps in float32, we in float64, ~8 float32 ulps of a value near 1. The
# bounds are those measurements x2, four orders of magnitude below one grey level (1/255).
RESIZE_ATOL = 1e-6
NORMALIZED_ATOL = 4e-6


def test_preprocess_equals_torchvision_bicubic_antialias_on_a_grey_face_on_white():
    import torch
    from skimage import data

    from mm_jax.models.eva_clip import preprocess

    photo = data.astronaut().astype(np.float32) / 255.0  # a real 512x512 portrait, as the aligned crop
    grey = 0.299 * photo[..., :1] + 0.587 * photo[..., 1:2] + 0.114 * photo[..., 2:]
    face = np.where(grey > 0.8, 1.0, np.repeat(grey, 3, axis=-1)).astype(np.float32)[None]  # "background" white
    want = _torchvision_eva_input(torch.from_numpy(face).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    got = preprocess(face)
    assert got.shape == want.shape == (1, 336, 336, 3)
    assert np.max(np.abs(got - want)) <= NORMALIZED_ATOL, np.max(np.abs(got - want))


def test_short_side_resize_equals_torchvision_on_a_photo_in_both_directions():
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize

    import insightface

    from mm_jax.models.eva_clip import resize_short_side

    path = f"{insightface.__path__[0]}/data/images/t1.jpg"  # a real group photo, landscape
    photo = np.asarray(Image.open(path).convert("RGB"), np.float32)[None] / 255.0
    for size in (336, 700):  # shrinking and enlarging
        want = resize(torch.from_numpy(photo).permute(0, 3, 1, 2), size, InterpolationMode.BICUBIC)
        want = want.permute(0, 2, 3, 1).numpy()
        got = resize_short_side(photo, size)
        assert got.shape == want.shape and min(got.shape[1:3]) == size
        assert np.max(np.abs(got - want)) <= RESIZE_ATOL, (size, np.max(np.abs(got - want)))
