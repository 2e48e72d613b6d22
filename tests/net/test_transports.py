"""Two of our daemons over each stream and datagram transport, in network namespaces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wgvsock.device.tun import NATIVE_SEGMENTATION

from .daemonctl import only_pid
from .netlab import Keys, Lab, Namespace, connect_pair, csum_errors, ping, wait_for

pytestmark = [pytest.mark.root]


def _iperf(lab: Lab, client, server, addr: str, *args: str, port: int = 5201) -> dict:
    # One port per run in a test: a one-shot server still closing must not take the next client.
    server.popen("iperf3", "-s", "-1", "-B", addr, "-p", str(port))
    wait_for(lambda: server.run("ss", "-ltn", check=False).stdout.count(f":{port}"), 10,
             "iperf3 -s")
    res = client.run("iperf3", "-c", addr, "-p", str(port), "-J", *args, timeout=60)
    return json.loads(res.stdout)


def _pair(lab: Lab, network: str) -> tuple[Namespace, Namespace, str, str]:
    """Our daemons in namespaces a and b over `network` (unix-dgram: unix with -d), a's
    tunnel address 10.99.0.1, b's .2, a ping through; returns (a, b, a's and b's ifname)."""
    a, b = lab.netns("a"), lab.netns("b")
    net, extra = (network.split("-")[0], ["-d"]) if network.endswith("-dgram") else (network, [])
    ia, ib = lab.ifname("a"), lab.ifname("b")
    if net in ("tcp", "udp"):
        lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
        ep = "192.168.77.2:7002"
    else:
        ep = "127.0.0.1:7002"  # unix: host ignored, port names <unix_dir>/7002.sock
    lab.start_daemon(a, ia, net, *extra)
    lab.start_daemon(b, ib, net, *extra)
    connect_pair(lab, a, ia, ep, b, ib, None, a_port=7001, b_port=7002)
    ping(a, "10.99.0.2")
    return a, b, ia, ib


@pytest.mark.parametrize("network", ["unix", "tcp", "unix-dgram", "udp"])
def test_two_daemons_ping_and_iperf(lab: Lab, network: str) -> None:
    a, b, ia, ib = _pair(lab, network)
    ping(b, "10.99.0.1")
    result = _iperf(lab, a, b, "10.99.0.2", "-n", "20M")
    # iperf3 stops counting at the receiver when the sender writes its last byte, so the
    # sender's total is the one to check; TCP guarantees the rest arrived.
    assert result["end"]["sum_sent"]["bytes"] >= 20 * 1024 * 1024
    assert result["end"]["sum_received"]["bits_per_second"] > 1e6
    # Stream transports read super-packets (the peer takes them); datagram transports read
    # them too in a compiled build, which cuts and checksums them in C, else the kernel cuts
    # and checksums before we read.
    want = "on" if network in ("unix", "tcp") or NATIVE_SEGMENTATION else "off"
    for ifname in (ia, ib):
        assert lab.uapi(ifname)["extra"]["wgvsock_tun_offload"] == want, ifname
    assert csum_errors(a) == csum_errors(b) == 0


