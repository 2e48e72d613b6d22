"""Interop with the kernel's own WireGuard, the reference implementation, over UDP.

In the guest, `ip link add ... type wireguard` in one namespace and our daemon (`-n udp`) in
another, on a veth. Only the initiating side is told the other's endpoint, so the handshake can
only start there: once from the kernel, once from us.
"""

from __future__ import annotations

import os

import pytest

from tests.net.netlab import Keys, Lab, iperf3, ping

from .traffic import copy_through, wait_counters_agree

pytestmark = [pytest.mark.root, pytest.mark.guest]

KERNEL_PORT, OUR_PORT = 51001, 51002


@pytest.mark.parametrize("initiator", ["kernel", "ours"])
def test_kernel_wireguard_interop(lab: Lab, initiator: str) -> None:
    k, o = lab.netns("k"), lab.netns("o")
    ik, io = lab.ifname("k"), lab.ifname("o")
    lab.veth(k, "192.168.77.1/24", o, "192.168.77.2/24")
    kk, ko = Keys(), Keys()
    k.ip("link", "add", ik, "type", "wireguard")
    lab.start_daemon(o, io, "udp")
    for ns, ifname, keys, port, other, peer_ip, endpoint, starts in (
        (k, ik, kk, KERNEL_PORT, ko, "10.99.0.2", f"192.168.77.2:{OUR_PORT}",
         initiator == "kernel"),
        (o, io, ko, OUR_PORT, kk, "10.99.0.1", f"192.168.77.1:{KERNEL_PORT}",
         initiator == "ours"),
    ):
        keyfile = lab.tmp / f"{ifname}.key"
        keyfile.write_text(keys.private_b64 + "\n")
        os.chmod(keyfile, 0o600)
        cmd = ["set", ifname, "private-key", str(keyfile), "listen-port", str(port),
               "peer", other.public_b64, "allowed-ips", f"{peer_ip}/32"]
        if starts:
            cmd += ["endpoint", endpoint]
        ns.wg(*cmd)
    for ns, ifname, addr in ((k, ik, "10.99.0.1"), (o, io, "10.99.0.2")):
        ns.ip("addr", "add", f"{addr}/24", "dev", ifname)
        ns.ip("link", "set", ifname, "up")

    first, second = (k, o) if initiator == "kernel" else (o, k)
    first_addr, second_addr = ("10.99.0.2", "10.99.0.1") if initiator == "kernel" else (
        "10.99.0.1", "10.99.0.2")
    ping(first, first_addr)  # only this side knows an endpoint: it must start the handshake
    ping(second, second_addr)
    # The responder learnt the initiator's endpoint from the handshake.
    responder, r_if = (o, io) if initiator == "kernel" else (k, ik)
    learnt = responder.wg("show", r_if, "endpoints").stdout
    assert "192.168.77." in learnt, learnt
    wait_counters_agree(k, ik, o, io)

    copy_through(lab, k, o, "10.99.0.2", 2 << 20)
    copy_through(lab, o, k, "10.99.0.1", 2 << 20)
    report = iperf3(o, k, "10.99.0.2", "-n", "1M", timeout=120)
    assert report["end"]["sum_sent"]["bytes"] >= 1 << 20
    wait_counters_agree(k, ik, o, io)
