"""Hostile datagrams on a daemon's UDP port, which anyone on the network can reach: junk of
every size and type, replayed and forged messages from another address, and a flood of
handshake initiations that pass mac1 (their sender knows only the daemon's public key).

Namespaces: a and b run our daemons (`-n udp`) over a veth, c is the attacker, joined to b
by a veth of its own. Payloads are made in the test and sent from c by a small script.
"""

from __future__ import annotations

import base64
import json
import random
import re
import statistics
import subprocess
import sys
import time

import pytest

from wgvsock.core.crypto import generate_private_key
from wgvsock.core.engine import SEND, Engine
from wgvsock.device.device import _ANSWER_LIMIT, _LOAD_WINDOW

from .netlab import Lab, Namespace, connect_pair, ping

pytestmark = [pytest.mark.root]

B_ADDR = "192.168.78.2"
B_PORT = 7002

# argv: host, port; stdin: a JSON list of hex payloads, each sent once, in order.
_SEND = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for h in json.load(sys.stdin):
    s.sendto(bytes.fromhex(h), (sys.argv[1], int(sys.argv[2])))
"""

# argv: host, port, rate (messages a second), seconds; stdin: a JSON list of hex payloads,
# sent round-robin from one socket. Prints "ready" once it starts, and at the end a JSON
# count of the replies by "type-length" and how many messages went.
_FLOOD = r"""
import collections, json, socket, sys, time
host, port, rate, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
msgs = [bytes.fromhex(h) for h in json.load(sys.stdin)]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
replies = collections.Counter()
sent = 0

def drain():
    while True:
        try:
            d = s.recv(70000)
        except BlockingIOError:
            return
        replies[f"{d[0]}-{len(d)}"] += 1

print("ready", flush=True)
start = time.monotonic()
while (elapsed := time.monotonic() - start) < seconds:
    while sent < elapsed * rate:
        try:
            s.sendto(msgs[sent % len(msgs)], (host, port))
        except BlockingIOError:
            pass
        sent += 1
    drain()
    time.sleep(0.001)
time.sleep(0.5)
drain()
print(json.dumps({"sent": sent, "replies": replies}), flush=True)
"""


# argv: port. In the namespace of the daemon under attack: the payloads of the UDP datagrams
# that arrive for `port` (IPv4), printed as a JSON list of hex once stdin closes.
_SNIFF = r"""
import json, select, socket, sys
port = int(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(0x0800))
seen = []
print("ready", flush=True)
while True:
    ready = select.select([s, sys.stdin], [], [])[0]
    if sys.stdin in ready:
        break
    pkt, addr = s.recvfrom(70000)
    start = (pkt[0] & 15) * 4
    if addr[2] != socket.PACKET_OUTGOING and pkt[9] == 17 and \
            int.from_bytes(pkt[start + 2 : start + 4], "big") == port:
        seen.append(pkt[start + 8 :].hex())
