"""Fixtures the namespace tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture
def world(lab) -> Iterator[object]:
    """tests/net/test_roles.py's three namespaces and profile (Unix stand-in), torn down after
    the test; the roles' scratch files (the enclave's Unix transport) stay inside the lab."""
    from .test_roles import World

    with World(lab) as w:
        w.env["TMPDIR"] = str(lab.tmp)
        yield w
