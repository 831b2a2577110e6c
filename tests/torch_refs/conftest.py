"""Marks every test under tests/torch_refs ``torch_refs`` and installs the torchvision shim first.

The shim must run before anything imports torchvision, so it is installed here, when pytest loads this
conftest (before the test modules of this folder). Test modules import torchvision, facexlib and
``consisid_eva_clip`` inside fixtures or tests, never at module level, so that collecting them in the
default install (no torchvision) does not fail even though the default run deselects them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.torch_refs.torchvision_shim import install

install()

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.torch_refs)
