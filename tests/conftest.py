"""Shared test helpers.

`require` is how a test says it needs a real external component (a broker, dockerd, GlusterFS,
network namespaces). Locally a missing component skips the test; with TOMQ_REQUIRE_ALL=1 (CI)
it fails, so a machine that lost a package cannot turn the suite green by skipping.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REQUIRE_ALL = os.environ.get("TOMQ_REQUIRE_ALL") == "1"


def require(component: str, available: bool, why: str = "") -> None:
    if available:
        return
    message = f"{component} is not available{': ' + why if why else ''}"
    if REQUIRE_ALL:
        pytest.fail(f"TOMQ_REQUIRE_ALL=1 and {message}", pytrace=False)
    pytest.skip(message)
