"""Our CurricularFace IR backbone equals TFace's ``Backbone(mode='ir')`` (ConsisID's
``util/on_going_module/curricularface/model_irse.py``) restated in torch below, converted by
``tools/convert_weights/curricularface.py``: a tiny config's outputs and FaceSim-Cur embeddings (fp32,
1e-5), the release IR-101's key set and parameter count, and the converter's strictness."""
import numpy as np
import pytest
from flax import nnx

from mm_jax.models.curricularface import CurricularFaceConfig, CurricularFaceIR
from tests.conftest import max_rel_err
from tools.convert_weights import curricularface as conv
from tools.convert_weights.safetensors_io import CheckpointError

# every shortcut kind: strided and unstrided subsample (8->8), conv+BN (8->16, 16->24), a 1-unit stage
TINY = CurricularFaceConfig(input_size=112, stem_channels=8, stage_channels=(8, 16, 16, 24),
                            stage_units=(2, 2, 1, 2), embedding_size=16)


def torch_backbone(cfg: CurricularFaceConfig):
    """TFace's ``Backbone(input_size, num_layers, 'ir')`` restated with ``cfg``'s sizes: same module
    names and ``Sequential`` order, so its state dict keys are the published file's."""
    import torch
    from torch import nn

    class BasicBlockIR(nn.Module):
        def __init__(self, cin, depth, stride):
            super().__init__()
            self.shortcut_layer = (nn.MaxPool2d(1, stride) if cin == depth else
                                   nn.Sequential(nn.Conv2d(cin, depth, (1, 1), stride, bias=False),
                                                 nn.BatchNorm2d(depth)))
            self.res_layer = nn.Sequential(
                nn.BatchNorm2d(cin), nn.Conv2d(cin, depth, (3, 3), (1, 1), 1, bias=False),
                nn.BatchNorm2d(depth), nn.PReLU(depth), nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
                nn.BatchNorm2d(depth))

        def forward(self, x):
            return self.res_layer(x) + self.shortcut_layer(x)

    class Flatten(nn.Module):
        def forward(self, x):
            return x.view(x.size(0), -1)

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            c0, cout = cfg.stem_channels, cfg.stage_channels[-1]
            self.input_layer = nn.Sequential(nn.Conv2d(3, c0, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(c0),
                                             nn.PReLU(c0))
            self.output_layer = nn.Sequential(
                nn.BatchNorm2d(cout), nn.Dropout(0.4), Flatten(),
                nn.Linear(cout * cfg.output_side ** 2, cfg.embedding_size),
                nn.BatchNorm1d(cfg.embedding_size, affine=False))
            self.body = nn.Sequential(*[BasicBlockIR(*u) for u in cfg.units()])

        def forward(self, x):
            return self.output_layer(self.body(self.input_layer(x)))

    del torch
    return Backbone()


def randomize(model, seed: int = 0) -> None:
    """Non-trivial weights and BatchNorm statistics everywhere, activations kept O(1)."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.1 * rand(m.num_features))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                if m.affine:
                    m.weight.copy_(1.0 + 0.1 * rand(m.num_features))
                    m.bias.copy_(0.1 * rand(m.num_features))
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(rand(*m.weight.shape) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * rand(*m.bias.shape))
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(0.25 + 0.1 * rand(*m.weight.shape))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny reference, saved as a ``.bin`` with DataParallel's ``module.`` prefix, loaded through the
    converter; outputs of both on the same normalised pixels and ConsisID's ``inference`` embeddings."""
    import cv2
    import torch

    from mm_jax.metrics.curricularface_embed import embed, resize_aligned

    ref = torch_backbone(TINY)
    randomize(ref)
    ref.eval()
    path = tmp_path_factory.mktemp("cur") / conv.FILE_NAME
    torch.save({f"module.{k}": v for k, v in ref.state_dict().items()}, path)
    ours = conv.load(path, TINY)

    rng = np.random.default_rng(0)
    faces224 = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    want_emb = []
    with torch.no_grad():
        pixels = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 112, 112)).astype(np.float32))
        want_out = ref(pixels).numpy()
        for face in faces224:  # ConsisID's inference(), verbatim in its arithmetic
            img = np.transpose(cv2.resize(face, (112, 112)), (2, 0, 1))
            img = torch.from_numpy(img).unsqueeze(0).float()
            img.div_(255).sub_(0.5).div_(0.5)
            e = ref(img).numpy()[0]
            want_emb.append(e / np.linalg.norm(e))
    got_out = np.asarray(nnx.jit(lambda m, x: m(x))(ours, np.transpose(pixels.numpy(), (0, 2, 3, 1))))
    return dict(want_out=want_out, got_out=got_out, want_emb=np.stack(want_emb),
                got_emb=embed(ours, resize_aligned(faces224)), n_torch=len(ref.state_dict()))


