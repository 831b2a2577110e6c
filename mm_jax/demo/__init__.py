"""Test assets and the demo: everything that stands in for real models and data, built offline.

* ``tiny_checkpoint``: tiny random checkpoints in our format (a CogVideoX backbone, an adapter folder).
* ``standin_faces``: tiny ONNX face models with insightface's contracts, and images they detect.
* ``synthetic``: a synthetic dataset source (clips of "people" with captions).
* ``assets``: the setup hook of the tiny/demo training presets (``prepare(cfg, workdir)``).
* ``python -m mm_jax.demo``: sample a video from a tiny random checkpoint.

The demo, the notebook's tiny mode and the tests use this package; the library that trains and
samples real models never imports it (``tests/test_imports.py`` checks): a stand-in that the real
code could reach is a stand-in that could silently replace a real model. The training presets
that need these assets name ``mm_jax.demo.assets:prepare`` as their ``setup`` hook, which the
train CLI imports by name.
"""
