"""Config files: every preset loads, the reference presets carry the paper's numbers, every field is
read by the code it configures, and overrides are parsed by the field's type or refused by name."""
import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from mm_jax import config as mm_config
from mm_jax.checkpoint import abstract_model, param_shapes
from mm_jax.models.dit_config import DiTConfig
from mm_jax.models.id_adapter import AdapterConfig
from mm_jax.models.layers import stack_size

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "tests" / "data" / "manifests"
TRAINING_PRESETS = ["configs/image.py", "configs/image.py:tiny", "configs/video.py", "configs/video.py:tiny",
                    "configs/video.py:demo"]
DEMO_SETUP = "mm_jax.demo.assets:prepare"


def _leaves(cfg, prefix=""):
    """Dotted paths of the config's leaf fields."""
    out = []
    for k, v in cfg.items():
        if hasattr(v, "items"):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}")
    return out


# -- presets -------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", TRAINING_PRESETS + ["configs/model.py", "configs/model.py:cogvideox_2b",
                                                     "configs/model.py:tiny"])
def test_every_preset_loads_from_any_working_directory(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # configs/common.py is found next to the file, not through the cwd
    cfg = mm_config.load(str(ROOT / spec))
    assert _leaves(cfg)


def test_the_5b_preset_builds_the_dit_of_the_real_checkpoint():
    """The parameter count of configs/model.py's 5B DiT equals the real checkpoint's key/shape manifest."""
    cfg = mm_config.load(str(ROOT / "configs/model.py:cogvideox_5b"))
    dit = DiTConfig.from_dict(cfg.transformer.to_dict())
    ours = sum(int(np.prod(s)) for s, _ in param_shapes(abstract_model("transformer", dit)).values())
    manifest = json.loads((MANIFESTS / "cogvideox5b_transformer.json").read_text())
    real = sum(int(np.prod(shape)) for shape, _ in manifest.values())
    assert ours == real == 5_570_283_072


@pytest.mark.parametrize("preset,layers,heads,rope", [("cogvideox_2b", 30, 30, False), ("tiny", 2, 2, True)])
def test_other_model_presets_build_the_dit_they_describe(preset, layers, heads, rope):
    cfg = mm_config.load(str(ROOT / f"configs/model.py:{preset}"))
    dit = DiTConfig.from_dict(cfg.transformer.to_dict())
    model = abstract_model("transformer", dit)
    assert (dit.num_layers, dit.num_attention_heads, dit.use_rotary_positional_embeddings) == (layers, heads, rope)
    assert stack_size(model.transformer_blocks) == layers


def test_model_preset_fields_are_all_dit_config_fields():
    for preset in ("cogvideox_5b", "cogvideox_2b", "tiny"):
        cfg = mm_config.load(str(ROOT / f"configs/model.py:{preset}"))
        assert set(cfg.keys()) == {"transformer"}
        unknown = set(cfg.transformer.keys()) - {f.name for f in dataclasses.fields(DiTConfig)}
        assert not unknown, unknown


def test_reference_presets_carry_the_papers_training_numbers():
    """magic_mirror_reference.md 5: AdamW lr 1e-4, betas 0.9/0.95, wd 1e-4, warmup 500, clip 1.0; bf16
    compute; stage 1 one frame at 480x720, batch 64, 30k steps; stage 2 49 frames at 480x720, batch 8,
    5k steps; dropout 5% text / 5% ID / 5% both; face loss on 50% of samples with lambda 1.0; only
    the adapter trains."""
    image, video = (mm_config.load(str(ROOT / f"configs/{s}.py")) for s in ("image", "video"))
    for cfg in (image, video):
        assert dict(cfg.optimizer) == dict(lr=1e-4, b1=0.9, b2=0.95, eps=1e-8, weight_decay=1e-4, warmup_steps=500,
                                           grad_clip=1.0)
        assert cfg.model.dtype == "bfloat16" and tuple(cfg.train.trainable) == ("adapter",)
        assert (cfg.data.height, cfg.data.width) == (480, 720)
        assert (cfg.data.drop_text, cfg.data.drop_id, cfg.data.drop_both) == (0.05, 0.05, 0.05)
        assert (cfg.train.face_loss_prob, cfg.train.face_loss_lambda) == (0.5, 1.0)
        assert cfg.setup == "" and cfg.adapter.adapter_every == 2  # the adapter in every even block
    assert (image.stage, image.data.frames, image.train.global_batch_size, image.train.steps) == ("image", 1, 64, 30_000)
    assert (video.stage, video.data.frames, video.train.global_batch_size, video.train.steps) == ("video", 49, 8, 5_000)


def test_tiny_and_demo_presets_build_their_assets_through_the_demo_setup_hook():
    for spec in TRAINING_PRESETS:
        cfg = mm_config.load(str(ROOT / spec))
        assert cfg.setup == (DEMO_SETUP if ":" in spec else ""), spec
    demo = mm_config.load(str(ROOT / "configs/video.py:demo"))
    assert demo.train.steps == 300 and demo.sample.enabled and demo.data.path == "synthetic"


# -- every field is read ---------------------------------------------------------------------------

# which code reads each section: a field counts as read when its name is accessed there as an
# attribute (cfg.x), a subscript (cfg["x"]) or a .get("x") / .pop("x")
READERS = {
    "": ["mm_jax/training/loop.py", "mm_jax/training/export.py", "mm_jax/train.py"],
    "model": ["mm_jax/training/models.py", "mm_jax/training/loop.py", "mm_jax/training/export.py"],
    "data": ["mm_jax/data/loader.py", "mm_jax/training/loop.py", "mm_jax/training/export.py"],
    "data.synthetic": ["mm_jax/demo/assets.py"],
    "optimizer": ["mm_jax/training/optim.py", "mm_jax/training/loop.py"],
    "train": ["mm_jax/training/loop.py", "mm_jax/training/step.py"],
    "sample": ["mm_jax/training/loop.py", "mm_jax/training/export.py"],
}


def _accessed_names(path: str) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            names.add(node.slice.value)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("get", "pop")
              and node.args and isinstance(node.args[0], ast.Constant)):
            names.add(node.args[0].value)
    return names


