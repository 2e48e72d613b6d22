"""Refusals without the kernel: nfnetlink_log messages and packets parsed from bytes (hostile
ones included), the bounded record with its advice, and the dashboard's lines. With the kernel,
nftables and the roles: tests/net/test_refusals.py."""

from __future__ import annotations

import ipaddress
import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from rich.console import Console

from wgvsock.services import firewall, nflog
from wgvsock.services.egress.refusals import Refusals
from wgvsock.ui import status as st


def ipv4(proto: int, dst: str, payload: bytes, *, frag: int = 0, ihl: int = 5,
         src: str = "10.77.0.2") -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, 20 + len(payload), 0, frag, 64, proto,
                       0, ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed)
    return head + b"\0" * (ihl * 4 - 20) + payload


def ipv6(next_header: int, dst: str, payload: bytes, *, src: str = "fd77::2") -> bytes:
    return (struct.pack("!IHBB", 0x60000000, len(payload), next_header, 64)
            + ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed
            + payload)


PORTS = struct.pack("!HH", 40000, 5432)


@pytest.mark.parametrize(("packet", "shown"), [
    (ipv4(6, "203.0.113.5", PORTS), "tcp 203.0.113.5:5432"),
    (ipv4(17, "203.0.113.5", PORTS, ihl=15), "udp 203.0.113.5:5432"),  # options
    (ipv4(1, "192.0.2.1", b"\x08\0"), "icmp 192.0.2.1"),
    (ipv4(6, "203.0.113.5", PORTS, frag=0x0010), "tcp 203.0.113.5"),  # a later fragment
    (ipv4(47, "203.0.113.5", b""), "47 203.0.113.5"),  # GRE: no ports
    (ipv6(6, "2001:db8::1", PORTS), "tcp [2001:db8::1]:5432"),
    # A hop-by-hop header (8 bytes) before UDP.
    (ipv6(0, "2001:db8::1", bytes([17, 0]) + b"\0" * 6 + PORTS), "udp [2001:db8::1]:5432"),
    (ipv6(44, "2001:db8::1", b"\0" * 8), "44 2001:db8::1"),  # a fragment header ends it
    (ipv6(58, "2001:db8::1", b"\x80\0"), "ipv6-icmp 2001:db8::1"),
])
def test_flow_names_protocol_destination_and_port(packet: bytes, shown: str) -> None:
    f = nflog.flow(packet)
    assert f is not None and f.describe() == shown


@pytest.mark.parametrize("packet", [b"", b"\x45" * 19, b"\x60" * 39, b"\x20" * 40,
                                    ipv4(6, "192.0.2.1", b"")[:20].replace(b"\x45", b"\x44", 1)])
def test_what_is_no_ip_packet_is_none(packet: bytes) -> None:
    assert nflog.flow(packet) is None


# ICMP port unreachable (ICMPv6 destination unreachable, code port) from the enclave to the
# parent's 10.0.0.2 (2001:db8::2), quoting a TCP segment of the parent's connection
# 10.0.0.2:41234 -> 198.51.100.2:80 ([2001:db8::2]:41234 -> [2001:db8::9]:80).
SEGMENT = struct.pack("!HHI", 41234, 80, 7)
FORGED4 = ipv4(1, "10.0.0.2", b"\x03\x03\0\0\0\0\0\0"
               + ipv4(6, "198.51.100.2", SEGMENT, src="10.0.0.2"))
FORGED6 = ipv6(58, "2001:db8::2", b"\x01\x04\0\0\0\0\0\0"
               + ipv6(6, "2001:db8::9", SEGMENT, src="2001:db8::2"))


@pytest.mark.parametrize(("packet", "quoted"), [
    (FORGED4, "tcp 10.0.0.2:41234 -> 198.51.100.2:80"),
    (FORGED6, "tcp [2001:db8::2]:41234 -> [2001:db8::9]:80"),
    # Time exceeded about a ping; parameter problem about UDP behind a hop-by-hop header.
    (ipv4(1, "10.0.0.2", b"\x0b\0\0\0\0\0\0\0"
          + ipv4(1, "192.0.2.1", b"\x08\0", src="10.0.0.2")), "icmp 10.0.0.2 -> 192.0.2.1"),
    (ipv6(58, "2001:db8::2", b"\x04\0\0\0\0\0\0\0" + ipv6(
        0, "2001:db8::9", bytes([17, 0]) + b"\0" * 6 + PORTS, src="2001:db8::2")),
     "udp [2001:db8::2]:40000 -> [2001:db8::9]:5432"),
    # Cut where SNAPLEN_QUOTING would not cut: the quoted ports are gone.
    (FORGED4[:48], "tcp 10.0.0.2 -> 198.51.100.2"),
], ids=["v4", "v6", "time-exceeded", "v6-extension-header", "cut"])
def test_an_icmp_error_names_the_packet_it_quotes(packet: bytes, quoted: str) -> None:
    f = nflog.flow(packet)
    assert f is not None and f.quoted is not None and f.quoted.connection() == quoted
    assert f.quoted.quoted is None  # one level: an error about an error is not read on
    assert len(FORGED6) <= nflog.SNAPLEN_QUOTING


