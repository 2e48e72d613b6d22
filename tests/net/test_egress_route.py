"""Which interface the parent masquerades out of when the profile names none: the one this
host's own traffic to the internet takes, not a default route of some policy-routing table
(a VPN's, or the table 100 that a second ENI on EC2 gets with its `from ADDR` rule)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from wgvsock.services import firewall

from .netlab import Lab, Namespace, wait_for
from .test_roles import World

pytestmark = [pytest.mark.root]

ROOT = Path(__file__).resolve().parents[2]


def _default_route_interfaces(ns: Namespace) -> tuple[str, str]:
    res = ns.run(sys.executable, "-c",
                 "from wgvsock.device import netconf\n"
                 "print(netconf.default_route_interface(4), netconf.default_route_interface(6))",
                 cwd=ROOT)
    v4, v6 = res.stdout.split()
    return v4, v6


def _second_eni(lab: Lab, host: Namespace) -> None:
    """A second interface on HOST whose default routes live in table 100, as EC2's
    ec2-net-utils sets one up; the kernel lists table 100's routes before main's."""
    other = lab.netns("o")
    a, _ = lab.veth(host, "192.0.2.10/24", other, "192.0.2.1/24")
    host.ip("-6", "addr", "add", "2001:db8:2::10/64", "dev", a, "nodad")
    host.ip("route", "add", "default", "via", "192.0.2.1", "table", "100")
    host.ip("-6", "route", "add", "default", "via", "2001:db8:2::1", "dev", a, "table", "100")
    host.ip("rule", "add", "from", "192.0.2.10", "lookup", "100")
    host.ip("-6", "rule", "add", "from", "2001:db8:2::10", "lookup", "100")


def test_the_main_tables_default_route_is_the_egress_interface(lab: Lab) -> None:
    """Before: every table's routes were scanned and table 100's default (via the second
    interface) came first, so NAT would have sent the enclave's traffic out of it."""
    host = lab.netns("h")
    up, _ = lab.veth(host, "198.51.100.1/24", lab.netns("u"), "198.51.100.2/24")
    host.ip("-6", "addr", "add", "2001:db8:1::1/64", "dev", up, "nodad")
    _second_eni(lab, host)
    assert _default_route_interfaces(host) == ("None", "None")  # table 100's do not count
    host.ip("route", "add", "default", "via", "198.51.100.2")
    host.ip("-6", "route", "add", "default", "via", "2001:db8:1::2", "dev", up)
    assert _default_route_interfaces(host) == (up, up)
    # A route of the probe address's own (a VPN's DNS server) is not the way out.
    host.ip("route", "add", "1.1.1.1/32", "via", "192.0.2.1")
    host.ip("-6", "route", "add", "2606:4700::1111/128", "via", "2001:db8:2::1")
    assert _default_route_interfaces(host) == (up, up)
    # An unreachable route is no way out either.
    host.ip("-6", "route", "replace", "unreachable", "default")
    assert _default_route_interfaces(host) == (up, "None")


def test_the_parent_masquerades_out_of_the_main_route(world: World) -> None:
    _second_eni(world.lab, world.parent)
    assert world.parent_cmd("up").returncode == 0
    table = world.parent.run("nft", "list", "table", "inet",
                             firewall.table_name(world.name)).stdout
    assert 'oifname "va0" ip saddr @enclave_v4 masquerade' in table, table
    world.start_enclave()
    wait_for(world.egress_works, 30, "the enclave to fetch a page through the parent's NAT")
