"""The rig's guard, on this machine: nothing here may connect AF_VSOCK."""

from __future__ import annotations

import pytest

from . import rig


@pytest.mark.skipif(rig.in_guest(), reason="checks the guard outside the guest")
def test_guard_refuses_outside_the_guest() -> None:
    assert not rig.in_guest()
    with pytest.raises(RuntimeError, match="refusing to connect AF_VSOCK"):
        rig.require_guest()