@pytest.mark.parametrize("packet", [
    ipv4(1, "192.0.2.1", b"\x08\0\0\0\0\0\0\0" + ipv4(6, "198.51.100.2", SEGMENT)),  # echo
    ipv6(58, "2001:db8::1", b"\x80\0\0\0\0\0\0\0" + ipv6(6, "2001:db8::9", SEGMENT)),
    ipv4(6, "203.0.113.5", PORTS),
    FORGED4[:28],  # the error's header only
], ids=["echo", "echo6", "tcp", "header-only"])
def test_what_is_no_icmp_error_quotes_nothing(packet: bytes) -> None:
    f = nflog.flow(packet)
    assert f is not None and f.quoted is None


def test_short_transport_headers_give_no_port() -> None:
    f = nflog.flow(ipv4(6, "192.0.2.1", b"\0\0"))
    assert f is not None and f.port is None and f.describe() == "tcp 192.0.2.1"


@settings(max_examples=500, deadline=None)
@given(hs.binary(max_size=120))
def test_flow_never_raises(data: bytes) -> None:
    nflog.flow(data)


def _attr(typ: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), typ) + value + b"\0" * (-len(value) % 4)


def _packet_message(prefix: bytes, payload: bytes) -> bytes:
    body = struct.pack("=BBH", 2, 0, 0) + _attr(10, prefix + b"\0") + _attr(9, payload)
    return struct.pack("=IHHII", 16 + len(body), 0x400, 0, 0, 0) + body


def test_parse_reads_every_message_of_a_read() -> None:
    one = _packet_message(b"blocked", ipv4(6, "203.0.113.5", PORTS))
    two = _packet_message(b"deny 10.0.0.0/8", ipv4(17, "10.1.2.3", PORTS))
    got = nflog.parse(one + two)
    assert [g.prefix for g in got] == ["blocked", "deny 10.0.0.0/8"]
    assert nflog.flow(got[1].packet).describe() == "udp 10.1.2.3:5432"


@settings(max_examples=500, deadline=None)
@given(hs.binary(max_size=200), hs.integers(0, 200))
def test_parse_never_raises_and_keeps_what_precedes_a_broken_message(junk: bytes,
                                                                    cut: int) -> None:
    good = _packet_message(b"blocked", ipv4(6, "203.0.113.5", PORTS))
    got = nflog.parse(good + junk)
    assert got[0].prefix == "blocked"
    nflog.parse((good + junk)[:cut])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def tcp_to(dst: str, port: int = 5432) -> nflog.Flow:
    f = nflog.flow(ipv4(6, dst, struct.pack("!HH", 40000, port)))
    assert f is not None
    return f


def test_each_refusal_is_counted_and_logged_once_with_what_to_change(caplog) -> None:
    clock = Clock()
    r = Refusals(clock=clock)
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        for _ in range(3):
            r.packet("blocked", tcp_to("203.0.113.5"))
        clock.now += 7
        r.packet("deny 10.0.0.0/8", tcp_to("10.1.2.3", 22))
        r.name("evil.example", "denied")
        r.name("new.example", "not allowed")
    assert [(x.kind, x.what, x.rule, x.count) for x in r.recent()] == [
        ("dns", "new.example", "not allowed", 1), ("dns", "evil.example", "denied", 1),
        ("denied", "tcp 10.1.2.3:22", "deny 10.0.0.0/8", 1),
        ("blocked", "tcp 203.0.113.5:5432", "", 3)]
    lines = [rec.getMessage() for rec in caplog.records]
    assert len(lines) == 4
    assert "add 203.0.113.5/32:5432/tcp (or its host name) to parent.egress.allow" in lines[0]
    assert "matches parent.egress.deny (deny 10.0.0.0/8)" in lines[1]
    assert "a parent.egress.deny entry names it" in lines[2]
    assert "no parent.egress.allow entry names it" in lines[3]
    keys = r.uapi_keys()
    assert keys["wgvsock_refused_4"] == "blocked 3 7 tcp 203.0.113.5:5432"
    assert keys["wgvsock_refused_3"] == "denied 1 0 tcp 10.1.2.3:22; deny 10.0.0.0/8"


