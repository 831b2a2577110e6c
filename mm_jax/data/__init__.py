"""Training data: the record codec (``records``), the per-example work (``example``: faces,
reference, cosine filter, record), caption hygiene (``captions``), source items and layouts
(``sources``, ``layouts``), the single-machine builder (``build``, ``python -m mm_jax.data.build``),
the TFDS builders on Apache Beam (``tfds``, ``python -m mm_jax.data.prepare``), the synthetic demo
source (``synthetic``) and the Grain loaders (``loader``)."""
