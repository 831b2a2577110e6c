"""The shim (conftest) lets torchvision's Python code import next to the CPU torch, and diffusers models still load."""


def test_torchvision_transforms_and_diffusers_import_after_shim():
    import torch
    import torchvision.transforms.functional as TF
    from diffusers import ConsisIDTransformer3DModel  # noqa: F401  (breaks without the shim)

    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert TF.resize(x, 4, antialias=True).shape == (2, 3, 4, 4)
