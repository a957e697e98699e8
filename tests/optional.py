"""Optional extras in tests: a test that needs one imports it through `needs`.

Outside CI a missing extra skips the test, naming the pip command; under CI (CI set, as `.ci/run` does,
which installs every extra) it fails instead, so CI never passes by skipping a test silently."""
from __future__ import annotations

import importlib
import os

import pytest


def needs(module: str, install: str):
    """Import `module` for a test (or a whole test file), or skip/fail naming `install`."""
    try:
        return importlib.import_module(module)
    except ImportError:
        reason = f"{module} is not installed ({install}); .ci/run installs it"
        if os.environ.get("CI"):
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason, allow_module_level=True)
