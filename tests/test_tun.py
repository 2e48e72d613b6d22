"""TUN device: created inside a throwaway network namespace, exercised with ping and ip(8)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import itertools
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from wgvsock.device import tun as tun_mod
from wgvsock.device.tun import Tun, TunError

T = TypeVar("T")

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

_CLONE_NEWNET = 0x40000000
_counter = itertools.count()


# ---------------------------------------------------------------------------------------------
# Helpers


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"wgvt{os.getpid()}n{next(_counter)}"
    _ip("netns", "add", name)
    try:
        yield name
    finally:
        _ip("netns", "del", name, check=False)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run fn in a helper thread that has joined namespace `ns` (setns is per thread, and
    Python 3.11 has no os.setns). Sockets and TUN devices it creates live in `ns`."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: list[T] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise OSError(e, f"setns: {os.strerror(e)}")
            finally:
                os.close(fd)
            out.append(fn())
        except BaseException as e:
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if err:
        raise err[0]
    return out[0]


@pytest.fixture
def tun_in_ns(netns: str) -> Iterator[tuple[str, Tun]]:
    dev = in_netns(netns, lambda: Tun.create("wgtun0"))
    try:
        yield netns, dev
    finally:
        dev.close()  # before the namespace goes away


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _echo_reply(request: bytes) -> bytes:
    ihl = (request[0] & 0x0F) * 4
    ip = bytearray(request[:ihl])
    icmp = bytearray(request[ihl:])
    ip[12:16], ip[16:20] = request[16:20], request[12:16]
    ip[10:12] = b"\0\0"
    ip[10:12] = _checksum(bytes(ip)).to_bytes(2, "big")
    icmp[0] = 0  # echo reply
    icmp[2:4] = b"\0\0"
    icmp[2:4] = _checksum(bytes(icmp)).to_bytes(2, "big")
    return bytes(ip + icmp)


def _is_echo_request_to(pkt: bytes, dst: str) -> bool:
    return (
        len(pkt) >= 28
        and pkt[0] >> 4 == 4
        and pkt[9] == 1  # ICMP
        and socket.inet_ntoa(pkt[16:20]) == dst
        and pkt[(pkt[0] & 0x0F) * 4] == 8
    )


# ---------------------------------------------------------------------------------------------
# Without root


def test_bad_names() -> None:
    for name in ("", "x" * 16, "a/b", "a b", ".", "..", "a\0b"):
        with pytest.raises(ValueError):
            Tun.create(name)


@pytest.mark.parametrize(("name", "reason"), [
    ("a:b", "contains ':'"),
    ("wg\u00a00", "contains whitespace"),  # UTF-8 c2 a0: the kernel's isspace() takes 0xa0
    ("wg\x7f", "contains a control character"),
    ("wg%s", "misuses '%': it is allowed only once, as %d"),
    ("%d%d", "misuses '%': it is allowed only once, as %d"),
    ("wg%", "misuses '%': it is allowed only once, as %d"),
    ("all", "'all' is reserved"),
    ("default", "'default' is reserved"),
])
def test_names_the_kernel_refuses_are_refused_with_the_reason(
        name: str, reason: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # TUNSETIFF refuses these with EINVAL, which was reported as "an interface of another
    # type has this name" (DEL it takes, but no log line should carry it). Without a device
    # node, a name that got past would fail saying so.
    monkeypatch.setattr(tun_mod, "_TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(ValueError, match=r"^interface name ") as info:
        Tun.create(name)
    assert not isinstance(info.value, TunError)
    assert reason in str(info.value)
    assert name.encode("unicode_escape").decode() in str(info.value)  # escaped, not raw


def test_a_kernel_pattern_name_passes() -> None:
    assert tun_mod._encode_name("wg%d") == b"wg%d"
    assert tun_mod._encode_name("wg-%d.x") == b"wg-%d.x"


def test_missing_device_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tun_mod, "_TUN_PATH", "/nonexistent/net/tun")
    with pytest.raises(TunError, match="does not exist") as info:
        Tun.create("wgtun0")
    assert info.value.errno == errno.ENOENT


def test_permission_denied(monkeypatch: pytest.MonkeyPatch) -> None:
    def deny(*args: object, **kwargs: object) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tun_mod.os, "open", deny)
    with pytest.raises(TunError, match="permission denied") as info:
        Tun.create("wgtun0")
    assert info.value.errno == errno.EACCES


# ---------------------------------------------------------------------------------------------
# In a network namespace (root)


@pytest.mark.root
@needs_root
def test_ping_through_tun(tun_in_ns: tuple[str, Tun]) -> None:
    ns, dev = tun_in_ns
    assert dev.name == "wgtun0"
    dev.set_mtu(1420)
    dev.set_up()
    assert dev.is_up()
    _ip("-n", ns, "addr", "add", "10.99.0.1/24", "dev", dev.name)
    ping = subprocess.Popen(
        ["ip", "netns", "exec", ns, "ping", "-c", "1", "-W", "3", "-n", "10.99.0.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 5
        request = None
        while request is None and time.monotonic() < deadline:
            ready, _, _ = select.select([dev], [], [], 0.5)
            if ready:
                pkt = dev.read()
                # Other traffic (IPv6 router solicitations, MLD) may come first.
                if _is_echo_request_to(pkt, "10.99.0.2"):
                    request = pkt
        assert request is not None, "no ICMP echo request came out of the TUN"
        assert socket.inet_ntoa(request[12:16]) == "10.99.0.1"
        # Answer it through the TUN: ping succeeding proves write() delivers whole packets.
        dev.write(_echo_reply(request))
        out, _ = ping.communicate(timeout=5)
        assert ping.returncode == 0, out
        assert "1 received" in out
    finally:
        if ping.poll() is None:
            ping.kill()
            ping.wait()


@pytest.mark.root
@needs_root
def test_mtu_index_and_removal(tun_in_ns: tuple[str, Tun]) -> None:
    ns, dev = tun_in_ns
    dev.set_mtu(1420)
    assert dev.mtu() == 1420
    # Changes made by others are seen, even though this (main) thread is in another namespace.
    _ip("-n", ns, "link", "set", "dev", dev.name, "mtu", "1300")
    assert dev.mtu() == 1300
    [link] = json.loads(_ip("-n", ns, "-j", "link", "show", "dev", dev.name).stdout)
    assert dev.ifindex() == link["ifindex"]
    assert link["mtu"] == 1300
    assert dev.exists()
    assert not dev.is_up()
    dev.set_up()
    dev.set_up()  # idempotent
    assert (
        "UP" in json.loads(_ip("-n", ns, "-j", "link", "show", "dev", dev.name).stdout)[0]["flags"]
    )
    _ip("-n", ns, "link", "del", dev.name)
    assert not dev.exists()
    # A new interface of the same name is not ours.
    other = in_netns(ns, lambda: Tun.create("wgtun0"))
    try:
        assert other.exists()
        assert not dev.exists()
    finally:
        other.close()
    dev.close()
    dev.close()
    assert dev.closed
    assert not dev.exists()


@pytest.mark.root
@needs_root
def test_interface_goes_away_with_close(tun_in_ns: tuple[str, Tun]) -> None:
    ns, dev = tun_in_ns
    assert _ip("-n", ns, "link", "show", "dev", "wgtun0", check=False).returncode == 0
    dev.close()
    # A non-persistent TUN disappears when its last fd is closed.
    assert _ip("-n", ns, "link", "show", "dev", "wgtun0", check=False).returncode != 0


@pytest.mark.root
@needs_root
def test_create_errors_in_netns(netns: str) -> None:
    # "lo" exists and is not a TUN device.
    with pytest.raises(TunError, match="another type"):
        in_netns(netns, lambda: Tun.create("lo"))
    # A pattern name is expanded by the kernel; the chosen name is reported.
    dev = in_netns(netns, lambda: Tun.create("wgp%d"))
    try:
        assert dev.name == "wgp0"
        assert "wgp0" in repr(dev)
    finally:
        dev.close()


@pytest.mark.root
@needs_root
def test_gso_max_size_goes_to_the_interface(netns: str) -> None:
    dev = in_netns(netns, lambda: Tun.create("wgtun1", offload=True))
    try:
        in_netns(netns, lambda: dev.set_gso_max_size(65000))
        [link] = json.loads(_ip("-n", netns, "-d", "-j", "link", "show", "dev", dev.name).stdout)
        assert link["gso_max_size"] == 65000
        with pytest.raises(OSError, match="gso_max_size on wgtun1: Invalid argument"):
            in_netns(netns, lambda: dev.set_gso_max_size(1 << 31))
    finally:
        dev.close()


@pytest.mark.root
@needs_root
@pytest.mark.parametrize("size", [10, 12])
def test_a_tun_handed_over_with_another_vnet_header_size_is_refused(netns: str,
                                                                    size: int) -> None:
    # A launcher's TUN (WG_TUN_FD) with IFF_VNET_HDR may have had its header size set
    # (TUNSETVNETHDRSZ, e.g. 12 for virtio_net_hdr_mrg_rxbuf): Tun reads and writes 10 bytes
    # of it, so every packet was taken 2 bytes off, and it was adopted all the same.
    def made() -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH22x", b"wgtunv", 0x1 | 0x1000 | 0x4000))
            fcntl.ioctl(fd, 0x400454D8, struct.pack("=i", size))  # TUNSETVNETHDRSZ
        except BaseException:
            os.close(fd)
            raise
        return fd

    fd = in_netns(netns, made)
    try:
        if size == tun_mod.VNET_HDR_LEN:
            assert in_netns(netns, lambda: tun_mod.adoptable(fd, "wgtunv")) is True
        else:
            with pytest.raises(TunError, match="virtio-net header is 12 bytes"):
                in_netns(netns, lambda: tun_mod.adoptable(fd, "wgtunv"))
    finally:
        os.close(fd)


def test_txqueuelen_is_read_and_set(tun_in_ns: tuple[str, Tun]) -> None:
    ns, dev = tun_in_ns
    dev.set_txqueuelen(1234)
    assert dev.txqueuelen() == 1234
    [link] = json.loads(_ip("-n", ns, "-j", "link", "show", "dev", dev.name).stdout)
    assert link["txqlen"] == 1234


def _tcp4(seq: int, ack: int, flags: int, payload: bytes = b"") -> bytes:
    """10.99.0.2:40000 -> 10.99.0.1:5201, checksums complete (split_tso computes them)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, seq, ack, 5 << 4, flags, 65535, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(payload), 1, 0x4000, 64, 6, 0,
                     socket.inet_aton("10.99.0.2"), socket.inet_aton("10.99.0.1"))
    return bytes(tun_mod.split_tso(ip + tcp + payload, 20, 65000)[0])


