"""TFDS dataset builders on Apache Beam for the training data (the ``tfds`` extra).

Importing this package registers the builders (``mm_faces_manifest``, ``mm_laion_face``,
``mm_sfhq``, ``mm_clips_csv``, ``mm_consisid``, ``mm_opens2v``) with tensorflow-datasets;
``python -m mm_jax.data.prepare`` builds them. TensorFlow is never needed: the output is
ArrayRecord, read back through ``tfds.data_source`` (``mm_jax.data.loader``).
"""
from mm_jax.data.tfds.builders import BUILDERS, RecordsBuilder  # noqa: F401
