"""What a large `set` request costs our daemon in memory, read from the kernel (VmHWM).

The daemon is a UDP one in a fresh namespace whose interface stays down: these tests are about
the UAPI socket, not traffic. A peak is measured from a reset (/proc/PID/clear_refs 5) over
the resident size before; the bounds are generous multiples of what is needed, since they
guard against holding a request many times over, not against a few MiB.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from .daemonctl import only_pid, raw_uapi, sock_path
from .netlab import Keys, Lab, Namespace

pytestmark = [pytest.mark.root]

MiB = 1 << 20


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def _peak_growth(pid: int, action: Callable[[], object]) -> int:
    """How far (bytes) the resident size of PID rose above where it was while ACTION ran."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # the peak starts again from now
    before = _status_kib(pid, "VmRSS")
    action()
    return (_status_kib(pid, "VmHWM") - before) * 1024


def _daemon(lab: Lab) -> tuple[Namespace, str, int]:
    ns = lab.netns("hAmem")
    ifname = lab.ifname("hAm")
    lab.start_daemon(ns, ifname, "udp")
    return ns, ifname, only_pid(ns)


def _allowed_ips(n: int) -> bytes:
    return b"".join(
        b"allowed_ip=10.%d.%d.%d/32\n" % (i >> 16 & 255, i >> 8 & 255, i & 255) for i in range(n)
    )


def _big_refused_set(size: int) -> bytes:
    """A well-formed set of about SIZE bytes (one peer, /32s) whose last line is bad."""
    peer = Keys().public_hex.encode()
    lines = _allowed_ips(size // 20)[:size]
    lines = lines[: lines.rindex(b"\n") + 1]
    return b"set=1\npublic_key=" + peer + b"\n" + lines + b"bogus=1\n\n"


def _peers(ns: Namespace, ifname: str) -> int:
    return len(ns.wg("show", ifname, "dump").stdout.splitlines()) - 1


def test_a_large_set_costs_memory_in_proportion(lab: Lab) -> None:
    """Before: a 15 MiB set, parsed whole, raised the daemon's peak by 260-520 MiB (the
    text, its lines, a list of them, joined again, split again, one IPv4Network object per
    allowed_ip). Now it is parsed as it arrives into a compact pending configuration."""
    ns, ifname, pid = _daemon(lab)
    request = _big_refused_set(15 * MiB)
    replies: list[bytes] = []
    grew = _peak_growth(pid, lambda: replies.append(raw_uapi(sock_path(ifname), request, 120)))
    print(f"one refused 15 MiB set: peak +{grew / MiB:.1f} MiB")
    assert replies == [b"errno=-%d\n\n" % errno.EINVAL]
    assert _peers(ns, ifname) == 0
    assert grew < 64 * MiB


def test_concurrent_large_sets_share_a_bound(lab: Lab) -> None:
    """Four clients each sending a 15 MiB set at once: before, each held its own few hundred
    MiB (1.7 GiB together; 32 clients could take every byte of the host). Now two requests
    past 256 KiB are read at once and the others wait their turn: each is still read to its
    end and answered for itself (its bad last line), none refused for the others."""
    _ns, ifname, pid = _daemon(lab)
    requests = [_big_refused_set(15 * MiB) for _ in range(4)]
    replies: list[bytes] = []

    def send(request: bytes) -> None:
        replies.append(raw_uapi(sock_path(ifname), request, 300))

    def all_at_once() -> None:
        threads = [threading.Thread(target=send, args=(r,)) for r in requests]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    grew = _peak_growth(pid, all_at_once)
    print(f"four refused 15 MiB sets at once: peak +{grew / MiB:.1f} MiB")
    assert replies == [b"errno=-%d\n\n" % errno.EINVAL] * 4
    assert grew < 64 * MiB
    assert raw_uapi(sock_path(ifname), b"set=1\nlisten_port=5\n\n") == b"errno=0\n\n"


def test_an_overlong_line_costs_little(lab: Lab) -> None:
    _ns, ifname, pid = _daemon(lab)
    replies: list[bytes] = []
    request = b"set=1\nendpoint=" + b"1" * (16 * MiB) + b"\n\n"
    grew = _peak_growth(pid, lambda: replies.append(raw_uapi(sock_path(ifname), request, 60)))
    print(f"one 16 MiB line: peak +{grew / MiB:.1f} MiB")
    assert replies == [b"errno=-%d\n\n" % errno.EIO] or replies == [b"<EOF>"]
    assert grew < 16 * MiB


def test_setconf_of_ten_thousand_peers_applies_whole(lab: Lab) -> None:
    """A very large but real configuration (10000 peers, a preshared key, an endpoint, a
    keepalive and three allowed IPs each) passes every limit and is applied completely."""
    ns, ifname, pid = _daemon(lab)
    me = Keys()
    psk = Keys().private_b64
    parts = [f"[Interface]\nPrivateKey = {me.private_b64}\nListenPort = 51820\n"]
    for i in range(10000):
        hi, lo = divmod(i, 250)
        parts.append(
            f"[Peer]\nPublicKey = {Keys().public_b64}\nPresharedKey = {psk}\n"
            f"Endpoint = 192.0.2.{1 + i % 250}:{10000 + i}\nPersistentKeepalive = 25\n"
            f"AllowedIPs = 10.{hi}.{lo}.0/24, fd00:{hi:x}:{lo:x}::/48, 172.16.{hi}.{lo}/32\n"
        )
    conf = lab.tmp / "big.conf"
    conf.write_text("\n".join(parts))
    grew = _peak_growth(pid, lambda: ns.wg("setconf", ifname, str(conf), timeout=300))
    print(f"wg setconf of 10000 peers: peak +{grew / MiB:.1f} MiB")
    dump = ns.wg("show", ifname, "dump", timeout=120).stdout.splitlines()
    assert len(dump) == 10001
    assert all(len(line.split("\t")[3].split(",")) == 3 for line in dump[1:])


def test_an_oversized_set_is_refused_whole_and_the_daemon_serves_on(lab: Lab) -> None:
    """A set past the 16 MiB a request may be gets -EIO (as wireguard-go answers a line past
    its scanner's limit) and a log line naming the limit; nothing of its first 16 MiB is
    applied, and the next client is served."""
    ns, ifname, _pid = _daemon(lab)
    peers = b"".join(
        b"public_key=%064x\nallowed_ip=10.%d.%d.0/24\n" % (i + 1, i >> 8 & 255, i & 255)
        for i in range(17 * MiB // 100)
    )
    request = b"set=1\nlisten_port=4321\n" + peers + b"\n"
    assert raw_uapi(sock_path(ifname), request, 120) == b"errno=-%d\n\n" % errno.EIO
    assert "set request larger than 16 MiB, the most one may be" in lab.log(ifname)
    assert _peers(ns, ifname) == 0
    assert raw_uapi(sock_path(ifname), b"set=1\nlisten_port=5\n\n") == b"errno=0\n\n"
    assert ns.wg("show", ifname, "listen-port").stdout.strip() == "5"
