"""The converter: manifest check on the real 5B key list, and every bad source fails cleanly."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mm_jax import checkpoint
from tests.conftest import randomize_torch_params
from tests.test_dit import TINY
from tools.convert_weights.from_torch import check_manifest, convert, main
from tools.convert_weights.safetensors_io import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(0)
    m = CogVideoXTransformer3DModel(**TINY).eval()
    randomize_torch_params(m)
    src = tmp_path_factory.mktemp("src") / "transformer"
    m.save_pretrained(src)  # one file
    return src


def _edited(source, tmp_path, edit):
    dst = tmp_path / "edited"
    dst.mkdir()
    (dst / "config.json").write_text((source / "config.json").read_text())
    sd = load_file(source / "diffusion_pytorch_model.safetensors")
    edit(sd)
    save_file(sd, dst / "diffusion_pytorch_model.safetensors")
    return dst


def _assert_fails_cleanly(src, tmp_path, match):
    out = tmp_path / "out" / "ckpt"
    with pytest.raises(CheckpointError, match=match):
        convert(src, out)
    assert not out.exists()
    assert not any(out.parent.glob(".*partial*")) if out.parent.exists() else True


def test_manifest_of_the_real_5b_transformer_maps_exactly(manifests_dir):
    n = check_manifest(manifests_dir / "cogvideox5b_transformer.json")
    assert n == 5_570_283_072
    assert len(json.loads((manifests_dir / "cogvideox5b_transformer.json").read_text())) == 1024


def test_missing_key_is_named_with_its_expected_shape(source, tmp_path):
    src = _edited(source, tmp_path, lambda sd: sd.pop("transformer_blocks.1.attn1.to_k.weight"))
    _assert_fails_cleanly(src, tmp_path, r"missing key transformer_blocks\.1\.attn1\.to_k\.weight \(expected shape \[32, 32\]\)")


def test_unexpected_key_is_named(source, tmp_path):
    src = _edited(source, tmp_path, lambda sd: sd.__setitem__("transformer_blocks.0.extra.weight", torch.zeros(3)))
    _assert_fails_cleanly(src, tmp_path, r"unexpected key transformer_blocks\.0\.extra\.weight")


def test_wrong_shape_names_expected_and_found(source, tmp_path):
    src = _edited(source, tmp_path, lambda sd: sd.__setitem__("proj_out.bias", torch.zeros(15)))
    _assert_fails_cleanly(src, tmp_path, r"shape mismatch for proj_out\.bias: expected \[16\], found \[15\]")


def test_truncated_shard_is_named(source, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel.from_pretrained(source)
    sharded = tmp_path / "sharded"
    m.save_pretrained(sharded, max_shard_size="40KB")
    shard = sorted(sharded.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    _assert_fails_cleanly(sharded, tmp_path, rf"{shard.name}: truncated shard")


def test_bfloat16_output_and_cli(source, tmp_path):
    assert main(["--src", str(source), "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    dit = checkpoint.load_component(tmp_path / "bf16", "transformer", param_dtype="bfloat16")
    assert dit.proj_out.kernel.get_value().dtype == np.dtype("bfloat16")
    # an existing destination is refused, and errors exit with code 2
    assert main(["--src", str(source), "--dst", str(tmp_path / "bf16")]) == 2
    r = subprocess.run([sys.executable, "tools/convert_weights/from_torch.py", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--check-manifest" in r.stdout


def test_a_checkpoint_of_the_older_per_block_format_is_refused_with_a_message_to_reconvert(tmp_path):
    import json

    import pytest

    from mm_jax import checkpoint

    (tmp_path / checkpoint.INDEX_FILE).write_text(json.dumps({"format": 1, "components": ["transformer"]}))
    with pytest.raises(ValueError, match="format 1.*Re-convert it with tools/convert_weights/from_torch.py"):
        checkpoint.load_component(tmp_path, "transformer")
