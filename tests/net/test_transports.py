"""Two of our daemons over each stream and datagram transport, in network namespaces."""

from __future__ import annotations

import json

import pytest

from .netlab import Lab, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]


def _iperf(lab: Lab, client, server, addr: str, *args: str, port: int = 5201) -> dict:
    # One port per run in a test: a one-shot server still closing must not take the next client.
    server.popen("iperf3", "-s", "-1", "-B", addr, "-p", str(port))
    wait_for(lambda: server.run("ss", "-ltn", check=False).stdout.count(f":{port}"), 10,
             "iperf3 -s")
    res = client.run("iperf3", "-c", addr, "-p", str(port), "-J", *args, timeout=60)
    return json.loads(res.stdout)


@pytest.mark.parametrize("network", ["unix", "tcp", "unix-dgram", "udp"])
def test_two_daemons_ping_and_iperf(lab: Lab, network: str) -> None:
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
    ping(b, "10.99.0.1")
    result = _iperf(lab, a, b, "10.99.0.2", "-n", "20M")
    # iperf3 stops counting at the receiver when the sender writes its last byte, so the
    # sender's total is the one to check; TCP guarantees the rest arrived.
    assert result["end"]["sum_sent"]["bytes"] >= 20 * 1024 * 1024
    assert result["end"]["sum_received"]["bits_per_second"] > 1e6
    # TUN reads give super-packets only while a stream peer's hello said it takes them;
    # for datagram peers the kernel segments and checksums before we read.
    want = "off" if extra or net == "udp" else "on"
    for ifname in (ia, ib):
        assert lab.uapi(ifname)["extra"]["wgvsock_tun_offload"] == want, ifname


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


def test_a_peer_with_offload_off_gets_mtu_sized_packets(lab: Lab) -> None:
    """WGVSOCK_OFFLOAD=0 on one side: its hello offers no super-packets, so the other side's
    TUN stops handing it any and both run MTU-sized packets, bulk both ways."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
    lab.start_daemon(a, ia, "tcp")
    lab.start_daemon(b, ib, "tcp", WGVSOCK_OFFLOAD="0")
    connect_pair(lab, a, ia, "192.168.77.2:7002", b, ib, None, a_port=7001, b_port=7002)
    ping(a, "10.99.0.2")
    for port, args in ((5301, ("-n", "20M")), (5302, ("-n", "20M", "-R"))):
        result = _iperf(lab, a, b, "10.99.0.2", *args, port=port)
        assert result["end"]["sum_sent"]["bytes"] >= 20 * 1024 * 1024, args
    for ifname in (ia, ib):
        assert lab.uapi(ifname)["extra"]["wgvsock_tun_offload"] == "off", ifname
