from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wgvsock.core.allowedips import AllowedIPs, IPNetwork, parse_prefix


def v4(s: str) -> bytes:
    return ipaddress.IPv4Address(s).packed


def v6(s: str) -> bytes:
    return ipaddress.IPv6Address(s).packed


def ipv4_packet(src: str, dst: str) -> bytes:
    return bytes([0x45]) + bytes(11) + v4(src) + v4(dst)


def ipv6_packet(src: str, dst: str) -> bytes:
    return bytes([0x60]) + bytes(7) + v6(src) + v6(dst)


# --- insert / lookup -------------------------------------------------------------------------


def test_empty_table() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    assert len(t) == 0
    assert t.lookup(v4("10.0.0.1")) is None
    assert t.lookup(v6("fd00::1")) is None
    assert t.entries_for("a") == []


def test_longest_prefix_wins_v4() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "default")
    t.insert("10.0.0.0/8", "eight")
    t.insert("10.1.0.0/16", "sixteen")
    t.insert("10.1.2.3/32", "host")
    assert t.lookup(v4("10.1.2.3")) == "host"
    assert t.lookup(v4("10.1.2.4")) == "sixteen"
    assert t.lookup(v4("10.2.0.1")) == "eight"
    assert t.lookup(v4("192.0.2.1")) == "default"
    assert len(t) == 4


def test_longest_prefix_wins_v6() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("::/0", "default")
    t.insert("fd00::/8", "eight")
    t.insert("fd00:1::/32", "thirtytwo")
    t.insert("fd00:1::7/128", "host")
    assert t.lookup(v6("fd00:1::7")) == "host"
    assert t.lookup(v6("fd00:1::8")) == "thirtytwo"
    assert t.lookup(v6("fdff::1")) == "eight"
    assert t.lookup(v6("2001:db8::1")) == "default"


def test_families_are_separate() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "v4")
    assert t.lookup(v6("::1")) is None
    t.insert("::/0", "v6")
    assert t.lookup(v4("1.2.3.4")) == "v4"
    assert t.lookup(v6("::ffff:1.2.3.4")) == "v6"


def test_host_bits_are_masked() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.5/24", "a")
    assert t.entries_for("a") == [ipaddress.ip_network("10.0.0.0/24")]
    assert t.lookup(v4("10.0.0.200")) == "a"
    t.insert("fd00::1234/64", "b")
    assert t.entries_for("b") == [ipaddress.ip_network("fd00::/64")]
    # The masked and unmasked spellings are the same prefix.
    assert t.remove("10.0.0.99/24", "a")
    assert len(t) == 1


def test_bare_address_is_host_route() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("192.0.2.1", "a")
    t.insert("2001:db8::1", "a")
    assert t.entries_for("a") == [
        ipaddress.ip_network("192.0.2.1/32"),
        ipaddress.ip_network("2001:db8::1/128"),
    ]


def test_network_objects_accepted() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert(ipaddress.IPv4Network("10.0.0.0/8"), "a")
    t.insert(ipaddress.ip_network("fd00::/8"), "a")
    assert t.lookup(v4("10.9.9.9")) == "a"
    assert t.lookup(v6("fd12::1")) == "a"
    assert t.remove(ipaddress.IPv4Network("10.0.0.0/8"), "a")


def test_reinsert_moves_prefix_to_new_peer() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/24", "a")
    t.insert("10.0.1.0/24", "a")
    t.insert("10.0.0.0/24", "b")
    assert t.lookup(v4("10.0.0.1")) == "b"
    assert t.entries_for("a") == [ipaddress.ip_network("10.0.1.0/24")]
    assert t.entries_for("b") == [ipaddress.ip_network("10.0.0.0/24")]
    assert len(t) == 2


def test_reinsert_same_peer_moves_it_to_the_end() -> None:
    # As wireguard-go's and the kernel's tables do (their per-peer lists are what `wg show`
    # prints in order).
    t: AllowedIPs[str] = AllowedIPs()
    for p in ("10.0.0.0/24", "10.0.1.0/24", "10.0.2.0/24"):
        t.insert(p, "a")
    t.insert("10.0.0.0/24", "a")
    assert [str(n) for n in t.entries_for("a")] == ["10.0.1.0/24", "10.0.2.0/24", "10.0.0.0/24"]
    assert t.lookup(v4("10.0.0.1")) == "a"
    assert len(t) == 3


def test_entries_for_is_insertion_order() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    order = ["fd00::/64", "10.0.0.0/8", "0.0.0.0/0", "192.168.0.0/16", "::/0"]
    for p in order:
        t.insert(p, "a")
    t.insert("172.16.0.0/12", "b")
    assert [str(n) for n in t.entries_for("a")] == order
    assert [str(n) for n in t.entries_for("b")] == ["172.16.0.0/12"]