@pytest.mark.parametrize("offload", ["1", "0"])
def test_udp_jumbo_tunnel_over_a_1500_byte_underlay(lab: Lab, offload: str) -> None:
    """Tunnel MTU 8920 over a 1500-byte veth: messages longer than the path MTU must be sent
    plainly and fragmented by IP (UDP GSO refuses segments above the path MTU), as
    wireguard-go does. Bulk TCP both ways must run, not crawl into the timeout."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
    lab.start_daemon(a, ia, "udp", WGVSOCK_OFFLOAD=offload)
    lab.start_daemon(b, ib, "udp", WGVSOCK_OFFLOAD=offload)
    connect_pair(lab, a, ia, "192.168.77.2:7002", b, ib, None, a_port=7001, b_port=7002)
    for ns, ifname in ((a, ia), (b, ib)):
        ns.ip("link", "set", ifname, "mtu", "8920")
    ping(a, "10.99.0.2", size=8892)  # one full-size packet each way, fragmented underneath
    ping(b, "10.99.0.1", size=8892)
    for port, args in ((5301, ("-n", "20M")), (5302, ("-n", "20M", "-R"))):
        result = _iperf(lab, a, b, "10.99.0.2", *args, port=port)
        assert result["end"]["sum_sent"]["bytes"] >= 20 * 1024 * 1024, args
        assert result["end"]["sum_received"]["bits_per_second"] > 1e6, args
    assert csum_errors(a) == csum_errors(b) == 0


def _offload(lab: Lab, ifname: str) -> str:
    return lab.uapi(ifname)["extra"]["wgvsock_tun_offload"]


@pytest.mark.parametrize("inner", ["ipv4", "ipv6"])
@pytest.mark.parametrize("network", ["tcp", "udp"])
def test_a_peer_with_offload_off_gets_mtu_sized_packets(lab: Lab, network: str,
                                                        inner: str) -> None:
    """WGVSOCK_OFFLOAD=0 on one side: over a stream its hello offers no super-packets, so it
    gets MTU-sized packets with complete checksums, bulk both ways (over UDP every message
    is one packet anyway). The other side reads its TUN with offload and cuts in C (a
    compiled build) while a super-packet holds four segments or more, and lets the kernel
    cut above that MTU; the offload-off side never offloads. TCP over IPv4 and IPv6 inside
    the tunnel (the cut rewrites each segment's IP header: length, ID for IPv4)."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
    lab.start_daemon(a, ia, network)
    lab.start_daemon(b, ib, network, WGVSOCK_OFFLOAD="0")
    a_tun, b_tun = ("10.99.0.1", "10.99.0.2") if inner == "ipv4" else ("fd99::1", "fd99::2")
    connect_pair(lab, a, ia, "192.168.77.2:7002", b, ib, None, a_port=7001, b_port=7002,
                 a_tun=a_tun, b_tun=b_tun)
    ping(a, b_tun)
    cut_in_c = "on" if NATIVE_SEGMENTATION else "off"
    port = 5301
    for mtu, want in ((1420, cut_in_c), (8920, cut_in_c), (65000, "off"), (1420, cut_in_c)):
        for ns, ifname in ((a, ia), (b, ib)):
            ns.ip("link", "set", ifname, "mtu", str(mtu))
        # The device notices a new MTU within a second (its timer thread's watch).
        wait_for(lambda w=want: _offload(lab, ia) == w, 10, f"offload {want} at MTU {mtu}")
        assert _offload(lab, ib) == "off"
        for args in (("-n", "20M"), ("-n", "20M", "-R")):
            result = _iperf(lab, a, b, b_tun, *args, port=port)
            port += 1
            assert result["end"]["sum_sent"]["bytes"] >= 20 * 1024 * 1024, (mtu, args)
    # Every segment arrived checksummed: neither kernel dropped one as corrupt.
    assert csum_errors(a) == csum_errors(b) == 0


def _daemon(ifname: str) -> Path | None:
    """/proc/PID of the daemon serving `ifname`, or None."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and ifname.encode() in (
                    proc / "cmdline").read_bytes().split(b"\0"):
                return proc
        except (FileNotFoundError, ProcessLookupError):
            continue
    return None


def _threads_io(ifname: str) -> dict[str, tuple[int, int]]:
    """Read and write system calls so far of each thread of the daemon serving `ifname`, by
    the thread's name (the kernel keeps 15 bytes of it)."""
    proc = _daemon(ifname)
    assert proc is not None, f"no daemon for {ifname}"
    io = {}
    for task in (proc / "task").iterdir():
        try:  # a thread may end while we look
            fields = dict(line.split(": ") for line in (task / "io").read_text().splitlines())
            io[(task / "comm").read_text().strip()] = (int(fields["syscr"]),
                                                       int(fields["syscw"]))
        except (FileNotFoundError, ProcessLookupError):
            continue
    return io


def test_one_thread_carries_both_directions_while_the_peer_is_connected(lab: Lab) -> None:
    """Over a stream transport the connection's reader also reads the TUN (SharedFile), so a
    packet costs no second thread's wake-up and no GIL hand-over; the TUN reader waits. When
    the connection is gone the TUN reader reads again: the packets for the lost peer still
    reach the engine, which stages them and asks for a handshake (the dialler redials)."""
    a, b, ia, ib = _pair(lab, "tcp")
    before = _threads_io(ia)
    tun = f"{ia}-tun"[:15]
    reader = next(name for name in before if name.startswith("tcp-read-"))  # the connection's
    result = _iperf(lab, a, b, "10.99.0.2", "-n", "20M")
    assert result["end"]["sum_sent"]["bytes"] >= 20 * 1024 * 1024
    after = _threads_io(ia)
    # 20 MiB is at least 320 TUN reads (64 KiB super-packets at most); the connection's
    # reader made nearly all of them: the TUN reader serves only while a send of the reader's
    # could not wait (the socket full), until the rest is sent. (Socket calls are not counted
    # here: only read() and write().)
    by_reader = after[reader][0] - before[reader][0]
    assert by_reader >= 320, (before, after)
    assert (after[tun][0] - before[tun][0]) * 10 < by_reader, (before, after)

    b.run("ip", "link", "del", ib)  # b's daemon stops; its connection closes
    wait_for(lambda: _daemon(ib) is None, 10, "b's daemon to exit")  # (no listener to redial)
    wait_for(lambda: reader not in _threads_io(ia), 10, "a's connection to be gone")
    gone = _threads_io(ia)
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "10.99.0.2", check=False)
    assert _threads_io(ia)[tun][0] >= gone[tun][0] + 3


