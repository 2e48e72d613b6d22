"""Issue 12, item 1: the credential endpoints stay unreachable from the enclave whatever deny
list the profile writes, with real traffic through the parent's nftables table.

The namespaces are test_firewall.py's (enclave -- parent -- internet); the "internet" also
holds the IMDS, ECS and EKS addresses, each with a server on port 80, and the table is built
from a parsed profile, as `parent up` builds it.
"""

from __future__ import annotations

import pytest

from wgvsock.services import firewall
from wgvsock.services.firewall import FirewallSpec
from wgvsock.services.profile import parse_profile

from .netlab import Namespace
from .test_firewall import (
    INTERNET4,
    INTERNET6,
    PARENT_UP4,
    PARENT_UP6,
    TUN,
    probe,
    start_server,
    world,  # noqa: F401 - the fixture
)

pytestmark = [pytest.mark.root]

IMDS4, IMDS6, ECS, EKS = "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.170.23"


def spec_for(egress: str) -> FirewallSpec:
    p = parse_profile(f"name: lab\nparent:\n  address: [10.77.0.1/30, 'fd77::1/64']\n"
                      f"  egress: {egress}\n"
                      "enclave:\n  address: [10.77.0.2/30, 'fd77::2/64']\n")
    return FirewallSpec(name="lab", tunnel_interface=TUN,
                        enclave_addresses=[a.ip for a in p.enclave.addresses],
                        egress_nat=True, egress_interface=None,
                        allow=p.parent.egress.allow, deny=p.parent.egress.deny)


def serve_credentials(parent: Namespace, internet: Namespace) -> None:
    for addr in (IMDS4, ECS, EKS):
        internet.ip("addr", "add", f"{addr}/32", "dev", "eth0")
    internet.ip("addr", "add", f"{IMDS6}/128", "dev", "eth0", "nodad")
    parent.ip("route", "add", "169.254.0.0/16", "via", INTERNET4)
    parent.ip("-6", "route", "add", "fd00:ec2::/32", "via", INTERNET6)
    start_server(internet, "credentials", *(f"tcp:{a}:80" for a in (IMDS4, ECS, EKS)),
                 f"tcp:[{IMDS6}]:80")


def test_own_deny_list_still_denies_the_credential_endpoints(world) -> None:  # noqa: F811
    enclave, parent, internet = world
    serve_credentials(parent, internet)
    # Without our table the enclave would reach them all (the route and servers work).
    firewall.apply(spec_for("{allow: [0.0.0.0/0, '::/0', 169.254.0.0/16, 'fd00:ec2::/32']}"),
                   netns=parent.name)
    assert probe(enclave, "tcp", IMDS4, 80) == (0, f"credentials {PARENT_UP4}")
    assert probe(enclave, "tcp", IMDS6, 80) == (0, f"credentials {PARENT_UP6}")

    for egress in ("{allow: [0.0.0.0/0, '::/0'], deny: []}",
                   "{allow: [0.0.0.0/0, '::/0'], deny: [10.0.0.0/8]}"):
        firewall.apply(spec_for(egress), netns=parent.name)
        for addr in (IMDS4, IMDS6, ECS, EKS):
            assert probe(enclave, "tcp", addr, 80)[0] == 3, f"{egress}: {addr} reachable"
        counters = firewall.read_counters("lab", netns=parent.name)
        for rule in (f"{IMDS4}/32", f"{IMDS6}/128", f"{ECS}/32", f"{EKS}/32"):
            assert counters[f"deny {rule}"].packets >= 1, (egress, rule)

    # An allow rule that names IMDS lifts that one deny only.
    firewall.apply(spec_for(f"{{allow: [0.0.0.0/0, {IMDS4}/32:80/tcp], deny: []}}"),
                   netns=parent.name)
    assert probe(enclave, "tcp", IMDS4, 80) == (0, f"credentials {PARENT_UP4}")
    assert probe(enclave, "tcp", ECS, 80)[0] == 3
