"""Endpoint parsing, the UAPI form `wg` must be able to read back, and the display form."""

from __future__ import annotations

import socket

import pytest

from wgvsock.conn.endpoint import (
    Endpoint,
    default_unix_dir,
    display_endpoint,
    format_endpoint,
    inet_host,
    inet_sockaddr,
    parse_endpoint,
    unix_endpoint_from_path,
)

UDIR = "/run/wgv-test"


# -- vsock -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cid", "port"),
    [
        ("vsock://16:5000", 16, 5000),
        ("vsock://3:1", 3, 1),
        ("0.0.0.16:5000", 16, 5000),
        ("1.2.3.4:5000", 0x01020304, 5000),
        ("host(2):5000", 2, 5000),
        ("local(1):5000", 1, 5000),
        ("hypervisor(0):5000", 0, 5000),
        ("vm(16):5000", 16, 5000),
        ("vm(4294967294):7", 4294967294, 7),
        ("16:5000", 16, 5000),
        ("vsock://16:4294967294", 16, 4294967294),
        ("  vsock://16:5000\n", 16, 5000),
    ],
)
def test_parse_vsock(text: str, cid: int, port: int) -> None:
    assert parse_endpoint(text, "vsock") == Endpoint("vsock", cid, port)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "vsock://x:1",
        "vsock://16",
        "vsock://16:",
        "vsock://-1:5",
        "vsock://4294967296:5",
        "vsock://16:4294967296",
        "vsock://16:4294967295",  # VMADDR_PORT_ANY
        "255.255.255.255:5000",  # VMADDR_CID_ANY
        "vsock://16:0",
        "vm(2):5000",
        "vm(x):5000",
        "vm(16:5000",
        "host(3):5000",
        "[::1]:5000",
        "::1:5000",
        "foo:5000",
        "16",
        "16:abc",
        "16:+5",
        "1.2.3:5000",
        "0.0.0.016:5000",
        "1.2.3.4:5000:6",
    ],
)
def test_parse_vsock_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"endpoint|CID|port"):
        parse_endpoint(text, "vsock")


def test_vsock_format_is_ipv4_cid_and_round_trips() -> None:
    for text in ("vsock://16:5000", "vm(3):1", "vsock://16909060:65535", "host(2):22"):
        ep = parse_endpoint(text, "vsock")
        out = format_endpoint(ep)
        assert out is not None
        assert parse_endpoint(out, "vsock") == ep
        # What `wg` will do with it: getaddrinfo must accept it as a numeric IPv4 address.
        host, port = out.rsplit(":", 1)
        assert socket.getaddrinfo(host, port, socket.AF_INET, 0, 0, socket.AI_NUMERICHOST)
    assert format_endpoint(Endpoint("vsock", 16, 5000)) == "0.0.0.16:5000"
    assert format_endpoint(Endpoint("vsock", 0x01020304, 9)) == "1.2.3.4:9"


def test_vsock_format_omits_32_bit_ports() -> None:
    assert format_endpoint(Endpoint("vsock", 16, 65536)) is None
    assert format_endpoint(Endpoint("vsock", 16, 789932700, conn_id=3)) is None


def test_vsock_display() -> None:
    assert display_endpoint(parse_endpoint("0.0.0.16:5000", "vsock")) == "vsock://16:5000"
    assert display_endpoint(Endpoint("vsock", 3, 70000, 2)) == "vsock://3:70000"


# -- tcp / udp -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network", "host", "port"),
    [
        ("1.2.3.4:51820", "udp", "1.2.3.4", 51820),
        ("1.2.3.4:51820", "tcp", "1.2.3.4", 51820),
        ("1.2.3.4:1", "tcp4", "1.2.3.4", 1),
        ("[::1]:5", "tcp", "::1", 5),
        ("[::1]:5", "tcp6", "::1", 5),
        ("[2001:DB8:0:0::1]:65535", "udp", "2001:db8::1", 65535),
        ("[::ffff:1.2.3.4]:5", "udp", "1.2.3.4", 5),
        ("[::ffff:1.2.3.4]:5", "tcp4", "1.2.3.4", 5),
        ("localhost:80", "tcp4", "127.0.0.1", 80),
    ],
)
def test_parse_inet(text: str, network: str, host: str, port: int) -> None:
    assert parse_endpoint(text, network) == Endpoint("inet", host, port)


