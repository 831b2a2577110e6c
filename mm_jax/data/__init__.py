"""Training data: the record codec (``records``), the per-example work (``example``: faces,
reference, cosine filter, record), caption hygiene (``captions``), source items and layouts
(``sources``, ``layouts``), the frozen encoders' outputs (``precompute``), the two builders on
that one core: shard folders on one machine (``build``, ``python -m mm_jax.data.build``) and TFDS
datasets on Apache Beam (``tfds``, ``python -m mm_jax.data.prepare``), and the Grain loaders
(``loader``, reading through ``record_sources`` and making examples in ``transform``)."""