def test_remove_only_if_owned() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/8", "a")
    assert not t.remove("10.0.0.0/8", "b")
    assert t.lookup(v4("10.1.1.1")) == "a"
    assert not t.remove("10.0.0.0/16", "a")
    assert t.remove("10.0.0.0/8", "a")
    assert not t.remove("10.0.0.0/8", "a")
    assert t.lookup(v4("10.1.1.1")) is None
    assert len(t) == 0
    assert t.entries_for("a") == []


def test_remove_falls_back_to_shorter_prefix() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/8", "a")
    t.insert("10.1.0.0/16", "b")
    assert t.lookup(v4("10.1.0.1")) == "b"
    t.remove("10.1.0.0/16", "b")
    assert t.lookup(v4("10.1.0.1")) == "a"
    # A prefix length that comes back into use after being emptied still matches.
    t.insert("10.1.0.0/16", "c")
    assert t.lookup(v4("10.1.0.1")) == "c"


def test_remove_by_peer() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/8", "a")
    t.insert("fd00::/8", "a")
    t.insert("10.1.0.0/16", "b")
    t.remove_by_peer("a")
    assert t.lookup(v4("10.2.0.1")) is None
    assert t.lookup(v4("10.1.0.1")) == "b"
    assert t.lookup(v6("fd00::1")) is None
    assert t.entries_for("a") == []
    assert len(t) == 1
    t.remove_by_peer("nobody")
    assert len(t) == 1


def test_any_hashable_peer() -> None:
    class Peer:
        pass

    p1, p2 = Peer(), Peer()
    t: AllowedIPs[Peer] = AllowedIPs()
    t.insert("10.0.0.0/8", p1)
    t.insert("10.0.0.0/16", p2)
    assert t.lookup(v4("10.0.0.1")) is p2
    assert t.lookup(v4("10.9.0.1")) is p1
    # A falsy peer must still count as a match.
    z: AllowedIPs[int] = AllowedIPs()
    z.insert("10.0.0.0/8", 0)
    assert z.lookup(v4("10.0.0.1")) == 0


def test_none_peer_rejected() -> None:
    t: AllowedIPs[object] = AllowedIPs()
    with pytest.raises(ValueError, match="None"):
        t.insert("10.0.0.0/8", None)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "10.0.0.0/33",
        "fd00::/129",
        "10.0.0.256/8",
        "10.0.0/8",
        "10.0.0.0/-1",
        "10.0.0.0/",
        "nonsense",
        "fe80::1%eth0/64",
        "10.0.0.0/8/8",
        " 10.0.0.0/8",
    ],
)
def test_malformed_prefix(bad: str) -> None:
    t: AllowedIPs[str] = AllowedIPs()
    with pytest.raises(ValueError, match="invalid allowed-ip prefix"):
        t.insert(bad, "a")
    with pytest.raises(ValueError, match="invalid allowed-ip prefix"):
        t.remove(bad, "a")
    assert len(t) == 0


@pytest.mark.parametrize(
    "bad", [None, 167772160, b"\x0a\x00\x00\x00", ipaddress.IPv4Address("1.2.3.4")]
)
def test_prefix_of_wrong_type(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_prefix(bad)  # type: ignore[arg-type]


def test_lookup_wrong_length_is_none() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "a")
    t.insert("::/0", "a")
    for n in (0, 3, 5, 15, 17):
        assert t.lookup(bytes(n)) is None


# --- packets ---------------------------------------------------------------------------------


def test_packet_lookups_v4() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("10.0.0.0/24", "src-peer")
    t.insert("10.0.1.0/24", "dst-peer")
    pkt = ipv4_packet("10.0.0.7", "10.0.1.9") + b"payload"
    assert t.lookup_packet_src(pkt) == "src-peer"
    assert t.lookup_packet_dst(pkt) == "dst-peer"
    assert t.lookup_packet_dst(bytearray(pkt)) == "dst-peer"
    assert t.lookup_packet_src(memoryview(pkt)) == "src-peer"


def test_packet_lookups_v6() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("fd00:a::/64", "src-peer")
    t.insert("fd00:b::/64", "dst-peer")
    pkt = ipv6_packet("fd00:a::1", "fd00:b::2") + b"payload"
    assert t.lookup_packet_src(pkt) == "src-peer"
    assert t.lookup_packet_dst(pkt) == "dst-peer"
    assert t.lookup_packet_dst(memoryview(pkt)) == "dst-peer"