@pytest.mark.parametrize(
    ("text", "network"),
    [
        ("1.2.3.4", "udp"),
        ("1.2.3.4:", "udp"),
        (":5", "udp"),
        ("1.2.3.4:0", "udp"),
        ("1.2.3.4:65536", "tcp"),
        ("1.2.3.4:-1", "tcp"),
        ("::1:5", "tcp"),
        ("[::1]5", "tcp"),
        ("[::1:5", "tcp"),
        ("[zz]:5", "tcp"),
        ("[1.2.3.4]:5", "tcp"),
        ("[::1]:5", "tcp4"),
        ("1.2.3.4:5", "tcp6"),
        ("1.2.3.4:5", "sctp"),
        ("vsock://16:5000", "tcp"),
    ],
)
def test_parse_inet_rejects(text: str, network: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text, network)


def test_unresolvable_host_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*_args: object, **_kw: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(ValueError, match=r"cannot resolve 'peer\.example'"):
        parse_endpoint("peer.example:51820", "udp")


@pytest.mark.parametrize("host", ["010.0.0.1", "01.2.3.4", "127.1", "1.2.3", "2130706433",
                                  "0x7f.0.0.1", "1.2.3.4 x"])
@pytest.mark.parametrize("network", ["udp", "tcp", "tcp4"])
def test_a_numeric_address_in_a_form_other_than_dotted_quad_is_refused(
    host: str, network: str
) -> None:
    """glibc's resolver reads 010.0.0.1 as 8.0.0.1 (octal) and 127.1 as 127.0.0.1: an endpoint
    that silently lands elsewhere. The seed (Go) refuses these; so do we, saying how to write it."""
    with pytest.raises(ValueError, match=r"not an IPv4 address as A\.B\.C\.D"):
        parse_endpoint(f"{host}:5", network)


def test_inet_format_round_trips() -> None:
    for text, network in (("1.2.3.4:5", "udp"), ("[fe80::1]:51820", "tcp"), ("[::1]:9", "tcp6")):
        ep = parse_endpoint(text, network)
        out = format_endpoint(ep)
        assert out == text
        assert parse_endpoint(out, network) == ep
        assert display_endpoint(ep) == text
    assert format_endpoint(Endpoint("inet", "127.0.0.1", 40000, conn_id=7)) == "127.0.0.1:40000"


# -- unix ------------------------------------------------------------------------------------


def test_parse_unix_port_forms() -> None:
    ep = parse_endpoint("127.0.0.1:5000", "unix", UDIR)
    assert ep == Endpoint("unix", f"{UDIR}/5000.sock", 5000)
    assert parse_endpoint("127.0.0.1:5000", "unix", UDIR, dgram=True) == Endpoint(
        "unix", f"{UDIR}/5000.dgram", 5000
    )
    # The host part is ignored: whatever `wg` sends back, the port picks the socket.
    assert parse_endpoint("0.0.0.16:5000", "unix", UDIR) == ep
    assert parse_endpoint("[::1]:5000", "unix", UDIR) == ep
    assert parse_endpoint("anything:5000", "unix", UDIR) == ep
    assert format_endpoint(ep) == "127.0.0.1:5000"
    assert parse_endpoint("127.0.0.1:5000", "unix", UDIR + "/") == ep


def test_parse_unix_path_forms() -> None:
    ep = parse_endpoint("unix:/tmp/some/peer.sock", "unix", UDIR)
    assert ep == Endpoint("unix", "/tmp/some/peer.sock", 0)
    assert format_endpoint(ep) is None
    assert display_endpoint(ep) == "unix:/tmp/some/peer.sock"
    # A path that is a port-socket of unix_dir is that port, so `wg show` can print it.
    assert parse_endpoint(f"unix:{UDIR}/5000.sock", "unix", UDIR) == Endpoint(
        "unix", f"{UDIR}/5000.sock", 5000
    )
    assert parse_endpoint(f"unix:{UDIR}/5000.sock", "unix", UDIR, dgram=True).port == 0
    assert parse_endpoint(f"unix:{UDIR}/05000.sock", "unix", UDIR).port == 0
    assert parse_endpoint(f"unix:{UDIR}/../x/5000.sock", "unix", UDIR).port == 0


@pytest.mark.parametrize(
    "text",
    ["unix:", "unix:relative.sock", "unix:/a\0b", "127.0.0.1:0", "127.0.0.1:70000", "5000",
     "unix:/" + "a" * 120],
)
def test_parse_unix_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_endpoint(text, "unix", UDIR)


def test_unix_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WGVSOCK_UNIX_DIR", "/srv/wgv")
    assert default_unix_dir() == "/srv/wgv"
    assert parse_endpoint("1.1.1.1:7", "unix").host == "/srv/wgv/7.sock"
    monkeypatch.delenv("WGVSOCK_UNIX_DIR")
    assert default_unix_dir() == "/var/run/wgvsock"


