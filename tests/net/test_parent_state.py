"""The parent's state file and the host settings it records, where `parent up` and `down` run
in namespaces (test_roles.World): a parent killed at the worst moment, two parents stopping at
once, state files that are damaged or not root's, two parents on one interface.
"""

from __future__ import annotations

import sys

import pytest

from .test_roles import PROFILE, UNIX_TRANSPORT, World

pytestmark = [pytest.mark.root]


def test_a_second_parent_on_the_same_interface_says_which_runs_it(world: World) -> None:
    """Two `up` for one interface (two profiles, or one `up` twice at once): the second
    printed the TUN's raw `[Errno 16] ... interface is busy`."""
    w = world
    w.parent_cmd("up")
    other = w.lab.tmp / "other.yaml"
    other.write_text(PROFILE.format(
        name=f"{w.name}b", transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock2"),
        key=w.lab.tmp / "parent2.key", parent_extra="").replace("10.77.0.", "10.78.0."))
    res = w.parent.run(sys.executable, "-m", "wgvsock.cli", "parent", "up", "--profile",
                       str(other), env=w.env_for("parent"), check=False, timeout=60)
    assert res.returncode == 1
    assert "Errno" not in res.stderr and "Traceback" not in res.stderr, res.stderr
    assert "wg0" in res.stderr and f"profile {w.name}" in res.stderr, res.stderr
    assert "already" in res.stderr, res.stderr
    # The running one is untouched.
    assert w.parent_cmd("up").stdout.startswith(f"{w.name} is already up")
