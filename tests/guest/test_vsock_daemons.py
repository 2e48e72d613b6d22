"""Two of our daemons over real AF_VSOCK sockets (CID 1, vsock_loopback), each in its own
network namespace; and vsock datagrams (``-d``) as far as the guest's kernel offers them.

Runs only inside the QEMU guest (tests/guest/conftest.py boots it): vsock ports are global,
not per namespace, so each test picks its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket

import pytest

from tests.net.daemonctl import only_pid, process_gone, sock_path
from tests.net.lanetrace import lanes_carried, traced
from tests.net.netlab import DAEMON, Lab, connect_pair, iperf3, ping, wait_for
from wgvsock.device.uapi import uapi_set

from .traffic import copy_through, wait_counters_agree

pytestmark = [pytest.mark.root, pytest.mark.guest]

LOOPBACK_CID = 1


def test_two_daemons_over_vsock_stream(lab: Lab) -> None:
    """b lets in only CID 1 (WGVSOCK_ADMIT_CIDS), where every connection here comes from; a
    third daemon that lets in only CID 16 closes one from CID 1 at accept. a is started and
    given an endpoint in the forms the seed's README documents: `wireguard-go-vsock IFNAME`
    (vsock by default) and, over the UAPI, `vsock://CID:PORT`."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    admit = {"WGVSOCK_ADMIT_CIDS": str(LOOPBACK_CID)}
    env = lab.env(WGVSOCK_LOG_FILE=str(lab.tmp / f"{ia}.log"))
    env.pop("WGVSOCK_NETWORK", None)  # no -n and no default from the environment
    res = a.run(DAEMON, ia, env=env, check=False)
    assert res.returncode == 0, res.stderr
    assert lab.uapi(ia)["extra"]["wgvsock_network"] == "vsock"
    lab.start_daemon(b, ib, "vsock", **admit)
    # a dials b in the IPv4-CID form, the one wg(8) can send (32-bit ports: test_vsock_roles).
    b_port = 50102
    _, kb = connect_pair(lab, a, ia, f"0.0.0.{LOOPBACK_CID}:{b_port}", b, ib, None,
                         a_port=50101, b_port=b_port)
    ping(a, "10.99.0.2")
    ping(b, "10.99.0.1")

    wait_counters_agree(a, ia, b, ib)
    # Over real vsock the lanes (device/_lane.c) carry the steady state both ways: strace sees
    # their send and write, not only the ordinary path's sendmsg and writev.
    with traced(a) as on_a, traced(b) as on_b:
        ping(a, "10.99.0.2")
    assert lanes_carried(on_a, only=False) and lanes_carried(on_b, only=False), (on_a, on_b)
    # The accepted connection's port is a 32-bit ephemeral one, which wg(8) cannot print; the
    # readable form names the dialler's CID.
    seen = lab.uapi(ib)["peers"][0]["extra"]["wgvsock_endpoint"]
    assert seen.startswith(f"vsock://{LOOPBACK_CID}:"), seen
    assert lab.uapi(ia)["peers"][0]["extra"]["wgvsock_endpoint"] == f"vsock://1:{b_port}"

    copy_through(lab, a, b, "10.99.0.2", 4 << 20)
    copy_through(lab, b, a, "10.99.0.1", 4 << 20)
    report = iperf3(b, a, "10.99.0.2", "-n", "2M", timeout=120)
    assert report["end"]["sum_sent"]["bytes"] >= 2 << 20

    # A new listen port on b: it listens there instead, and a's connection (to the old port)
    # carries on, not redialled.
    b.wg("set", ib, "listen-port", str(b_port + 10))
    assert lab.uapi(ib)["extra"]["wgvsock_port"] == str(b_port + 10)
    ping(a, "10.99.0.2")
    ping(b, "10.99.0.1")
    assert lab.uapi(ia)["peers"][0]["extra"]["wgvsock_reconnects"] == "0"
    listening = b.run("ss", "-H", "--vsock", "-l", check=False).stdout  # the whole guest's
    assert re.search(rf":{b_port + 10}\b", listening), listening
    assert not re.search(rf":{b_port}\b", listening), listening
    # a is told the new port in the seed's own endpoint form: it dials there.
    b_port += 10
    assert uapi_set(sock_path(ia), f"public_key={kb.public_hex}\n"
                    f"endpoint=vsock://{LOOPBACK_CID}:{b_port}\n") == 0
    ping(a, "10.99.0.2")
    ping(b, "10.99.0.1")
    assert lab.uapi(ia)["peers"][0]["extra"]["wgvsock_endpoint"] == f"vsock://1:{b_port}"

    # The listener goes away and comes back: the dialling side reconnects on its own.
    lab.uapi(ib)  # still answering before the restart
    pid = only_pid(b)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: process_gone(pid), 30, "the listener's daemon to stop")
    lab.start_daemon(b, ib, "vsock", **admit)
    b_keys_file = lab.tmp / f"{ib}.key"
    a_pub = a.wg("show", ia, "public-key").stdout.strip()
    b.wg("set", ib, "private-key", str(b_keys_file), "listen-port", str(b_port),
         "peer", a_pub, "allowed-ips", "10.99.0.1/32")
    b.ip("addr", "add", "10.99.0.2/24", "dev", ib)
    b.ip("link", "set", ib, "up")
    # No keepalive is set: a's next packet makes it redial. Keep asking until it gets through.
    wait_for(lambda: ping(a, "10.99.0.2", count=1, check=False).returncode == 0, 30,
             "a ping through the re-established vsock connection")
    ping(b, "10.99.0.1")
    assert lab.uapi(ib)["extra"]["wgvsock_transport_refused"] == "0"

    c = lab.netns("c")
    ic = lab.ifname("c")
    lab.start_daemon(c, ic, "vsock", WGVSOCK_ADMIT_CIDS="16")
    c.wg("set", ic, "listen-port", "50105")
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as stranger:
        stranger.settimeout(20.0)  # well below the 30 s first-frame deadline
        stranger.connect((LOOPBACK_CID, 50105))
        with contextlib.suppress(ConnectionResetError):  # vsock's reset, or an end
            assert stranger.recv(1) == b""
    assert lab.uapi(ic)["extra"]["wgvsock_transport_refused"] == "1"


