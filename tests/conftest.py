"""Shared fixtures. Root tests run in CI as root; they skip only where root is missing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgvsock.ui.nslab import seed_binary

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


@pytest.fixture(scope="session")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go seed (wireguard-go-vsock) unpacked, or a skip that says where it was looked for."""
    path, why = seed_binary(tmp_path_factory.mktemp("seed"))
    if path is None:
        pytest.skip(why)
    return path