def test_a_credential_endpoint_is_reported_as_the_built_in_deny(caplog) -> None:
    """The credential endpoints are denied whether or not parent.egress.deny lists them:
    pointing there would send the operator looking for an entry that is not in the file."""
    r = Refusals()
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        r.packet("credentials 169.254.169.254/32", tcp_to("169.254.169.254", 80))
        r.packet("credentials fd00:ec2::254/128",
                 nflog.flow(ipv6(6, "fd00:ec2::254", struct.pack("!HH", 40000, 80))))
    [v4, v6] = [rec.getMessage() for rec in caplog.records]
    assert "parent.egress.deny (" not in v4
    assert "is a credential endpoint (169.254.169.254), denied by wgvsock itself" in v4
    assert "add 169.254.169.254/32:80/tcp to parent.egress.allow" in v4
    assert 'add "[fd00:ec2::254/128]:80/tcp" to parent.egress.allow' in v6
    assert [(x.kind, x.rule) for x in r.recent()][-1] == (
        "denied", "credentials 169.254.169.254/32")


def test_the_parent_tells_the_firewall_which_addresses_are_credential_endpoints() -> None:
    from wgvsock.roles.parent import Parent
    from wgvsock.services.profile import parse_profile

    p = parse_profile("name: x\nparent:\n  egress:\n    interface: eth9\n"
                      "    allow: [0.0.0.0/0, 169.254.169.254/32:80/tcp]\n")
    spec = Parent(p).spec()
    assert {str(a) for a in spec.credential_endpoints} == {
        "169.254.169.254", "fd00:ec2::254", "169.254.170.2", "169.254.170.23", "fd00:ec2::23"}
    spec.log_group = 7
    text = firewall.render_ruleset(spec)
    # The implicit deny and what is left of the lifted endpoint: the built-in prefix; the
    # counters keep the rule's comment.
    assert text.count('prefix "credentials 169.254.169.254/32"') == 2
    assert text.count('prefix "credentials 169.254.170.2/32"') == 2
    assert 'prefix "deny 169.254' not in text
    assert 'drop comment "deny 169.254.170.2/32"' in text


def test_a_connection_over_the_limit_names_the_limit_not_an_allow_entry(caplog) -> None:
    """The destination may well be allowed: what to change is the number of connections the
    enclave keeps open, or parent.egress.max_connections."""
    r = Refusals()
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        for _ in range(2):
            r.packet("connection limit", tcp_to("203.0.113.5", 443))
    [line] = [rec.getMessage() for rec in caplog.records]
    assert line.startswith("egress over the connection limit: tcp 203.0.113.5:443 from the "
                           "enclave")
    assert "parent.egress.max_connections" in line and "parent.egress.allow" not in line
    assert [(x.kind, x.what, x.rule, x.count) for x in r.recent()] == [
        ("limited", "tcp 203.0.113.5:443", "", 2)]
    assert r.uapi_keys()["wgvsock_refused_1"] == "limited 2 0 tcp 203.0.113.5:443"


def test_an_ipv6_destination_gets_the_profile_s_bracketed_entry(caplog) -> None:
    f = nflog.flow(ipv6(17, "2001:db8::1", PORTS))
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        Refusals().packet("blocked", f)
    assert 'add "[2001:db8::1/128]:5432/udp"' in caplog.records[0].getMessage()


def test_memory_and_log_are_bounded_under_a_flood_of_destinations(caplog) -> None:
    r = Refusals(limit=50)
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        for i in range(5000):
            r.packet("blocked", tcp_to(str(ipaddress.IPv4Address("198.18.0.0") + i)))
    assert len(r._entries) == 50
    assert r.recent(1)[0].what == "tcp 198.18.19.135:5432"  # the newest kept
    assert len(caplog.records) <= 22  # a burst of 20, then one a second


def test_the_dashboard_shows_refusals_escaped_and_the_json_all_of_them() -> None:
    extra = {
        "wgvsock_refused_1": "dns 2 5 evil\x1b[31m.example; denied",
        "wgvsock_refused_2": "blocked 14 65 udp 198.51.100.2:5432",
        "wgvsock_refused_3": "not a refusal",
        "wgvsock_refused_4": "blocked 1 1 udp 198.51.100.2:1",  # after a gap: not read
    }
    view = st.interface_view("wg0", "/run/wg0.sock", {"extra": extra, "peers": []}, 0.0)
    assert [(r.kind, r.count, r.age) for r in view.refusals] == [("dns", 2, 5),
                                                                   ("blocked", 14, 65)]
    assert "\x1b" not in view.refusals[0].what
    console = Console(record=True, width=80, force_terminal=False)
    for line in st._interface_lines(view, console, 80):
        console.print(line)
    text = console.export_text()
    assert "blocked udp 198.51.100.2:5432, 14 times (no allow entry) · 1 min ago" in text
    assert "(denied)" in text