def _rx_packets(ns: str, ifname: str) -> int:
    [link] = json.loads(_ip("-n", ns, "-s", "-j", "link", "show", "dev", ifname).stdout)
    return link["stats64"]["rx"]["packets"]


def _tcp_from_server(dev: Tun, deadline: float) -> bytes:
    """The next TCP packet to 10.99.0.2 out of the TUN (other traffic skipped)."""
    while time.monotonic() < deadline:
        if select.select([dev], [], [], 0.2)[0]:
            pkt = dev.read()
            if pkt[0] >> 4 == 4 and pkt[9] == 6 and pkt[16:20] == socket.inet_aton("10.99.0.2"):
                return pkt
    raise AssertionError("no TCP packet from the kernel within the deadline")


@contextlib.contextmanager
def _accepted(netns: str, ifname: str) -> Iterator[tuple[Tun, socket.socket, int, float]]:
    """A TUN with offload in `netns` (10.99.0.1/24, MTU 1420) and a TCP connection from
    10.99.0.2:40000 through it, accepted by a listener on 10.99.0.1:5201, the handshake written
    to the TUN by hand: (the TUN, the accepted socket, the server's next sequence number, a
    deadline 10 s away). Everything is closed on leaving."""
    dev = in_netns(netns, lambda: Tun.create(ifname, offload=True))
    listener: socket.socket | None = None
    conn: socket.socket | None = None
    try:
        dev.set_mtu(1420)
        dev.set_up()
        _ip("-n", netns, "addr", "add", "10.99.0.1/24", "dev", dev.name)
        listener = in_netns(netns, lambda: socket.create_server(("10.99.0.1", 5201)))
        listener.settimeout(5)
        deadline = time.monotonic() + 10
        dev.write(_tcp4(1000, 0, 0x02))  # SYN
        syn_ack = _tcp_from_server(dev, deadline)
        server_seq = struct.unpack_from("!I", syn_ack, 24)[0]
        assert syn_ack[33] == 0x12 and struct.unpack_from("!I", syn_ack, 28)[0] == 1001
        dev.write(_tcp4(1001, server_seq + 1, 0x10))  # ACK
        conn, _ = listener.accept()
        conn.settimeout(5)
        yield dev, conn, server_seq + 1, deadline
    finally:
        for s in (conn, listener):
            if s is not None:
                s.close()
        dev.close()


