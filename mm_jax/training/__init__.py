"""Training Magic Mirror: losses (``loss``), the optimizer (``optim``), the models and their
trainable/frozen split (``models``), the jitted sharded step (``step``), checkpoints (``checkpoints``)
and logs (``logs``). The loop is ``loop``; the CLI is ``mm_jax.train``."""
