"""Shared fixtures. Root tests run in CI as root; they skip only where root is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("WGVSOCK_SHARED") or Path(__file__).resolve().parents[2] / "shared")


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, TUN); CI runs as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def lab() -> Iterator[object]:
    from tests.net.netlab import Lab

    lab = Lab()
    try:
        yield lab
    finally:
        lab.close()
