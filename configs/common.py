"""Fields shared by ``configs/image.py`` and ``configs/video.py`` (each sets its stage's own
frames, batch, steps and presets on top). Every number is a config field, and every field is read
by the trainer (``tests/test_configs.py`` checks both). The paper's numbers (resolution, optimizer,
each stage's frames, batch and steps) come from ``mm_jax/presets/magic_mirror_training.json``,
their one home, which the planner reads too.

Config files import only from ``mm_jax`` (never the other way): the library takes the fields it
needs as arguments and knows nothing of these files.
"""
from __future__ import annotations

import ml_collections

from mm_jax import presets
from mm_jax.text import CLASS_WORDS

PLACEHOLDER = ml_collections.config_dict.placeholder

# The tiny/demo presets build what they read (a random tiny backbone and adapter, stand-in face
# models, a synthetic dataset, a reference face) in the workdir with this hook, which the train
# CLI imports by name: the trainer itself never imports the demo's test assets.
DEMO_SETUP = "mm_jax.demo.assets:prepare"


def common(stage: str) -> ml_collections.ConfigDict:
    """The fields both stages share, with ``stage``'s frames, global batch and steps from the recipe."""
    recipe = presets.load("magic_mirror_training")
    cfg = ml_collections.ConfigDict()
    cfg.stage = stage
    cfg.mesh = ""          # e.g. "data=2,fsdp=4,tensor=1"; empty: every device on fsdp (of a slice, with mesh_dcn)
    cfg.mesh_dcn = ""      # e.g. "data=2" for 2 TPU slices (mesh is then per slice); empty: one slice
    cfg.init_from = ""     # stage 2: a stage-1 workdir or an exported adapter folder
    cfg.setup = ""         # "module:function" the train CLI calls as fn(cfg, workdir) before training
    cfg.compile_cache = ""  # persistent compilation cache folder; "": $MM_JAX_COMPILE_CACHE or ~/.cache/mm_jax/xla; "off"

    cfg.model = ml_collections.ConfigDict()
    cfg.model.checkpoint = ""       # converted CogVideoX folder ("tiny": built by the demo setup)
    cfg.model.adapter = ""          # folder with image_encoder (+ adapter to continue from); "tiny" likewise
    cfg.model.dtype = recipe["dtype"]                # compute dtype; trainable params stay float32
    cfg.model.remat_policy = recipe["remat_policy"]  # per DiT block: none | full | dots | dots_all
    cfg.model.attention_impl = PLACEHOLDER(str)

    # sizes of a fresh adapter (mm_jax.models.id_adapter.AdapterConfig); None: the design's value
    cfg.adapter = ml_collections.ConfigDict()
    cfg.adapter.adapter_every = 2               # the adapter in every 2nd block (0, 2, ...), as the paper
    for name in ("width", "depth", "heads", "head_dim", "num_face_tokens", "num_id_tokens", "id_mlp_hidden"):
        cfg.adapter[name] = PLACEHOLDER(int)

    cfg.data = ml_collections.ConfigDict()
    cfg.data.path = ""              # built dataset folder ("synthetic": built by the demo setup)
    cfg.data.stage = cfg.get_ref("stage")  # one fact: the loader reads it from its own section
    cfg.data.format = "shards"      # "shards" (mm_jax.data.build) | "tfds" (mm_jax.data.prepare; also detected)
    cfg.data.height, cfg.data.width = recipe["height"], recipe["width"]
    cfg.data.frames = recipe["stages"][stage]["frames"]
    cfg.data.frame_stride = 1
    cfg.data.max_text_length = recipe["max_text_length"]
    cfg.data.drop_text, cfg.data.drop_id, cfg.data.drop_both = 0.05, 0.05, 0.05
    cfg.data.class_words = tuple(CLASS_WORDS)  # the one list (mm_jax.text)
    cfg.data.num_workers = 4
    cfg.data.prefetch_buffer = 2
    cfg.data.precomputed = False
    cfg.data.shuffle = True
    cfg.data.num_epochs = PLACEHOLDER(int)
    cfg.data.face_models = ""       # insightface pack for the periodic sample ("standin": built by the demo setup)
    # the synthetic set the demo setup generates (read only by mm_jax.demo.assets)
    cfg.data.synthetic = ml_collections.ConfigDict(dict(num_clips=24, num_images=0, frames=9, height=64, width=64))

    cfg.optimizer = ml_collections.ConfigDict(recipe["optimizer"])

    cfg.train = ml_collections.ConfigDict()
    cfg.train.steps = recipe["stages"][stage]["steps"]
    cfg.train.global_batch_size = recipe["stages"][stage]["global_batch_size"]
    cfg.train.seed = 0
    cfg.train.trainable = tuple(recipe["trainable"])  # the design; ("adapter", "dit") also trains the DiT (tiny demos)
    cfg.train.face_loss_prob = 0.5     # share of samples with the face-weighted term
    cfg.train.face_loss_lambda = 1.0   # weight 1 + lambda * M_face
    cfg.train.checkpoint_every = 500
    cfg.train.keep_checkpoints = 3
    cfg.train.async_checkpointing = True
    cfg.train.log_every = 10  # steps between metric fetches (each step's loss is still logged and checked)
    cfg.train.device_prefetch = 2  # batches placed on the devices ahead of the step that takes them
    cfg.train.profile_steps = 3  # with --profile DIR: steps traced, from the one after the run's first

    cfg.sample = ml_collections.ConfigDict()
    cfg.sample.every = 0               # steps between sample videos; 0: only after the last step
    cfg.sample.enabled = True
    cfg.sample.prompt = "a man is walking on the beach at sunset"
    cfg.sample.ref = ""                # reference photo ("synthetic": a stand-in face built by the demo setup)
    cfg.sample.steps = 50
    cfg.sample.guidance = 6.0
    cfg.sample.frames = 49
    cfg.sample.height, cfg.sample.width = 480, 720
    cfg.sample.seed = 42
    return cfg


def tiny(cfg: ml_collections.ConfigDict, *, frames: int, steps: int, batch: int) -> ml_collections.ConfigDict:
    """Everything generated in the workdir by the demo setup (random tiny backbone, stand-in faces,
    synthetic data), float32, sized for 2 CPU cores."""
    cfg.setup = DEMO_SETUP
    cfg.model.checkpoint = cfg.model.adapter = "tiny"
    cfg.model.dtype = "float32"
    cfg.model.remat_policy = "none"
    cfg.model.attention_impl = "xla"  # at these lengths XLA's attention trains ~1.4x faster than the chunked CPU path
    cfg.data.path = "synthetic"
    cfg.data.face_models = "standin"
    cfg.data.height = cfg.data.width = 64
    cfg.data.frames = frames
    cfg.data.max_text_length = 32
    cfg.data.num_workers = 0
    cfg.data.synthetic = ml_collections.ConfigDict(dict(num_clips=8, num_images=0, frames=max(frames, 9), height=64,
                                                        width=64))
    cfg.optimizer.lr = 1e-2  # the frozen tiny backbone is random: the adapter alone needs big steps to move the loss
    cfg.optimizer.warmup_steps = 5
    cfg.train.steps = steps
    cfg.train.global_batch_size = batch
    cfg.train.checkpoint_every = 10
    cfg.train.async_checkpointing = False
    cfg.sample.enabled = False
    cfg.sample.ref = "synthetic"
    cfg.sample.steps = 4
    cfg.sample.guidance = 6.0
    cfg.sample.frames = frames
    cfg.sample.height = cfg.sample.width = 64
    return cfg
