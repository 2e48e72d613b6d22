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
                        allow=p.parent.egress.allow, deny=p.parent.egress.deny,
                        lifted=p.parent.egress.lifted)


def serve_credentials(parent: Namespace, internet: Namespace) -> None:
    for addr in (IMDS4, ECS, EKS):
        internet.ip("addr", "add", f"{addr}/32", "dev", "eth0")
    internet.ip("addr", "add", f"{IMDS6}/128", "dev", "eth0", "nodad")
    parent.ip("route", "add", "169.254.0.0/16", "via", INTERNET4)
    parent.ip("-6", "route", "add", "fd00:ec2::/32", "via", INTERNET6)
    start_server(internet, "credentials", *(f"tcp:{a}:80" for a in (IMDS4, ECS, EKS)),
                 f"tcp:[{IMDS6}]:80")


@pytest.mark.quiet  # mostly waits out refused probes: runs beside the QEMU guest
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


def test_a_lift_opens_the_endpoint_only_on_the_naming_entry_s_ports(world) -> None:  # noqa: F811
    """Before: an allow entry naming an endpoint for one port (NTP on 169.254.169.123, say)
    removed the endpoint's deny altogether, and 0.0.0.0/0 then opened every port of it
    (review finding)."""
    enclave, parent, internet = world
    serve_credentials(parent, internet)
    firewall.apply(spec_for("{allow: [0.0.0.0/0, 169.254.169.0/24:81/tcp]}"), netns=parent.name)
    assert probe(enclave, "tcp", IMDS4, 80)[0] == 3
    counters = firewall.read_counters("lab", netns=parent.name)
    assert counters[f"deny {IMDS4}/32"].packets >= 1
    assert f"allow {IMDS4}/32 tcp 81" in counters  # the exception, counted on its own
    firewall.apply(spec_for(f"{{allow: [0.0.0.0/0, {IMDS4}/32:80/tcp]}}"), netns=parent.name)
    assert probe(enclave, "tcp", IMDS4, 80) == (0, f"credentials {PARENT_UP4}")


# ecs-init's redirect is to the agent on 127.0.0.1:51679; one to another host (a credentials
# proxy) is the same hole through the forward path.
REDIRECT = """\
table ip ecs_like {{
    chain pre {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 169.254.170.2 tcp dport 80 dnat to {to}
    }}
    chain post {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 10.77.0.0/30 oifname != "wgt0" masquerade
    }}
}}
"""


def test_a_host_dnat_does_not_carry_the_enclave_past_a_deny_or_to_loopback(world) -> None:  # noqa: F811
    """ecs-init redirects 169.254.170.2:80 for every interface (to 127.0.0.1:51679, with
    route_localnet=1): the rewritten destination no longer matched the deny, and the enclave
    reached what it pointed to; with route_localnet any service bound to the parent's
    127.0.0.1 was reachable too (review findings). Both are dropped and counted now."""
    enclave, parent, internet = world
    start_server(internet, "proxy", f"tcp:{INTERNET4}:8080")
    start_server(parent, "agent", "tcp:127.0.0.1:51679", "tcp:127.0.0.1:9586")
    parent.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1")
    for to, answer in ((f"{INTERNET4}:8080", f"proxy {PARENT_UP4}"),
                       ("127.0.0.1:51679", "agent 10.77.0.2")):
        parent.run("nft", "-f", "-", input=REDIRECT.format(to=to))
        firewall.remove("lab", netns=parent.name)
        assert probe(enclave, "tcp", ECS, 80) == (0, answer)  # without our table: reached
        firewall.apply(spec_for("{allow: [0.0.0.0/0, '::/0']}"), netns=parent.name)
        before = firewall.read_counters("lab", netns=parent.name)
        assert probe(enclave, "tcp", ECS, 80)[0] == 3
        after = firewall.read_counters("lab", netns=parent.name)
        which = f"deny {ECS}/32" if to.startswith(INTERNET4) else "local_blocked"
        assert after[which].packets > before[which].packets, to
        parent.run("nft", "delete", "table", "ip", "ecs_like")
    # A hostile enclave's own kernel sends 127.0.0.1 to the parent.
    enclave.run("sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1",
                "net.ipv4.conf.eth0.route_localnet=1")
    enclave.ip("route", "flush", "table", "local", "dev", "lo", check=False)
    enclave.ip("route", "add", "127.0.0.0/8", "via", "10.77.0.1", "dev", "eth0",
               "src", "10.77.0.2")
    before = firewall.read_counters("lab", netns=parent.name)["local_blocked"].packets
    assert probe(enclave, "tcp", "127.0.0.1", 9586)[0] == 3
    assert firewall.read_counters("lab", netns=parent.name)["local_blocked"].packets > before