def test_the_readme_shows_the_log_lines_as_they_are(caplog) -> None:
    """README's "What the parent refused" quotes the first line logged for each kind: each
    must be the one the parent writes today (the to-parent line said 'a parent.egress.allow
    CIDR entry covers the address' after 4cc3570 made a catch-all open none of the parent's
    ports)."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    r = Refusals()
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        r.packet("blocked", nflog.flow(ipv4(17, "198.51.100.2", PORTS)))
        r.packet("deny 198.51.100.3/32", tcp_to("198.51.100.3", 80))
        r.packet("credentials 169.254.169.254/32", tcp_to("169.254.169.254", 80))
        r.packet("to parent", tcp_to("10.77.0.1", 22))
        r.name("tracker.example", "not allowed")
        r.packet("forged", nflog.flow(FORGED4))
    lines = [f"WARNING wgvsock.refused: {rec.getMessage()}" for rec in caplog.records]
    assert len(lines) == 6
    for line in lines:
        assert f"\n{line}\n" in readme, line


def test_blocked_dns_to_another_server_points_at_the_parent_s_forwarder(caplog) -> None:
    """An enclave app with a resolver of its own (8.8.8.8) is blocked on port 53. Before, the
    log advised only allowing 8.8.8.8/32:53/udp, which lets the enclave look up, past the
    forwarder, names parent.egress does not allow (and tunnel data out in them)."""
    r = Refusals()
    dns_udp = nflog.flow(ipv4(17, "8.8.8.8", struct.pack("!HH", 40000, 53)))
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        r.packet("blocked", dns_udp)
        r.packet("blocked", tcp_to("8.8.4.4", 53))
        r.packet("blocked", tcp_to("203.0.113.5", 443))
    [udp, tcp, other] = [rec.getMessage() for rec in caplog.records]
    for line in (udp, tcp):
        assert "port 53 is DNS: with host names in parent.egress" in line
        assert "enclave.dns: parent" in line
    assert "add 8.8.8.8/32:53/udp" in udp
    assert "DNS" not in other


def test_a_forged_icmp_error_is_named_with_what_it_quotes_and_no_entry_to_add(caplog) -> None:
    """An ICMP error from the enclave about a connection it is not party to (the parent's,
    one the parent routes for) is dropped; before, it was counted only, so an enclave that
    probed for others' connections went unseen. It is a refusal of its own kind, with its
    own bucket, and no allow entry is offered: none would make it legitimate."""
    r = Refusals(limit=4)
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        for _ in range(2):
            r.packet("forged", nflog.flow(FORGED4))
        r.packet("forged", nflog.flow(FORGED6))
        for i in range(10):  # a flood of another kind leaves them be
            r.packet("blocked", tcp_to(str(ipaddress.IPv4Address("198.18.0.0") + i)))
    forged = [(x.kind, x.what, x.rule, x.count) for x in r.recent(20) if x.kind == "forged"]
    assert forged == [
        ("forged", "ipv6-icmp 2001:db8::2 quoting tcp [2001:db8::2]:41234 -> [2001:db8::9]:80",
         "", 1),
        ("forged", "icmp 10.0.0.2 quoting tcp 10.0.0.2:41234 -> 198.51.100.2:80", "", 2)]
    v4, v6 = [rec.getMessage() for rec in caplog.records[:2]]
    assert v4.startswith(
        "forged ICMP error dropped: the enclave sent an ICMP error about a connection it is "
        "not party to (10.77.0.2 -> 10.0.0.2, quoting tcp 10.0.0.2:41234 -> "
        "198.51.100.2:80)")
    assert "(fd77::2 -> 2001:db8::2, quoting tcp [2001:db8::2]:41234" in v6
    for line in (v4, v6):
        assert "parent.egress.allow" not in line and "add " not in line
        assert "probing" in line
    # A related packet that quotes nothing (a conntrack helper's expected connection) is
    # named by itself.
    with caplog.at_level(logging.WARNING, logger="wgvsock.refused"):
        r.packet("forged", tcp_to("198.51.100.2", 20))
    assert r.recent(1)[0].what == "tcp 198.51.100.2:20"
    assert "parent.egress.allow" not in caplog.records[-1].getMessage()
