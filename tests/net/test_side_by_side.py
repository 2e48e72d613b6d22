"""Two profiles' parents on one host (parent/README.md says they run side by side): stopping
one must not take what the other still needs."""

from __future__ import annotations

import sys

import pytest

from .netlab import Lab

pytestmark = [pytest.mark.root]

# Two parents in one process, in a namespace where forwarding starts off.
TWO = r"""
import os, sys
from wgvsock.roles.parent import Parent
from wgvsock.services.profile import parse_profile

d = sys.argv[1]
os.environ["WGVSOCK_RUN_DIR"] = d + "/run"
os.environ["WGVSOCK_STATE_DIR"] = d + "/state"

def profile(name, net, port):
    return parse_profile(
        f"version: 1\nname: {name}\ninterface: {name}0\n"
        f"transport: {{kind: unix, path: {d}/{name}, port: {port}, control_port: {port + 1}}}\n"
        f"parent: {{address: 10.{net}.0.1/30, private_key: {d}/{name}.key}}\n"
        f"enclave: {{address: 10.{net}.0.2/30}}\n", f"{d}/{name}.yaml")

def forwarding():
    return open("/proc/sys/net/ipv4/ip_forward").read().strip()

seen = [forwarding()]
a, b = Parent(profile("sbsa", 77, 51820)), Parent(profile("sbsb", 78, 51830))
a.start()
b.start()
seen.append(forwarding())
a.close()
seen.append(forwarding())
b.close()
seen.append(forwarding())
print(" ".join(seen))
"""


def test_stopping_one_parent_leaves_forwarding_on_for_the_other(lab: Lab) -> None:
    """Before: each recorded only what it changed; the first (which found forwarding off)
    turned it off again while the second still ran (review finding)."""
    ns = lab.netns("s")
    ns.ip("link", "set", "lo", "up")
    ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
    res = ns.run(sys.executable, "-c", TWO, str(lab.tmp), timeout=60)
    # off before; on with both; still on with one left; off again after the last.
    assert res.stdout.split() == ["0", "1", "1", "0"], res.stderr
