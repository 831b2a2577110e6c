"""Our Inception v3 features equal torchvision 0.28's ``inception_v3`` with ``fc = Identity`` (eval,
transform_input on, as ``weights=DEFAULT`` sets it), converted by ``tools/convert_weights/inception_v3.py`` from
a state dict holding AuxLogits and fc (dropped); and our face FID equals ConsisID's ``eval/get_facesim_fid.py``
(``load_image``, ``get_activations``, ``calculate_fid`` restated below verbatim, device cpu) on the same crops."""
import numpy as np
import pytest
from flax import nnx

from mm_jax.metrics import face_fid as ff
from mm_jax.models.inception_v3 import InceptionV3Features
from tests.conftest import max_rel_err
from tools.convert_weights import inception_v3 as conv


def _crops(n: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth random 224 RGB crops (a blurred noise field, so the resize matters)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.uniform(0, 255, (28, 28, 3))
        out.append(np.clip(np.kron(small, np.ones((8, 8, 1))) + rng.normal(0, 20, (224, 224, 3)), 0, 255)
                   .astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def pair():
    """(torchvision feature extractor, our converted model): torchvision's init_weights (trunc-normal 0.1 convs,
    which grow activations to ~1e11 but keep different crops' features apart) and random BN statistics."""
    import torch
    from torchvision import models

    torch.manual_seed(0)
    ref = models.inception_v3(weights=None, aux_logits=True, init_weights=True, transform_input=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(1 + 0.1 * torch.randn(c, generator=g))
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))
    state = ref.state_dict()  # with AuxLogits.* and fc.*, as the published file
    assert any(k.startswith("AuxLogits.") for k in state) and "fc.weight" in state
    ref.fc = torch.nn.Identity()
    ref.eval()
    ours = nnx.eval_shape(lambda: InceptionV3Features(rngs=nnx.Rngs(0)))  # as conv.load builds it
    n = conv.load_state_dict(ours, state)
    assert n == len(conv.kept(state))
    return ref, _jitted(ours)


def _jitted(model):
    f = nnx.jit(lambda m, x: m(x))
    return lambda x: f(model, x)


def test_features_match_torchvision_at_min_and_full_size(pair):
    import torch

    ref, ours = pair
    rng = np.random.default_rng(0)
    errs = []
    for side in (75, 299):
        x = rng.uniform(0, 1, (2, 3, side, side)).astype(np.float32)
        with torch.no_grad():
            want = ref(torch.from_numpy(x)).numpy()
        got = np.asarray(ours(x.transpose(0, 2, 3, 1)))
        assert got.shape == want.shape == (2, 2048)
        assert np.abs(want).max() > 1e-3  # not a degenerate (all-zero) feature
        print(side, 'feature max', np.abs(want).max())
        errs.append(max_rel_err(got, want))
    print("features max rel err at 75 / 299:", errs)
    assert max(errs) <= 1e-5


def test_face_fid_matches_consisid_script(pair):
    """Their per-frame FID (single activation repeated twice, covariances 0) and the mean over frames."""
    import torch
    from PIL import Image
    from torchvision import transforms

    ref, ours = pair

    def load_image(image):  # ConsisID eval/get_facesim_fid.py
        img = image.convert('RGB')
        img = transforms.Resize((299, 299))(img)
        img = transforms.ToTensor()(img)
        return img.unsqueeze(0)

    def get_activations(images, model):
        with torch.no_grad():
            activations = model(images).cpu().numpy()
        if activations.shape[0] == 1:
            activations = np.repeat(activations, 2, axis=0)
        return activations

    def matrix_sqrt(matrix):
        eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
        sqrt_eigenvalues = torch.sqrt(torch.clamp(eigenvalues, min=0))
        return (eigenvectors * sqrt_eigenvalues).mm(eigenvectors.T)

    def calculate_fid(real_activations, fake_activations):
        r, f = torch.tensor(real_activations), torch.tensor(fake_activations)
        mu1, sigma1, mu2, sigma2 = r.mean(dim=0), torch.cov(r.T), f.mean(dim=0), torch.cov(f.T)
        ssdiff = torch.sum((mu1 - mu2) ** 2)
        covmean = matrix_sqrt(sigma1.mm(sigma2))
        assert float(torch.abs(sigma1).max()) == 0.0 and float(torch.abs(covmean).max()) == 0.0
        return (ssdiff + torch.trace(sigma1 + sigma2 - 2 * covmean)).item()

    ref_crop, *frames = _crops(3)
    real = get_activations(load_image(Image.fromarray(ref_crop)), ref)
    want = [calculate_fid(real, get_activations(load_image(Image.fromarray(c)), ref)) for c in frames]
    prepared = load_image(Image.fromarray(ref_crop))[0].numpy().transpose(1, 2, 0)
    assert np.array_equal(ff.load_image(ref_crop), prepared)  # same 299 input, bit for bit
    got = ff.frame_fids(ours, ref_crop, frames)
    print("per-frame FID theirs", want, "ours", got.tolist())
    assert max_rel_err(got, np.asarray(want)) <= 1e-5
    assert abs(ff.face_fid(ours, ref_crop, frames) - float(np.mean(want))) <= 1e-5 * abs(np.mean(want))
