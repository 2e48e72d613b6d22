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

from .netlab import RUN_DIR, Lab, Namespace, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]

# argv: what to break ("tun-3": the TUN reader's first three passes raise; "timers": every
# timer tick raises; "shared-3" / "shared": the first three / every TUN pass made by a
# connection's reader serving the TUN raises), then the daemon's own arguments. The first two
# faults come from the clock, which both loops read on every pass: the loops are compiled
# (mypyc) and cannot be patched, a function they call can. It fires only when the loop itself
# calls: the nearest Python frame (past threading's) is then the loop's own (pure Python) or
# the one NamedThread names for it (compiled), not, say, Survivor's, which reads the clock too.
_FAULTY_DAEMON = r"""
import sys
import threading
import time

from wgvsock import daemon
from wgvsock.device import device

fault, args = sys.argv[1], sys.argv[2:]
real, left = time.monotonic, [3]


def monotonic():
    frame = sys._getframe(1)
    while frame.f_code.co_filename == threading.__file__:  # Thread.run, calling the target
        frame = frame.f_back
    caller = frame.f_code.co_name
    if fault == "tun-3" and caller in ("_tun_loop", "_read_tun") and left[0]:
        left[0] -= 1
        raise RuntimeError("injected TUN reader fault")
    if fault == "timers" and caller == "_timer_loop":
        raise RuntimeError("injected timer fault")
    return real()


# A TUN pass made in a connection's reader (device._TunShare.serve): the device is compiled,
# but may be subclassed from Python, and the daemon imports it when it starts.
class FaultyDevice(device.Device):
    def _tun_pass(self):
        if fault.startswith("shared") and not threading.current_thread().name.endswith("-tun"):
            if fault == "shared" or left[0]:
                left[0] -= 1
                raise RuntimeError("injected fault in a shared TUN pass")
        return super()._tun_pass()


device.Device = FaultyDevice
time.monotonic = monotonic
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


def _faulty_pair(lab: Lab, fault: str) -> tuple[Namespace, str, subprocess.Popen, Path]:
    """A faulty daemon (namespace a, interface ia) connected to a plain one (10.99.0.2)."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    proc, log = _start_faulty(lab, a, ia, fault)
    lab.start_daemon(b, ib, "unix")
    connect_pair(lab, a, ia, "127.0.0.1:7602", b, ib, None, a_port=7601, b_port=7602)
    return a, ia, proc, log


@pytest.mark.parametrize(("fault", "where", "injected"), [
    ("tun-3", "TUN reader", "injected TUN reader fault"),
    # On a stream transport the reader of the trusted connection serves the TUN: a fault
    # there goes through the same survivor rules as one in the TUN reader's own loop.
    ("shared-3", "TUN reader (in a connection's reader)", "injected fault in a shared TUN pass"),
], ids=["tun-reader", "connection-reader"])
def test_a_passing_fault_in_the_tun_reader_is_survived_and_logged_once(
        lab: Lab, fault: str, where: str, injected: str) -> None:
    a, _, proc, log = _faulty_pair(lab, fault)
    # The first passes hit the fault (the TUN reader used to die on it: no tunnel, ever).
    a.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "10.99.0.2", check=False)
    ping(a, "10.99.0.2", count=3)
    assert proc.poll() is None
    text = log.read_text()
    assert text.count(f"{where}: unexpected error (carrying on)") == 1
    assert text.count("Traceback") == 1
    assert injected in text


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


def test_a_fault_that_keeps_firing_in_a_shared_tun_pass_stops_the_daemon(lab: Lab) -> None:
    a, ia, proc, log = _faulty_pair(lab, "shared")
    # Packets keep the faulty passes coming until the survivor gives up (20 within 10 s).
    a.popen("ping", "-i", "0.05", "-W", "1", "10.99.0.2")
    assert proc.wait(15) == 1
    text = log.read_text()
    assert "unexpected errors within 10 s; giving up" in text
    assert "the TUN reader kept failing" in text
    assert not (Path(RUN_DIR) / f"{ia}.sock").exists()
