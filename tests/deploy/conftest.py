"""The chart tests' shared fixture: the helm binary (``tools/fetch_helm.py``'s, found once a module)."""

from __future__ import annotations

import pytest
from helm_support import helm_binary


@pytest.fixture(scope="module")
def helm() -> str:
    return helm_binary()