print(json.dumps(seen), flush=True)
"""


def _lab(lab: Lab) -> tuple[Namespace, Namespace, Namespace, str, str]:
    """a and b joined by a tunnel (a dials b at 192.168.77.2), c beside b at 192.168.78.1."""
    a, b, c = lab.netns("a"), lab.netns("b"), lab.netns("c")
    lab.veth(a, "192.168.77.1/24", b, "192.168.77.2/24")
    lab.veth(c, "192.168.78.1/24", b, f"{B_ADDR}/24")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.start_daemon(a, ia, "udp")
    lab.start_daemon(b, ib, "udp")
    connect_pair(lab, a, ia, f"192.168.77.2:{B_PORT}", b, ib, None, a_port=7001, b_port=B_PORT)
    ping(a, "10.99.0.2", count=2)
    return a, b, c, ia, ib


def _initiations(public: bytes, count: int) -> list[bytes]:
    """Initiations from a stranger to the holder of `public`: they pass mac1."""
    engine = Engine(generate_private_key())
    peer = engine.add_peer(public)
    peer.endpoint = "b"
    out = []
    for i in range(count):
        peer.handshake.last_sent = None  # (the engine's own limit on initiations)
        ((kind, _, msg),) = engine.initiate_handshake(peer, 1000.0 + i)
        assert kind == SEND
        out.append(bytes(msg))
    return out


def _public_key(ns: Namespace, ifname: str) -> bytes:
    return base64.b64decode(ns.wg("show", ifname, "public-key").stdout.strip())


def _pings(ns: Namespace, addr: str, count: int) -> list[float]:
    """The round trips (ms) of those of `count` pings 0.1 s apart that came back."""
    out = ns.run("ping", "-c", str(count), "-i", "0.1", "-W", "1", addr, check=False).stdout
    return [float(t) for t in re.findall(r"time=([\d.]+) ms", out)]


def _send(ns: Namespace, messages: list[bytes]) -> None:
    ns.run(sys.executable, "-c", _SEND, B_ADDR, str(B_PORT),
           input=json.dumps([m.hex() for m in messages]))


def _peer_view(ns: Namespace, ifname: str) -> tuple[str, str]:
    """The peer's endpoint and transfer counters as `wg` shows them."""
    return (ns.wg("show", ifname, "endpoints").stdout, ns.wg("show", ifname, "transfer").stdout)


def test_malformed_datagrams_are_dropped_without_a_word(lab: Lab) -> None:
    """Every type (and reserved bytes set) at every wrong size, handshake sizes one byte off,
    transport messages shorter than a header and a tag, 65507 bytes of each, an initiation
    that passes mac1 from a stranger: each is dropped, without a line in the log (they come
    as fast as anyone sends them), and the tunnel and the peer's endpoint stay as they were.
    wireguard-go reads the type as a whole u32 too: a reserved byte set makes it unknown."""
    a, b, c, _ia, ib = _lab(lab)
    rng = random.Random(7)
    junk: list[bytes] = [b""]
    for kind in (0, 1, 2, 3, 4, 5, 255):
        junk += [bytes([kind]) + bytes(n) for n in range(4)]  # 1-4 bytes
        junk.append(bytes([kind, 0, 0, 0]) + rng.randbytes(65503))
    for kind, size in ((1, 148), (2, 92), (3, 64), (4, 32)):
        junk += [bytes([kind, 0, 0, 0]) + rng.randbytes(n - 4) for n in (size - 1, size, size + 1)]
    junk += [bytes([4, 0, 0, 0]) + rng.randbytes(n) for n in (12, 27)]  # header; tag - 1
    [stranger] = _initiations(_public_key(b, ib), 1)
    junk += [stranger, stranger[:3] + b"\x01" + stranger[4:], stranger[:1] + b"\x01" + stranger[2:]]
    before, log_before = _peer_view(b, ib), lab.log(ib)
    _send(c, junk * 3)
    ping(a, "10.99.0.2", count=2)  # after the junk: b's reader has taken it all
    assert lab.log(ib) == log_before
    endpoint, transfer = _peer_view(b, ib)
    assert endpoint == before[0]
    assert transfer != before[1]  # the pings, and nothing else, moved it