def test_packet_lookups_reject_short_or_unknown() -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "a")
    t.insert("::/0", "a")
    v4pkt = ipv4_packet("1.1.1.1", "2.2.2.2")
    v6pkt = ipv6_packet("::1", "::2")
    for f in (t.lookup_packet_src, t.lookup_packet_dst):
        assert f(v4pkt) == "a"
        assert f(v6pkt) == "a"
        assert f(b"") is None
        assert f(v4pkt[:19]) is None
        assert f(v6pkt[:39]) is None
        # An IPv6 packet shorter than its header but long enough for a v4 one.
        assert f(v6pkt[:20]) is None
        for version in (0, 5, 7, 15):
            assert f(bytes([version << 4]) + v6pkt[1:]) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_packet_lookups_never_raise(pkt: bytes) -> None:
    t: AllowedIPs[str] = AllowedIPs()
    t.insert("0.0.0.0/0", "a")
    t.insert("::/0", "b")
    src, dst = t.lookup_packet_src(pkt), t.lookup_packet_dst(pkt)
    expected = None
    if pkt and pkt[0] >> 4 == 4 and len(pkt) >= 20:
        expected = "a"
    elif pkt and pkt[0] >> 4 == 6 and len(pkt) >= 40:
        expected = "b"
    assert src == dst == expected


# --- property test against a naive model -----------------------------------------------------

PEERS = ["p0", "p1", "p2", "p3"]
# A few base addresses per family so that random prefixes nest and overlap often.
BASES = {
    4: [0x0A000000, 0x0A010000, 0xC0A80100, 0xFFFFFFFF],
    6: [0xFD00 << 112, (0xFD00 << 112) | (1 << 80), (0x2001_0DB8 << 96), (1 << 128) - 1],
}
BITS = {4: 32, 6: 128}


@st.composite
def addresses(draw: st.DrawFn, version: int) -> int:
    bits = BITS[version]
    if draw(st.booleans()):
        return draw(st.integers(0, (1 << bits) - 1))
    base = draw(st.sampled_from(BASES[version]))
    # Flip a few low-ish bits so addresses land both inside and just outside prefixes.
    flips = draw(st.lists(st.integers(0, bits - 1), max_size=3))
    for b in flips:
        base ^= 1 << b
    return base


@st.composite
def networks(draw: st.DrawFn) -> IPNetwork:
    version = draw(st.sampled_from([4, 6]))
    addr = draw(addresses(version))
    plen = draw(st.integers(0, BITS[version]))
    return ipaddress.ip_network((addr, plen), strict=False)


def to_bytes(version: int, addr: int) -> bytes:
    return addr.to_bytes(BITS[version] // 8)


def model_lookup(model: dict[IPNetwork, str], version: int, addr: int) -> str | None:
    ip = ipaddress.ip_address(to_bytes(version, addr))
    best: tuple[int, str] | None = None
    for net, peer in model.items():
        if net.version == version and ip in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, peer)
    return None if best is None else best[1]


ops = st.one_of(
    st.tuples(st.just("insert"), networks(), st.sampled_from(PEERS)),
    st.tuples(st.just("remove"), networks(), st.sampled_from(PEERS)),
    st.tuples(st.just("remove_by_peer"), st.sampled_from(PEERS)),
    st.sampled_from([4, 6]).flatmap(
        lambda v: st.tuples(st.just("lookup"), st.just(v), addresses(v))
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(ops, max_size=60), st.data())
def test_matches_reference_model(operations: list[tuple], data: st.DataObject) -> None:
    t: AllowedIPs[str] = AllowedIPs()
    # Insertion-ordered; a prefix inserted again (moved or not) goes to the end, as in the
    # table's entries_for.
    model: dict[IPNetwork, str] = {}

    def check_lookup(version: int, addr: int) -> None:
        expected = model_lookup(model, version, addr)
        assert t.lookup(to_bytes(version, addr)) == expected
        raw = to_bytes(version, addr)
        if version == 4:
            pkt = bytes([0x45]) + bytes(11) + raw + raw
        else:
            pkt = bytes([0x60]) + bytes(7) + raw + raw
        assert t.lookup_packet_src(pkt) == expected
        assert t.lookup_packet_dst(pkt) == expected
        # bytes are read by index, other buffers by a slice (allowedips._ipv4_at)
        assert t.lookup_packet_dst(bytearray(pkt)) == expected
        assert t.lookup_packet_src(memoryview(pkt)) == expected

    for op in operations:
        if op[0] == "insert":
            _, net, peer = op
            t.insert(net, peer)
            model.pop(net, None)
            model[net] = peer
        elif op[0] == "remove":
            _, net, peer = op
            owned = model.get(net) == peer
            assert t.remove(net, peer) == owned
            if owned:
                del model[net]
        elif op[0] == "remove_by_peer":
            _, peer = op
            t.remove_by_peer(peer)
            model = {n: p for n, p in model.items() if p != peer}
        else:
            _, version, addr = op
            check_lookup(version, addr)
        assert len(t) == len(model)

    # Probe inside, at the edges of, and just outside every prefix ever in the model.
    for net in list(model):
        first = int(net.network_address)
        last = int(net.broadcast_address)
        for addr in (first, last, first - 1, last + 1):
            if 0 <= addr < (1 << BITS[net.version]):
                check_lookup(net.version, addr)
    for _ in range(5):
        version = data.draw(st.sampled_from([4, 6]))
        check_lookup(version, data.draw(addresses(version)))
    for peer in PEERS:
        assert t.entries_for(peer) == [n for n, p in model.items() if p == peer]
