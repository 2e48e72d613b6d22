"""netconf.default_routes and put_back_route, which `enclave up --outside-enclave` uses to put
back the default routes it replaced, on routes whose link is down: the kernel reports such a
route's next hop as `linkdown` and refuses that flag in a request (EINVAL), so the route was
lost ("cannot put back ...: Invalid argument"). Everything runs in namespaces the test made."""

from __future__ import annotations

import json
import sys

import pytest

from .netlab import Lab, wait_for

pytestmark = [pytest.mark.root]

# Run inside the namespace: note the default routes, delete them, put them back.
_ROUND_TRIP = """
import json, subprocess, sys
from wgvsock.device import netconf
found = netconf.default_routes()
subprocess.run(["ip", "route", "flush", "exact", "0.0.0.0/0"], check=True)
errors = []
for r in found:
    try:
        netconf.put_back_route(r)
    except netconf.NetconfError as e:
        errors.append(str(e))
print(json.dumps({"found": [r.text for r in found], "errors": errors}))
"""


@pytest.mark.parametrize("multipath", [False, True], ids=["one-hop", "multipath"])
def test_a_default_route_over_a_link_that_is_down_is_put_back(lab: Lab, multipath: bool) -> None:
    ns, other = lab.netns("r"), lab.netns("s")
    va, vb = lab.veth(ns, "192.0.2.5/24", other, "192.0.2.1/24")
    wa, wb = lab.veth(ns, "198.51.100.5/24", other, "198.51.100.1/24")
    hops = (["nexthop", "via", "192.0.2.1", "dev", va, "nexthop", "via", "198.51.100.1",
             "dev", wa] if multipath else ["via", "192.0.2.1", "dev", va])
    ns.ip("route", "add", "default", "metric", "7", *hops)
    other.ip("link", "set", vb, "down")  # the peer down: the routes over va are linkdown
    other.ip("link", "set", wb, "down")
    # (The carrier's loss reaches the route asynchronously.)
    before = wait_for(lambda: (text := ns.ip("-j", "route", "show", "default").stdout)
                      .count("linkdown") == (2 if multipath else 1) and text, 20,
                      "the default route's next hops marked linkdown")
    res = ns.run(sys.executable, "-c", _ROUND_TRIP, timeout=60)
    out = json.loads(res.stdout)
    assert out["errors"] == [] and len(out["found"]) == 1, out
    after = ns.ip("-j", "route", "show", "default").stdout
    assert _route(after) == _route(before), (before, after)


def _route(text: str) -> list:
    """`ip -j route` output without the flags: the kernel works out `linkdown` itself, and for
    a multipath route marks the route too when it is made over links already down."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k != "flags"}
        return [strip(v) for v in x] if isinstance(x, list) else x

    return strip(json.loads(text))
