"""Config files (``ml_collections``), each with ``get_config(preset)``; ``mm_jax.config.load``
takes ``configs/<file>.py[:preset]``. A package so that the files share ``configs/common.py``."""
