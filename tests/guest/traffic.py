"""Traffic checks the guest tests share."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable

from tests.net.netlab import SLOWDOWN, Lab, Namespace, wait_for


def peer_counters(ns: Namespace, ifname: str) -> tuple[int, int]:
    """(rx, tx) bytes of the interface's only peer, from `wg show dump` (ours or the
    kernel's: the same tool reads both)."""
    lines = ns.wg("show", ifname, "dump").stdout.strip().splitlines()
    fields = lines[1].split("\t")
    return int(fields[5]), int(fields[6])


def wait_counters_agree(
    a: Namespace, ia: str, b: Namespace, ib: str,
    read: Callable[[Namespace, str], tuple[int, int]] = peer_counters,
) -> None:
    """What each side sent, the other received: exactly, once nothing is in flight. `read`
    gives an interface's (rx, tx) for its one peer."""

    last: list[tuple[int, int]] = []

    def agree() -> bool:
        last[:] = [read(a, ia), read(b, ib)]
        (arx, atx), (brx, btx) = last
        return arx == btx and atx == brx and arx > 0 and atx > 0

    # A keepalive may still be on its way: patience, stretched under the guest's slow CPU.
    try:
        wait_for(agree, 15 * SLOWDOWN, f"equal transfer counters on {ia} and {ib}")
    except TimeoutError as e:
        raise AssertionError(f"{e}; last (rx, tx): {ia} {last[0]}, {ib} {last[1]}") from None


def copy_through(lab: Lab, src: Namespace, dst: Namespace, addr: str, size: int) -> None:
    """Sends `size` random bytes from `src` to a listener on `addr` in `dst` over TCP (socat
    at both ends) and checks they arrive whole."""
    data = os.urandom(size)
    sent, got = lab.tmp / f"sent-{src.name}", lab.tmp / f"got-{dst.name}"
    sent.write_bytes(data)
    got.unlink(missing_ok=True)
    server = dst.popen("socat", "-u", f"TCP-LISTEN:7777,bind={addr},reuseaddr",
                       f"CREATE:{got}")
    wait_for(lambda: f"{addr}:7777" in dst.run("ss", "-ltnH", check=False).stdout, 30,
             "the socat listener")
    src.run("socat", "-u", f"OPEN:{sent}", f"TCP:{addr}:7777", timeout=120)
    assert server.wait(60) == 0
    assert hashlib.sha256(got.read_bytes()).digest() == hashlib.sha256(data).digest()
