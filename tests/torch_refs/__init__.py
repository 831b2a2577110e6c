"""Parity tests against torch references that need torchvision (the ``consisid-ref`` extra).

They carry the ``torch_refs`` marker, are left out of the default run (pyproject's addopts) and run in
their own CI step: ``python -m pytest -q -p no:cacheprovider -m torch_refs tests/torch_refs``.
"""
