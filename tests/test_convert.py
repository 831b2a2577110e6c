"""The converter: manifest check on the real 5B key list, and every bad source fails cleanly."""
import json
import os
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


@pytest.fixture(scope="module")
def sharded_bf16(source, tmp_path_factory):
    """The tiny DiT in bf16, sharded with an index file as the published folders are."""
    from diffusers import CogVideoXTransformer3DModel

    m = CogVideoXTransformer3DModel.from_pretrained(source).to(torch.bfloat16)
    out = tmp_path_factory.mktemp("bf16") / "transformer"
    m.save_pretrained(out, max_shard_size="40KB")
    return out


def test_streamed_conversion_of_a_sharded_bf16_folder_is_bit_identical(sharded_bf16, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp
    from flax import nnx

    from tests.conftest import assert_params_hold_the_torch_tensors

    shards = sorted(sharded_bf16.glob("*.safetensors"))
    assert len(shards) > 1 and (sharded_bf16 / "diffusion_pytorch_model.safetensors.index.json").exists()
    whole = convert(sharded_bf16, tmp_path / "whole")  # the tiny stacks are assembled, then written
    monkeypatch.setattr(checkpoint, "STREAM_BYTES", 0)
    streamed = convert(sharded_bf16, tmp_path / "streamed")  # every stack written layer by layer
    group = streamed / "transformer" / "params" / "transformer_blocks.attn1.to_q.kernel"
    meta = ocp.StandardCheckpointer().metadata(group)
    stored = dict(getattr(meta, "item_metadata", meta))["transformer_blocks/attn1/to_q/kernel"]
    assert stored.storage.chunk_shape == (1, 32, 32)  # one chunk per layer: the streamed writer was used
    a, b = (checkpoint.load_component(d, "transformer", param_dtype="bfloat16") for d in (whole, streamed))
    fa, fb = ({checkpoint.flat_key(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
              for m in (a, b))
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype == np.dtype("bfloat16") and fa[k].tobytes() == fb[k].tobytes(), k
    state = {k: v for s in shards for k, v in load_file(s).items()}
    assert assert_params_hold_the_torch_tensors("transformer", b, state) == len(state)


# converts a folder and prints its peak RSS above the baseline (JAX and TensorStore already started)
_PEAK_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import numpy as np
from mm_jax import checkpoint, components
from tools.convert_weights import from_torch as ft
spec = components.get("text_encoder")
cfg, mapping, tensors = ft.plan_component(spec, Path(sys.argv[1]))
with tempfile.TemporaryDirectory() as d:
    checkpoint.save_params(Path(d), "text_encoder", {"shared/embedding": np.zeros((4, 4), np.float32)})
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak, to the current RSS
base = status("VmRSS")
ft.convert_component(spec, cfg, mapping, tensors, Path(sys.argv[2]), "source")
print(json.dumps({"extra": status("VmHWM") - base}))
"""


def test_converting_holds_less_than_one_stack_above_the_baseline(tmp_path):
    """A T5 of 8 layers whose three feed-forward stacks are 128 MiB each (bf16, sharded with an
    index): converting it peaks less than one stack above the converter's baseline. Writing a
    stack whole needs it at least twice (assembled, then Orbax's copy and its encoded chunk): the
    code of 70e180f measured 456 MiB here, the streamed writer 64 MiB. glibc's mmap threshold is
    fixed so that freed buffers go back to the system and the peak is what the code holds."""
    from mm_jax import components
    from tests.random_checkpoint import write_component
    from tools.convert_weights import mapping as mp

    hf = dict(architectures=["T5EncoderModel"], vocab_size=64, d_model=1024, d_kv=64, num_heads=2, d_ff=8192,
              num_layers=8, feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
              relative_attention_max_distance=128)
    cfg = components.get("text_encoder").config_from_dict(hf)
    mapping = mp.build_mapping("text_encoder", checkpoint.param_shapes(checkpoint.abstract_model("text_encoder", cfg)))
    write_component(tmp_path / "src", {k: (m.torch_shape, "bfloat16") for k, m in mapping.items()}, hf, "model",
                    max_shard_bytes=100 * 10**6)
    stack = 8 * 1024 * 8192 * 2
    assert stack == 128 * 2**20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path / "src"), str(tmp_path / "out")], env=env,
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    extra = json.loads(r.stdout.strip().splitlines()[-1])["extra"]
    print(f"converter peak above baseline: {extra / 2**20:.0f} MiB (one stack: {stack / 2**20:.0f} MiB)")
    assert extra < stack
