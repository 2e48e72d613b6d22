"""Issue 12, item 10: an MTU above 65503 on a stream transport cannot be framed (a frame holds
65535 bytes, WireGuard adds 32). `ip link set mtu` above it is clamped back by the daemon, and a
packet of exactly the clamped MTU still crosses the tunnel: no silent black hole."""

from __future__ import annotations

import pytest

from wgvsock.conn import make_bind
from wgvsock.conn.framing import MAX_STREAM_MTU
from wgvsock.device.device import Device

from .netlab import Lab, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]


def test_ip_link_mtu_above_the_frame_limit_is_clamped(lab: Lab) -> None:
    assert MAX_STREAM_MTU == 65503
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.start_daemon(a, ia, "unix")
    lab.start_daemon(b, ib, "unix")
    connect_pair(lab, a, ia, "127.0.0.1:7312", b, ib, None, a_port=7311, b_port=7312)
    ping(a, "10.99.0.2", count=1)

    for ns, ifname in ((a, ia), (b, ib)):
        ns.ip("link", "set", ifname, "mtu", "65535")
        wait_for(lambda i=ifname: f"{i}: MTU 65535 cannot be framed on a stream transport; "
                 f"clamped to {MAX_STREAM_MTU}" in lab.log(i), 5, "the daemon to clamp the MTU")
        wait_for(lambda ns=ns, i=ifname: f"mtu {MAX_STREAM_MTU} " in ns.ip(
            "link", "show", "dev", i).stdout, 5, "the interface MTU to be clamped")

    def sent() -> int:
        return lab.uapi(ia)["peers"][0]["tx_bytes"]

    before = sent()
    # 65475 bytes of ICMP payload + 28 of headers = a 65503-byte packet, the clamped MTU,
    # sent unfragmented as 16 + 65503 + 16 = 65535 bytes: the largest frame there is.
    a.run("ping", "-c", "1", "-W", "5", "-M", "do", "-s", "65475", "10.99.0.2")
    assert sent() - before == 65535


def test_device_refuses_a_stream_mtu_it_cannot_frame(tmp_path) -> None:
    bind = make_bind("unix", False, unix_dir=str(tmp_path))
    with pytest.raises(ValueError, match="MTU 65504 is above 65503"):
        Device("wgx-never", bind, mtu=65504).start()  # refused before anything is made
    assert list(tmp_path.iterdir()) == []
