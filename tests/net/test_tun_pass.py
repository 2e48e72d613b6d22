"""Which packets one pass of the TUN reader sends together (Device._tun_pass).

The pass runs on a real TUN in a namespace of its own, with packets the kernel queued on it
before the pass began: a UDP datagram the kernel cut into fragments at the interface's MTU, or
several small datagrams. What the pass hands the transport is recorded per call: one call is
one send (one sendmsg() on a stream transport), and each send is a burst the peer's reader
wakes for.
"""

from __future__ import annotations

import json
import sys

import pytest

from .netlab import Lab

pytestmark = [pytest.mark.root]

# argv: MTU, datagram size, how many datagrams. Prints the packet sizes of each send.
_SCRIPT = r"""
import json
import select
import socket
import subprocess
import sys
import tempfile

from wgvsock.conn.stream import StreamBind
from wgvsock.core.engine import SEND
from wgvsock.device.device import Device
from wgvsock.device.tun import Tun

mtu, size, count = (int(a) for a in sys.argv[1:4])
sends = []


class Recorded(Device):
    # Each TUN packet becomes one message, as a peer with a session would make it.
    def _seal_all(self, packets):
        return [(SEND, "peer", bytes(p)) for p in packets]

    def _perform(self, actions):
        for action in actions:
            sends.append([len(action[2])])

    def _perform_batch(self, actions):
        sends.append([len(a[2]) for a in actions])


# No IPv6 on the link: its router solicitations and reports would join the queue.
for conf in ("all", "default"):
    with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
        f.write("1")
tun = Tun.create("wgpass0")
tun.set_mtu(mtu)
tun.set_up()
subprocess.run(["ip", "addr", "add", "10.77.0.1/24", "dev", "wgpass0"], check=True)
d = tempfile.mkdtemp(prefix="wgpass")
dev = Recorded("wgpass0", StreamBind("unix", unix_dir=d), run_dir=d)
dev._tun_read = lambda: (tun.read(),)
dev._tun_queued.register(tun.fileno(), select.POLLIN)
tun.set_blocking(False)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"x" * size, ("10.77.0.2", 9))
drained = dev._tun_pass()
print(json.dumps({"sends": sends, "drained": drained}))
"""


def _one_pass(lab: Lab, mtu: int, size: int, count: int) -> list[list[int]]:
    ns = lab.netns("p")
    res = ns.run(sys.executable, "-c", _SCRIPT, str(mtu), str(size), str(count),
                 env=lab.env(TMPDIR=str(lab.tmp)), check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["drained"]
    return out["sends"]


def test_jumbo_mtu_bulk_goes_in_one_send_with_its_head(lab: Lab) -> None:
    # 60000 bytes at MTU 8920: seven fragments, all queued before the pass. Sent as the head
    # alone and then the rest, the Go seed's reader woke twice as often at 8920 and the
    # tunnel moved 5-8 % less (bench/README.md, twentieth round).
    sends = _one_pass(lab, 8920, 60000, 1)
    assert len(sends) == 1, sends
    assert len(sends[0]) == 7
    assert max(sends[0]) <= 8920


def test_small_packets_send_the_head_at_once(lab: Lab) -> None:
    # A ping, a request, an ACK: the first packet goes before the pass asks whether more is
    # queued, so its round trip never pays for that question.
    sends = _one_pass(lab, 1420, 100, 3)
    assert sends == [[128], [128, 128]]


def test_a_head_that_fills_a_send_goes_alone(lab: Lab) -> None:
    # At MTU 65000 one packet is a send's worth: it goes at once, not after the next read.
    sends = _one_pass(lab, 65000, 40000, 2)
    assert sends == [[40028], [40028]]