@pytest.mark.root
@needs_root
def test_merged_segments_reach_a_tcp_socket_whole(netns: str) -> None:
    """write_batch merges a run of segments into one GSO write (the headers, then a view of
    each payload, nothing copied together): the kernel's TCP takes it as every byte, in one
    received packet."""
    with _accepted(netns, "wgtun2") as (dev, conn, ack, deadline):
        payload = os.urandom(1380 * 30 + 77)
        segs = [bytes(s) for s in tun_mod.split_tso(_tcp4(1001, ack, 0x18, payload), 20, 1380)]
        [(_, views, mss)] = tun_mod.coalesce_tcp(segs)
        assert (len(views), mss) == (31, 1380)
        before = _rx_packets(netns, dev.name)
        dev.write_batch(segs)
        got = b""
        while len(got) < len(payload):
            chunk = conn.recv(65536)
            assert chunk, "the connection closed early"
            got += chunk
        assert got == payload
        assert _rx_packets(netns, dev.name) - before == 1  # one GSO packet, not 31
        # The kernel acknowledges all of it.
        while True:
            reply = _tcp_from_server(dev, deadline)
            if struct.unpack_from("!I", reply, 28)[0] == 1001 + len(payload):
                break

def _tcp_csum_errors(ns: str) -> int:
    """The namespace's TCP InCsumErrors (/proc/net/snmp)."""
    lines = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp"], check=True,
                           capture_output=True, text=True).stdout.splitlines()
    head, values = (line.split()[1:] for line in lines if line.startswith("Tcp:"))
    return int(values[head.index("InCsumErrors")])