def test_replayed_or_forged_messages_from_elsewhere_do_not_move_the_peer(lab: Lab) -> None:
    """What a sent b (its initiation, its transport messages), sent again from c, and each
    with a bit flipped: the initiation's timestamp does not grow, the transport counters were
    seen, the flipped ones do not authenticate. None may point b's peer at c."""
    a, b, c, ia, ib = _lab(lab)
    sniffer = b.popen(sys.executable, "-c", _SNIFF, str(B_PORT),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert sniffer.stdin is not None and sniffer.stdout is not None
    assert sniffer.stdout.readline().strip() == "ready"
    # A new handshake, and data, for the sniffer to see.
    b_key = b.wg("show", ib, "public-key").stdout.strip()
    a.wg("set", ia, "peer", b_key, "remove")
    a.wg("set", ia, "peer", b_key, "allowed-ips", "10.99.0.2/32", "endpoint",
         f"192.168.77.2:{B_PORT}")
    ping(a, "10.99.0.2", count=2)
    sniffer.stdin.close()
    seen = [bytes.fromhex(h) for h in json.loads(sniffer.stdout.readline())]
    assert {m[0] for m in seen} >= {1, 4}, [m[0] for m in seen]
    flipped = [m[:-1] + bytes([m[-1] ^ 1]) for m in seen]
    before = _peer_view(b, ib)
    _send(c, seen + flipped)
    ping(a, "10.99.0.2", count=1)
    assert b.wg("show", ib, "endpoints").stdout == before[0]
    assert b.wg("show", ib, "endpoints").stdout.split()[1] == "192.168.77.1:7001"


def test_a_flood_of_initiations_that_pass_mac1_leaves_the_tunnel_its_data(lab: Lab) -> None:
    """One source sends 40000 initiations a second that pass mac1 (anyone who knows b's
    public key can): b is under load and answers cookie replies, never longer than what came.
    Before, it answered every one, on the thread that also carries the tunnel's data: from
    about 20000 a second that thread was full, and a's pings waited behind the flood in the
    socket's buffer (0.5-0.9 s) or were lost (10-60 %). Now a window answers so many and drops
    the rest, as wireguard-go's full handshake queue does; but not so that the flooder could
    take them all: a's new handshake gets a cookie reply, and its retry with it a response."""
    a, b, c, ia, ib = _lab(lab)
    seconds = 15
    flood = c.popen(sys.executable, "-c", _FLOOD, B_ADDR, str(B_PORT), "40000", str(seconds),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert flood.stdin is not None and flood.stdout is not None
    # Half with a zero mac2, as an initiator without a cookie sends, half with a made-up one,
    # which takes a hash to refuse.
    made = _initiations(_public_key(b, ib), 50)
    made[1::2] = [m[:-16] + random.randbytes(16) for m in made[1::2]]
    flood.stdin.write(json.dumps([m.hex() for m in made]))
    flood.stdin.close()
    assert flood.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # the flood well under way: b under load, its socket's queue as full as it gets
    rtts = _pings(a, "10.99.0.2", 20)
    # a starts again (its peer removed and set anew): a new handshake, through the flood.
    b_key = b.wg("show", ib, "public-key").stdout.strip()
    a.wg("set", ia, "peer", b_key, "remove")
    a.wg("set", ia, "peer", b_key, "allowed-ips", "10.99.0.2/32", "endpoint",
         f"192.168.77.2:{B_PORT}")
    started = time.monotonic()
    # A ping starts it; the first attempt gets a cookie reply, the retry (5 s on) with it a
    # response.
    through = False
    while not through and time.monotonic() - started < 12:
        through = a.run("ping", "-c", "1", "-W", "1", "10.99.0.2", check=False).returncode == 0
    took = time.monotonic() - started
    assert flood.poll() is None  # the flood went on all along
    report = json.loads(flood.stdout.readline())
    flood.wait(10)
    print(f"pings {len(rtts)}/20, round trips {sorted(rtts)} ms; handshake after {took:.1f} s;"
          f" flood {report}")
    assert through, f"no handshake in {took:.0f} s"
    assert report["sent"] > 250_000  # the flood was one
    assert set(report["replies"]) == {"3-64"}, report  # cookie replies only, 64 < 148 bytes
    assert report["replies"]["3-64"] <= 2 * _ANSWER_LIMIT * (seconds + 0.5) / _LOAD_WINDOW
    # (The median: on a busy machine a ping or two may wait for the CPU a few hundred ms.)
    assert len(rtts) == 20 and statistics.median(rtts) < 50, rtts