def test_vsock_datagram_is_refused_clearly_or_carries_traffic(lab: Lab) -> None:
    """`-d`: where the kernel has no vsock datagram transport (vsock_loopback in Linux 6.1 has
    none) the daemon stops at start with one clear line; where it has one, traffic flows."""
    a = lab.netns("d")
    ia = lab.ifname("d")
    # Logging to a file: with LOG_LEVEL set and none, a background daemon keeps our stdout.
    res = a.run(DAEMON, "-d", ia, env=lab.env(WGVSOCK_LOG_FILE=str(lab.tmp / f"{ia}.log")),
                check=False, timeout=60)
    if res.returncode != 0:
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, res.stderr
        assert "vsock datagram" in lines[0] and "use the stream transport" in lines[0], lines
        assert any(name in lines[0] for name in ("ENODEV", "EOPNOTSUPP", "ESOCKTNOSUPPORT",
                                                 "EAFNOSUPPORT", "EPROTONOSUPPORT")), lines
        assert "Traceback" not in res.stderr
        assert not os.path.exists(f"/var/run/wireguard/{ia}.sock")
        return
    b = lab.netns("e")
    ib = lab.ifname("e")
    lab.start_daemon(b, ib, "vsock", "-d")
    connect_pair(lab, a, ia, f"0.0.0.{LOOPBACK_CID}:50202", b, ib, None, a_port=50201,
                 b_port=50202)
    ping(a, "10.99.0.2")
    ping(b, "10.99.0.1")