@pytest.mark.root
@needs_root
def test_partial_checksums_are_looked_for_only_when_the_sender_leaves_them(
    netns: str,
) -> None:
    """A segment whose checksum holds the pseudo-header sum (what a CAP_PARTIAL_CSUM sender
    leaves) is marked for the kernel to finish by default. With partial_csum=False (a sender
    that never leaves one) it goes as it is, and the kernel's TCP counts a checksum error;
    complete segments are delivered either way."""
    with _accepted(netns, "wgtun3") as (dev, conn, ack, deadline):
        dev.write(_tcp4(1001, ack, 0x18, b"complete"), partial_csum=False)
        assert conn.recv(100) == b"complete"

        partial = bytearray(_tcp4(1009, ack, 0x18, b"partial!"))
        partial[36:38] = tun_mod._pseudo_sum(partial, 20, len(partial)).to_bytes(2, "big")
        errors = _tcp_csum_errors(netns)
        dev.write(partial, partial_csum=False)
        # The kernel usually counts it within the write; a counter has nothing to wait on.
        while _tcp_csum_errors(netns) == errors:
            assert time.monotonic() < deadline, "the kernel took a segment it should refuse"
            time.sleep(0.01)
        dev.write(partial)
        assert conn.recv(100) == b"partial!"


@pytest.mark.root
@needs_root
def test_read_offload_hands_out_whole_packets_small_and_large(netns: str) -> None:
    """Small packets come out of read_offload as bytes, large ones as a view past the virtio-net
    header (tun._VIEW_FROM); either way the whole packet, and a partial checksum finishes."""
    dev = in_netns(netns, lambda: Tun.create("wgtunv", offload=True))
    sock: socket.socket | None = None
    try:
        dev.set_mtu(9000)
        dev.set_up()
        _ip("-n", netns, "addr", "add", "10.99.0.1/24", "dev", dev.name)
        sock = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        deadline = time.monotonic() + 10
        starts: list[int] = []
        cases = ((100, bytes), (tun_mod._VIEW_FROM + 100, memoryview), (8000, memoryview))
        for size, kind in cases:
            payload = os.urandom(size)
            sock.sendto(payload, ("10.99.0.2", 9))
            while True:
                assert time.monotonic() < deadline, "no UDP packet out of the TUN"
                if not select.select([dev], [], [], 0.2)[0]:
                    continue
                packet, mss, start, offset = dev.read_offload()
                if packet[0] >> 4 == 4 and packet[9] == 17:
                    break
            assert isinstance(packet, kind), (size, type(packet))
            assert mss == 0
            assert len(packet) == struct.unpack_from("!H", packet, 2)[0] == 28 + size
            assert bytes(packet[16:20]) == socket.inet_aton("10.99.0.2")
            assert bytes(packet[28:]) == payload
            starts.append(start)
            if start:  # the UDP checksum left partial: finished, it verifies
                done = tun_mod.complete_checksum(packet, start, offset)
                pseudo = bytes(done[12:20]) + struct.pack("!BBH", 0, 17, 8 + size)
                assert _checksum(pseudo + bytes(done[20:])) in (0, 0xFFFF)
        assert all(starts), "the kernel left these UDP checksums to the TUN's reader"
    finally:
        if sock is not None:
            sock.close()
        dev.close()