def test_tiny_ir_matches_torch_backbone(tiny_run):
    err = max_rel_err(tiny_run["got_out"], tiny_run["want_out"])
    print("tiny IR output max rel err", err)
    assert tiny_run["got_out"].shape == (2, 16)
    assert err <= 1e-5
    assert tiny_run["want_out"].std() > 0.1  # not a degenerate (constant or vanishing) reference


def test_embed_matches_consisid_inference(tiny_run):
    err = max_rel_err(tiny_run["got_emb"], tiny_run["want_emb"])
    print("FaceSim-Cur embedding max rel err", err)
    assert tiny_run["got_emb"].shape == (3, 16)
    assert err <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(tiny_run["got_emb"], axis=-1), 1.0, atol=1e-6)


def test_release_ir101_keys_and_param_count_equal_torch():
    import torch

    with torch.device("meta"):
        ref = torch_backbone(CurricularFaceConfig())
    want = {k: list(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    abstract = nnx.eval_shape(lambda: CurricularFaceIR(CurricularFaceConfig(), rngs=nnx.Rngs(0)))
    got = conv.expected_keys(abstract)
    assert sorted(got) == sorted(want)
    assert got == want
    n_ours = sum(int(np.prod(s)) for s in got.values())
    n_torch = sum(p.numel() for p in ref.parameters()) + sum(
        b.numel() for k, b in ref.named_buffers() if not k.endswith("num_batches_tracked"))
    print("IR-101 tensors", len(got), "values (params + BN statistics)", n_ours)
    assert n_ours == n_torch
    assert len(CurricularFaceConfig().units()) == 49 and want["output_layer.3.weight"] == [512, 512 * 7 * 7]


def test_converter_names_every_missing_unexpected_and_misshapen_key():
    import torch

    ref = torch_backbone(TINY)
    sd = dict(ref.state_dict())
    del sd["body.2.shortcut_layer.0.weight"]
    sd["body.0.res_layer.1.weight"] = torch.zeros(8, 8, 1, 1)
    sd["body.0.se_block.fc1.weight"] = torch.zeros(1, 8, 1, 1)
    model = CurricularFaceIR(TINY, rngs=nnx.Rngs(0))
    with pytest.raises(CheckpointError) as e:
        conv.load_state_dict(model, sd)
    msg = str(e.value)
    assert "3 problem(s)" in msg
    assert "missing key body.2.shortcut_layer.0.weight (expected shape [16, 8, 1, 1])" in msg
    assert "shape mismatch for body.0.res_layer.1.weight: expected [8, 8, 3, 3], found [8, 8, 1, 1]" in msg
    assert "unexpected key body.0.se_block.fc1.weight" in msg


def test_converter_cli_refuses_a_missing_file(tmp_path, capsys):
    assert conv.main([str(tmp_path / conv.FILE_NAME)]) == 2
    assert "no such file" in capsys.readouterr().err


def test_config_rejects_wrong_stage_count():
    with pytest.raises(ValueError, match="stage_units"):
        CurricularFaceIR(CurricularFaceConfig(stage_units=(3, 13, 30)), rngs=nnx.Rngs(0))