@pytest.mark.parametrize("spec", TRAINING_PRESETS)
def test_every_training_config_field_is_read_by_the_code_it_configures(spec):
    cfg = mm_config.load(str(ROOT / spec))
    adapter_fields = {f.name for f in dataclasses.fields(AdapterConfig)}
    unread = []
    for path in _leaves(cfg):
        section, _, name = path.rpartition(".")
        if section == "adapter":  # passed whole to AdapterConfig.for_dit, adapter_every read by new_adapter
            ok = name in adapter_fields or name in _accessed_names("mm_jax/training/models.py")
        else:
            ok = any(name in _accessed_names(f) for f in READERS[section])
        if not ok:
            unread.append(path)
    assert not unread, f"fields no code reads: {unread}"


def test_the_field_check_catches_a_field_nothing_reads():
    cfg = mm_config.load(str(ROOT / "configs/video.py"))
    cfg.train.nobody_reads_this = 10  # a field no code reads (log_every was one, until the loop read it)
    names = set().union(*(_accessed_names(f) for f in READERS["train"]))
    assert "nobody_reads_this" not in names and "steps" in names


# -- overrides -----------------------------------------------------------------------------------

def test_overrides_are_parsed_by_the_fields_type():
    cfg = mm_config.load(str(ROOT / "configs/video.py:tiny"), [
        "train.steps=7", "--config.optimizer.lr=3", "config.sample.enabled=true", "mesh=data=2,fsdp=1",
        "train.trainable=('adapter', 'dit')", "model.attention_impl=chunked", "data.num_epochs=2",
        "adapter.width=64", "stage=image"])
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.optimizer.lr == 3.0 and isinstance(cfg.optimizer.lr, float)
    assert cfg.sample.enabled is True and cfg.mesh == "data=2,fsdp=1"
    assert tuple(cfg.train.trainable) == ("adapter", "dit")
    assert cfg.model.attention_impl == "chunked" and cfg.data.num_epochs == 2 and cfg.adapter.width == 64
    assert cfg.data.stage == "image"  # one fact: data.stage follows stage


@pytest.mark.parametrize("override,message", [
    ("train.steps=abc", "--config.train.steps=abc"),
    ("train.steps=1.5", "--config.train.steps=1.5"),
    ("optimizer.lr=fast", "--config.optimizer.lr=fast"),
    ("sample.enabled=maybe", "--config.sample.enabled=maybe"),
    ("data.num_epochs=many", "--config.data.num_epochs=many"),
    ("train.nope=1", "no field 'nope' in the config (fields there: async_checkpointing"),
    ("nope.steps=1", "no field 'nope'"),
    ("train.steps", "no value"),
])
def test_a_bad_override_is_refused_naming_the_field_and_value(override, message):
    with pytest.raises(mm_config.ConfigError) as e:
        mm_config.load(str(ROOT / "configs/video.py:tiny"), [override])
    assert message in str(e.value)


@pytest.mark.parametrize("spec,message", [
    ("configs/video.py:nope", "unknown preset 'nope' for configs/video.py; choose from: reference, tiny, demo"),
    ("configs/nope.py", "is not a config file"),
    ("README.md", "is not a config file"),
])
def test_a_bad_config_file_or_preset_is_refused_by_name(spec, message):
    with pytest.raises(mm_config.ConfigError, match=message):
        mm_config.load(str(ROOT / spec))
