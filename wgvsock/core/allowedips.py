"""Allowed-IPs table: longest-prefix match from IP addresses to peers (cryptokey routing).

Outbound packets are routed to the peer whose allowed prefix best matches their destination;
inbound packets are accepted only if the best match for their source is the peer that sent them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Final, Generic, TypeVar

__all__ = ["AllowedIPs", "IPNetwork", "parse_prefix"]

P = TypeVar("P")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Bound once: looking up int.from_bytes on every packet is measurable.
_from_bytes: Final = int.from_bytes

# Minimum header sizes: a packet shorter than its fixed header has no trustworthy addresses.
_V4_HEADER: Final = 20
_V6_HEADER: Final = 40


def _ipv4_at(packet: bytes | bytearray | memoryview, offset: int) -> int:
    # mypyc indexes bytes in C; a slice and int.from_bytes are two calls and an object (about
    # 600 instructions a packet). Packets read from the TUN are bytes.
    if isinstance(packet, bytes):
        return (packet[offset] << 24 | packet[offset + 1] << 16 | packet[offset + 2] << 8
                | packet[offset + 3])
    return _from_bytes(packet[offset:offset + 4])


def parse_prefix(prefix: str | IPNetwork) -> IPNetwork:
    """Return ``prefix`` as a network with host bits cleared, as wg(8) does for allowed-ips.

    A bare address means a host route (/32 or /128).
    """
    if isinstance(prefix, ipaddress.IPv4Network | ipaddress.IPv6Network):
        # Network objects clear host bits when built, so they are canonical already.
        return prefix
    if not isinstance(prefix, str):
        raise TypeError(
            f"allowed-ip prefix must be a str or ip network, not {type(prefix).__name__}"
        )
    if "%" in prefix:
        # ipaddress accepts IPv6 scope ids, but they mean nothing in a routing table.
        raise ValueError(f"invalid allowed-ip prefix {prefix!r}: scope ids are not allowed")
    try:
        return ipaddress.ip_network(prefix, strict=False)
    except ValueError as exc:
        raise ValueError(f"invalid allowed-ip prefix {prefix!r}: {exc}") from None


class _Family(Generic[P]):
    """Prefixes of one address family, laid out for a fast lookup.

    ``by_len`` maps a prefix length to a dict of masked address int -> peer. ``order`` holds
    (mask, that dict's bound ``get``) pairs for the lengths in use, longest first, so a lookup is
    one ``&`` and one dict probe per length in use, stopping at the first hit. ``order`` is
    updated in place so that AllowedIPs can hold on to it and skip an attribute lookup per packet;
    a bound ``get`` stays valid while its dict is mutated.
    """

    __slots__ = ("bits", "by_len", "order")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self.by_len: dict[int, dict[int, P]] = {}
        self.order: list[tuple[int, Callable[[int], P | None]]] = []

    def _reorder(self) -> None:
        full = (1 << self.bits) - 1
        self.order[:] = [
            (full ^ ((1 << (self.bits - plen)) - 1), self.by_len[plen].get)
            for plen in sorted(self.by_len, reverse=True)
        ]

    def put(self, plen: int, key: int, peer: P) -> None:
        table = self.by_len.get(plen)
        if table is None:
            table = self.by_len[plen] = {}
            self._reorder()
        table[key] = peer

    def drop(self, plen: int, key: int) -> None:
        table = self.by_len[plen]
        del table[key]
        if not table:
            del self.by_len[plen]
            self._reorder()


class AllowedIPs(Generic[P]):
    """Longest-prefix-match table for IPv4 and IPv6, mapping prefixes to peers.

    A prefix belongs to at most one peer; inserting it again moves it. Peers may be any
    hashable object except None, which lookups use to mean "no match".
    """

    __slots__ = ("_by_peer", "_entries", "_order4", "_order6", "_v4", "_v6", "generation")

    def __init__(self) -> None:
        self._v4: _Family[P] = _Family(32)
        self._v6: _Family[P] = _Family(128)
        self._order4 = self._v4.order
        self._order6 = self._v6.order
        self._entries: dict[IPNetwork, P] = {}
        # Per peer, its prefixes in insertion order (dict used as an ordered set), so that UAPI
        # `get` lists them stably and removing a peer does not scan the whole table.
        self._by_peer: dict[P, dict[IPNetwork, None]] = {}
        # Changes with every insert and removal: whoever keeps a copy of a peer's prefixes
        # (packed_prefixes) knows by it when the copy is stale.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _family(self, net: IPNetwork) -> _Family[P]:
        return self._v4 if net.version == 4 else self._v6

    def insert(self, prefix: str | IPNetwork, peer: P) -> None:
        """Route ``prefix`` (host bits masked off) to ``peer``, taking it from any other peer."""
        if peer is None:
            raise ValueError("peer must not be None")
        net = parse_prefix(prefix)
        self.generation += 1
        old = self._entries.get(net)
        if old is not None:
            if old == peer:
                # To the end of the peer's list, as wireguard-go and the kernel do: `wg show`
                # lists a peer's prefixes in this order.
                owned = self._by_peer[peer]
                del owned[net]
                owned[net] = None
                return
            self._unlink(net, old)
        self._entries[net] = peer
        self._by_peer.setdefault(peer, {})[net] = None
        self._family(net).put(net.prefixlen, int(net.network_address), peer)

    def _unlink(self, net: IPNetwork, peer: P) -> None:
        self.generation += 1
        del self._entries[net]
        owned = self._by_peer[peer]
        del owned[net]
        if not owned:
            del self._by_peer[peer]
        self._family(net).drop(net.prefixlen, int(net.network_address))

    def remove(self, prefix: str | IPNetwork, peer: P) -> bool:
        """Remove ``prefix`` if ``peer`` owns it; return whether anything was removed."""
        net = parse_prefix(prefix)
        old = self._entries.get(net)
        if old is None or old != peer:
            return False
        self._unlink(net, old)
        return True

    def remove_by_peer(self, peer: P) -> None:
        """Remove every prefix of ``peer``."""
        for net in list(self._by_peer.get(peer, ())):
            self._unlink(net, peer)

    def entries_for(self, peer: P) -> list[IPNetwork]:
        """The prefixes of ``peer`` in the order they were (last) inserted."""
        return list(self._by_peer.get(peer, ()))

    def packed_prefixes(self, peer: P) -> bytes:
        """The prefixes of ``peer`` for the lanes' lookup in C (device/_lane.c): for each, its
        IP version, its length and its network address in 16 bytes (an IPv4 one first, then
        zeros). Any of them matching an address is the peer's match only while the table
        holds no other peer's prefixes: the lanes run only then."""
        out = bytearray()
        for net in self._by_peer.get(peer, ()):
            out += bytes((net.version, net.prefixlen))
            out += net.network_address.packed.ljust(16, b"\0")
        return bytes(out)

    # The lookups below run once per packet, so the loop is written out in each rather than
    # shared through a helper call.

    def lookup(self, addr: bytes) -> P | None:
        """The peer of the longest prefix containing ``addr`` (4 or 16 raw bytes), or None."""
        n = len(addr)
        if n == 4:
            order = self._order4
        elif n == 16:
            order = self._order6
        else:
            return None
        ip = _from_bytes(addr)
        for mask, get in order:
            peer = get(ip & mask)
            if peer is not None:
                return peer
        return None

    def lookup_packet_dst(self, packet: bytes | bytearray | memoryview) -> P | None:
        """The peer routing an IP packet's destination; None if the packet is not IPv4/IPv6."""
        return self._lookup_packet(packet, 16, 24)

    def lookup_packet_src(self, packet: bytes | bytearray | memoryview) -> P | None:
        """The peer owning an IP packet's source; None if the packet is not IPv4/IPv6."""
        return self._lookup_packet(packet, 12, 8)

    def _lookup_packet(self, packet: bytes | bytearray | memoryview, at4: int,
                       at6: int) -> P | None:
        """The peer of the longest prefix containing the address at byte AT4 of an IPv4
        header, or AT6 of an IPv6 one."""
        if not packet:
            return None
        version = packet[0] >> 4
        if version == 4:
            if len(packet) < _V4_HEADER:
                return None
            ip = _ipv4_at(packet, at4)
            order = self._order4
        elif version == 6:
            if len(packet) < _V6_HEADER:
                return None
            ip = _from_bytes(packet[at6:at6 + 16])
            order = self._order6
        else:
            return None
        for mask, get in order:
            peer = get(ip & mask)
            if peer is not None:
                return peer
        return None
