"""Shared fixtures. Root tests run in CI as root; they skip only where root is missing."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgvsock.ui.nslab import seed_binary

pytest_plugins = ["tests.apart"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WGVSOCK_SHARED") or ROOT.parent / "shared")


def _compiled_sources() -> list[Path]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [ROOT / p for p in meta["tool"]["wgvsock"]["compiled"]]


def _native_library() -> Path | None:
    """mypyc's library of the compiled modules, built in place by `make compile`, if any."""
    return next(iter(ROOT.glob("wgvsock_native__mypyc.*.so")), None)


def pytest_configure(config: pytest.Config) -> None:
    # An extension compiled from older sources is imported instead of the sources: the tests
    # would pass or fail for code that is not the code in the tree.
    lib = _native_library()
    if lib is None:
        return
    built = lib.stat().st_mtime
    # With the C extension's source (wgvsock/core/_transport_aead.c), built at the same time.
    sources = _compiled_sources() + sorted(ROOT.glob("wgvsock/*/*.c"))
    stale = [str(p.relative_to(ROOT)) for p in sources if p.stat().st_mtime > built]
    if stale:
        raise pytest.UsageError(
            f"{', '.join(stale)} changed after the compiled modules were built, which would "
            "be imported instead: run `make compile` (or `WGVSOCK_PURE=1 make compile` for pure "
            "Python)")


def pytest_report_header(config: pytest.Config) -> str:
    n = len(_compiled_sources())
    if _native_library() is None:
        return f"wgvsock: pure Python (none of the {n} per-packet modules compiled)"
    return f"wgvsock: {n} per-packet modules compiled with mypyc"


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