@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_bulk_both_ways_at_once_does_not_stall(lab: Lab, network: str) -> None:
    """Bulk TCP both ways at once through super-packets (MTU 65000). The thread that carries
    both directions must never wait in a send while its own socket goes unread: when it did,
    each daemon blocked sending to the other until the 5 s send timeout cut the connection,
    and over Unix sockets (small buffers, as vsock's) both directions ran at 2 Mbit/s."""
    a, b, ia, ib = _pair(lab, network)
    for ns, ifname in ((a, ia), (b, ib)):
        ns.ip("link", "set", ifname, "mtu", "65000")
    ping(a, "10.99.0.2")  # full-size now
    result = _iperf(lab, a, b, "10.99.0.2", "--bidir", "-t", "4")
    moved = [s["receiver"]["bytes"] for s in result["end"]["streams"]]
    # Hundreds of MB each way here; a stall moves about one.
    assert len(moved) == 2 and min(moved) > 40 * 1024 * 1024, moved
    for ifname in (ia, ib):
        assert "send timed out" not in lab.log(ifname), lab.log(ifname)


def _threads(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/task").iterdir()))


@pytest.mark.parametrize("network", ["unix", "tcp"])
def test_peers_added_and_removed_with_wg_leave_no_dialler_behind(lab: Lab, network: str) -> None:
    """Peers with endpoints that do not answer (yet), each with a handshake queued for it,
    added and removed with wg(8) while the tunnel carries traffic. Before, each removed
    peer's dialler went on redialling (and would have sent its initiation to whatever came to
    listen there) for redial_idle, 300 s: 50 peers left 50 threads behind."""
    a, _, ia, _ = _pair(lab, network)
    pid = only_pid(a)
    host = "192.168.77.2" if network == "tcp" else "127.0.0.1"
    keys = [Keys().public_b64 for _ in range(50)]
    ping(a, "10.99.0.2")
    baseline = _threads(pid)
    for _ in range(2):
        add = [x for i, k in enumerate(keys) for x in (
            "peer", k, "endpoint", f"{host}:{7100 + i}", "persistent-keepalive", "1")]
        a.wg("set", ia, *add)
        wait_for(lambda: _threads(pid) >= baseline + len(keys), 10, "a dialler for each peer")
        a.wg("set", ia, *[x for k in keys for x in ("peer", k, "remove")])
        wait_for(lambda: _threads(pid) <= baseline, 10, "the removed peers' diallers to stop")
        ping(a, "10.99.0.2")
