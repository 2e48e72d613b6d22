"""Issue 12.6: no long-running thread may die silently.

The daemon runs in a namespace from a small wrapper that injects a fault into one part of it
(monkeypatching, in that process only) and then starts it as usual: a fault that passes must
be survived with its traceback logged once; one that keeps firing must stop the daemon with a
non-zero exit and a clear reason, so that systemd restarts it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .netlab import RUN_DIR, Lab, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]

# argv: what to break ("encapsulate-3": the first three packets from the TUN raise;
# "timers": every timer tick raises), then the daemon's own arguments.
_FAULTY_DAEMON = r"""
import sys
from wgvsock import daemon
from wgvsock.core.engine import Engine

fault, args = sys.argv[1], sys.argv[2:]
if fault == "encapsulate-3":
    original, left = Engine.encapsulate, [3]

    def encapsulate(self, packet, now):
        if left[0]:
            left[0] -= 1
            raise RuntimeError("injected encapsulate fault")
        return original(self, packet, now)

    Engine.encapsulate = encapsulate
elif fault == "timers":
    def update_timers(self, now):
        raise RuntimeError("injected timer fault")

    Engine.update_timers = update_timers
sys.exit(daemon.main(args))
"""


def _start_faulty(lab: Lab, ns, ifname: str, fault: str) -> tuple[subprocess.Popen, Path]:
    log = lab.tmp / f"{ifname}.stderr"
    out = open(log, "wb")  # noqa: SIM115 - the daemon owns it until it exits
    proc = ns.popen(sys.executable, "-c", _FAULTY_DAEMON, fault, "-f", "-n", "unix", ifname,
                    env=lab.env(), stdout=out, stderr=out)
    out.close()
    wait_for(lambda: (Path(RUN_DIR) / f"{ifname}.sock").exists() or proc.poll() is not None,
             10, f"{ifname} to start")
    assert proc.poll() is None, log.read_text()
    return proc, log


def test_a_passing_fault_in_the_tun_reader_is_survived_and_logged_once(lab: Lab) -> None:
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    proc, log = _start_faulty(lab, a, ia, "encapsulate-3")
    lab.start_daemon(b, ib, "unix")
    connect_pair(lab, a, ia, "127.0.0.1:7602", b, ib, None, a_port=7601, b_port=7602)
    # The first packets hit the fault (the TUN reader used to die on it: no tunnel, ever).
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "10.99.0.2", check=False)
    ping(a, "10.99.0.2", count=3)
    assert proc.poll() is None
    text = log.read_text()
    assert text.count("TUN reader: unexpected error (carrying on)") == 1
    assert text.count("Traceback") == 1
    assert "injected encapsulate fault" in text


def test_a_fault_that_keeps_firing_stops_the_daemon_non_zero(lab: Lab) -> None:
    a = lab.netns("a")
    ia = lab.ifname("a")
    proc, log = _start_faulty(lab, a, ia, "timers")
    # 20 failures are allowed within 10 s; a timer tick is 50 ms, so about a second.
    assert proc.wait(15) == 1
    text = log.read_text()
    assert "timers: unexpected error (carrying on)" in text
    assert f"thread {ia}-timers died: RuntimeError: injected timer fault" in text
    assert not (Path(RUN_DIR) / f"{ia}.sock").exists()  # cleaned up on the way out
