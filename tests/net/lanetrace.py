"""What strace shows of the lanes (device/_lane.c) at work in one of our daemons: the send lane
sends each run of frames with send(2) (sendto, MSG_DONTWAIT), the ordinary path with
sendmsg(2); the receive lane writes each packet to the TUN with write(2), the ordinary path
with writev(2). For tests in namespaces and in the QEMU guest (real vsock) alike."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .daemonctl import only_pid
from .netlab import Namespace


def _syscalls(lines: list[str], pid: int) -> dict[str, int]:
    """Counts, from strace's lines, of the calls that tell the lanes from the ordinary path:
    sendto/sendmsg on a socket, write/writev on the TUN."""
    fds: dict[int, str] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds[int(fd.name)] = os.readlink(fd)
        except OSError:
            continue
    counts = {"sendto": 0, "sendmsg": 0, "write_tun": 0, "writev_tun": 0}
    call = re.compile(r"^(?:\[pid\s+\d+\]\s+|\d+\s+)?(\w+)\((\d+),")
    for line in lines:
        m = call.match(line)
        if not m or "resumed" in line:
            continue
        name, fd = m.group(1), fds.get(int(m.group(2)), "")
        if name in ("sendto", "sendmsg") and fd.startswith("socket:"):
            counts[name] += 1
        elif name in ("write", "writev") and fd == "/dev/net/tun":
            counts[f"{name}_tun"] += 1
    return counts


@contextmanager
def traced(ns: Namespace) -> Iterator[dict[str, int]]:
    """strace on the daemon in `ns` (every thread) while the block runs; the dict it yields
    holds the counts of _syscalls once the block is over."""
    pid = only_pid(ns)
    proc = subprocess.Popen(
        ["strace", "-f", "-p", str(pid), "-s", "0", "-e",
         "trace=sendto,sendmsg,write,writev"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    attached = threading.Event()

    def reader() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "attached" in line:
                attached.set()
            lines.append(line)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    counts: dict[str, int] = {}
    try:
        assert attached.wait(10), "strace did not attach"
        yield counts
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        t.join(5)
    counts.update(_syscalls(lines, pid))


def lanes_carried(counts: dict[str, int], *, only: bool = True) -> bool:
    """Whether the counts show the send lane (sendto) and the receive lane (write to the
    TUN) at work; `only`: and the ordinary path not (no sendmsg, no writev to the TUN)."""
    seen = counts["sendto"] > 0 and counts["write_tun"] > 0
    return seen and (not only or counts["sendmsg"] == counts["writev_tun"] == 0)
