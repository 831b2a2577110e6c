"""Training data: the record codec (``records``), the dataset builder (``build``, also
``python -m mm_jax.data.build``), the synthetic demo source (``synthetic``) and the Grain loaders
(``loader``)."""