def test_unnamed_unix_endpoint() -> None:
    ep = Endpoint("unix", "", 0, conn_id=4)
    assert format_endpoint(ep) is None
    assert display_endpoint(ep) == "unix:<inbound #4>"
    assert unix_endpoint_from_path("", UDIR) == Endpoint("unix", "", 0)
    assert unix_endpoint_from_path(f"{UDIR}/7.dgram", UDIR, dgram=True).port == 7


def test_unknown_network() -> None:
    with pytest.raises(ValueError, match="unknown network"):
        parse_endpoint("1.2.3.4:5", "quic")


def test_endpoint_is_hashable_and_conn_id_distinguishes() -> None:
    a = Endpoint("inet", "127.0.0.1", 5)
    assert {a: 1}[Endpoint("inet", "127.0.0.1", 5)] == 1
    assert a != Endpoint("inet", "127.0.0.1", 5, conn_id=1)


def test_an_ipv6_zone_must_name_an_interface_and_is_printed_as_its_index() -> None:
    """`wg` resolves every endpoint it is given and fails (1.0.20210914: crashes) on a zone
    it cannot: one naming no interface is refused, and one whose interface went away since is
    left out of `get`."""
    with pytest.raises(ValueError, match="no interface 'nosuchif' on this host"):
        parse_endpoint("[fe80::1%nosuchif]:51820", "tcp")
    ep = parse_endpoint("[fe80::1%lo]:51820", "tcp")
    index = socket.if_nametoindex("lo")
    assert format_endpoint(ep) == f"[fe80::1%{index}]:51820"
    assert format_endpoint(parse_endpoint(f"[fe80::1%{index}]:7", "udp")) == \
        f"[fe80::1%{index}]:7"
    assert format_endpoint(Endpoint("inet", "fe80::1%gone0", 51820)) is None


def test_an_ipv6_zone_is_kept_as_its_index_however_it_was_written() -> None:
    """A name and its number are one endpoint (a configured one must equal the one a reply
    comes from), and the index survives to the socket address: Python sets the scope id to 0
    unless the tuple gives it, whatever the text says, and the kernel then sends link-local
    messages out of whichever interface its routes list first."""
    index = socket.if_nametoindex("lo")
    by_name = parse_endpoint("[fe80::1%lo]:51820", "udp")
    assert by_name == parse_endpoint(f"[fe80::1%{index}]:51820", "udp")
    assert by_name == Endpoint("inet", f"fe80::1%{index}", 51820)
    assert inet_sockaddr(by_name, ipv6=True) == ("fe80::1", 51820, 0, index)
    assert display_endpoint(by_name) == "[fe80::1%lo]:51820"
    # A received message's source, as recvmsg gives it: the same endpoint.
    assert inet_host("fe80::1", index) == f"fe80::1%{index}"
    assert inet_host("::ffff:192.0.2.1") == "192.0.2.1"
    # Addresses without a zone keep scope id 0; an IPv4-only socket cannot take IPv6 at all.
    assert inet_sockaddr(parse_endpoint("[2001:db8::1]:7", "udp"), ipv6=True) == \
        ("2001:db8::1", 7, 0, 0)
    assert inet_sockaddr(parse_endpoint("192.0.2.1:7", "udp"), ipv6=True) == \
        ("::ffff:192.0.2.1", 7)
    with pytest.raises(ValueError, match="IPv4 only"):
        inet_sockaddr(by_name, ipv6=False)


@pytest.mark.parametrize("zone", ["0", "4294967296", "99999999"])
def test_an_ipv6_zone_number_must_name_an_interface(zone: str) -> None:
    with pytest.raises(ValueError, match=f"no interface '{zone}' on this host"):
        parse_endpoint(f"[fe80::1%{zone}]:51820", "udp")


def test_a_vsock_port_out_of_range_names_the_range_taken() -> None:
    # It said "out of range 1-4294967295", and 4294967295 (VMADDR_PORT_ANY) is refused too.
    with pytest.raises(ValueError, match=r"port 0 is out of range 1-4294967294$"):
        parse_endpoint("16:0", "vsock")
    with pytest.raises(ValueError, match="VMADDR_PORT_ANY is not a destination"):
        parse_endpoint("16:4294967295", "vsock")
    with pytest.raises(ValueError, match=r"port 4294967296 is out of range 1-4294967294$"):
        parse_endpoint("vsock://16:4294967296", "vsock")
    assert parse_endpoint("16:4294967294", "vsock").port == 4294967294
