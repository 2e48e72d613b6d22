"""`make demo` (python -m wgvsock.ui.demo) end to end, as the README's first command runs it:
without a terminal, every stage reports success and nothing is left behind; in a terminal
(tmux), what a newcomer reads fits the terminal and the dashboard is the one promised."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgvsock.ui.demo import NAMESPACES, STATE_FILE

from .netlab import run, wait_for

pytestmark = [pytest.mark.root]

REPO = Path(__file__).resolve().parents[2]


def _nothing_left() -> None:
    listed = run("ip", "netns", "list").stdout.split()
    assert not [n for n in NAMESPACES if n in listed]
    assert not [n for n in NAMESPACES if (Path("/etc/netns") / n).exists()]


def test_the_demo_runs_every_stage_and_leaves_nothing() -> None:
    res = subprocess.run([sys.executable, "-m", "wgvsock.ui.demo", "--iperf-seconds", "1"],
                         capture_output=True, text=True, timeout=240, cwd=REPO)
    out = res.stdout
    assert res.returncode == 0, res.stderr + out[-3000:]
    for line in (
        "Ctrl-C stops it at any point",  # how to stop, said before anything starts
        "hello from the internet",  # egress through the parent's NAT
        "hello from the enclave",  # ingress through the parent's port
        "-> BLOCKED (no answer within 2 s)",  # the deny list
        "denied tcp 198.51.100.3:80",  # what the parent recorded it refused
        "DNS refused ads.demo.test",  # the name the parent's DNS forwarder refused
        "Mbit/s",  # iperf3 both ways
        "wg0@parent  parent (profile demo)",  # the dashboard
        "nothing left behind",
        "== What next",
        "--live 600",
    ):
        assert line in out, line
    # Where the logs are while it runs (they go with the temporary directory).
    assert re.search(r"logs: /tmp/wgvsock-demo-\S+/\{parent,enclave,internet,dnsmasq\}\.log",
                     out), out
    assert "WARNING" not in out
    _nothing_left()


def test_what_the_demo_says_of_the_enclave_it_stopped() -> None:
    """It said "it passed it to its app" whatever happened, also when SIGTERM came before the
    app was started (exit 143) or before `enclave up` could take it (killed, -15)."""
    from wgvsock.ui.demo import enclave_stop_note

    assert enclave_stop_note(143, app_started=True) == \
        "it passed it to its app and exited 143 (128 + SIGTERM, as its app did)"
    assert enclave_stop_note(143, app_started=False) == \
        "it stopped before starting its app and exited 143"
    assert enclave_stop_note(-15, app_started=False) == \
        "SIGTERM ended it before it could take the signal (it had started nothing yet)"
    assert enclave_stop_note(1, app_started=True) == "it exited 1"


class _Tmux:
    """A private tmux server (its own socket), so that nobody else's sessions are touched."""

    def __init__(self) -> None:
        self.server = f"wgvsock-test-demo-{os.getpid()}"
        self.socket_path = ""

    def __call__(self, *args: str, check: bool = True) -> str:
        return run("tmux", "-L", self.server, *args, check=check).stdout

    def start(self, command: str, width: int, height: int) -> None:
        self("new-session", "-d", "-s", "demo", "-x", str(width), "-y", str(height), command)
        self.socket_path = self("display-message", "-p", "#{socket_path}").strip()

    def history(self) -> str:
        # -J joins the lines the terminal wrapped: what was printed, line by line.
        return self("capture-pane", "-p", "-J", "-S", "-", "-t", "demo", check=False)

    def kill(self) -> None:
        self("kill-server", check=False)
        if self.socket_path:
            Path(self.socket_path).unlink(missing_ok=True)


@pytest.fixture
def tmux() -> Iterator[_Tmux]:
    t = _Tmux()
    try:
        yield t
    finally:
        t.kill()
        # A demo still running when the server went got SIGHUP; its clean-up is awaited.
        wait_for(lambda: not [n for n in NAMESPACES
                              if n in run("ip", "netns", "list").stdout.split()],
                 60, "the demo's clean-up")


def _demo_in_tmux(tmux: _Tmux, width: int, height: int, *env: str) -> str:
    """The demo in a terminal of WIDTH x HEIGHT; everything it printed, once it exited 0."""
    demo = shlex.join(["env", *env, sys.executable, "-m", "wgvsock.ui.demo", "--live", "2",
                       "--iperf-seconds", "0"])
    tmux.start(f"sh -c {shlex.quote(f'cd {REPO} && {demo}; echo EXITED rc=$?; sleep 600')}",
               width, height)
    out = wait_for(lambda: (h := tmux.history()) and "EXITED" in h and h, 180,
                   "the demo to end")
    assert "EXITED rc=0" in out, out[-3000:]
    return out


def test_in_an_80_column_terminal_the_narration_fits(tmux: _Tmux) -> None:
    """Its lines were written for a wide terminal: at 80 columns the terminal cut them
    anywhere ("masque|rade", "198.|51.100.2") and every continuation began at column 0."""
    out = _demo_in_tmux(tmux, 80, 24)
    narration = out.split("== The dashboard")[0] + out.split("== Cleaning up")[1]
    too_long = [line for line in narration.splitlines() if len(line) > 80]
    assert not too_long, "\n".join(too_long)
    # Wrapped, not cut: a continuation is indented under its line, words are whole.
    assert "masquerade" in narration and "it saw the parent's address" in narration
    _nothing_left()


def test_on_a_dumb_terminal_the_dashboard_is_printed_not_live(tmux: _Tmux) -> None:
    """With TERM=dumb the live view draws nothing (rich renders only to terminals that can
    move the cursor): the demo announced it "for 2 s (q or Ctrl-C ends it)" and showed an
    unchanged screen until then. There it prints its two snapshots, as without a terminal."""
    out = _demo_in_tmux(tmux, 160, 48, "TERM=dumb")
    assert "== The dashboard: wgvsock status, both sides (two snapshots)" in out, out[-3000:]
    assert len(re.findall(r"^wg0@parent  parent \(profile demo\)", out, re.M)) == 2
    _nothing_left()


def test_sigterm_in_the_dashboard_stops_the_demo(tmux: _Tmux) -> None:
    """SIGTERM (`kill`, a supervisor's stop) ended only the live view: the demo went on to its
    last frame and exited 0, where at any other moment SIGTERM interrupts it (130)."""
    demo = shlex.join([sys.executable, "-m", "wgvsock.ui.demo", "--live", "120",
                       "--iperf-seconds", "0"])
    tmux.start(f"sh -c {shlex.quote(f'cd {REPO} && {demo}; echo EXITED rc=$?; sleep 600')}",
               160, 48)
    wait_for(lambda: "q quits" in tmux("capture-pane", "-p", "-t", "demo"), 120,
             "the live dashboard")
    pid = json.loads(STATE_FILE.read_text())["pid"]
    os.kill(pid, signal.SIGTERM)
    out = wait_for(lambda: (h := tmux.history()) and "EXITED" in h and h, 60, "the demo to end")
    assert "EXITED rc=130" in out, out[-3000:]
    assert "interrupted" in out and "last frame" not in out
    assert "nothing left behind" in out
    _nothing_left()


def _remove_leftovers() -> None:
    """What a demo killed in a test may leave, removed whatever the demo does next."""
    listed = run("ip", "netns", "list", check=False).stdout.split()
    for name in NAMESPACES:
        if name in listed:
            for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", name, check=False)
        shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
    with contextlib.suppress(OSError, ValueError):
        tmp = Path(json.loads(STATE_FILE.read_text())["tmp"])
        if tmp.name.startswith("wgvsock-demo-"):
            shutil.rmtree(tmp, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)


# Two demos held at the gate (a file appearing) and let go together.
_AT_THE_GATE = """\
import sys, time
from pathlib import Path
from wgvsock.ui import demo
while not Path(sys.argv[1]).exists():
    time.sleep(0.001)
sys.exit(demo.main(["--live", "0", "--iperf-seconds", "0"]))
"""


def test_two_demos_started_together_one_runs_the_other_refuses(tmp_path: Path) -> None:
    """Each looked for a running demo, found none and went on: the later one failed on
    `ip netns add` ("File exists"), warned that the other's namespace was "still present",
    and removed the other's state file, so that a third run would take the running demo's
    namespaces for leftovers and remove them."""
    gate = tmp_path / "go"
    procs: list[subprocess.Popen] = []
    try:
        procs += [subprocess.Popen([sys.executable, "-c", _AT_THE_GATE, str(gate)],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  cwd=REPO) for _ in range(2)]
        time.sleep(2)  # both imported and waiting (a late one would only refuse more surely)
        gate.touch()
        # communicate, not wait: a demo whose output filled the pipe would never end.
        outs = [p.communicate(timeout=180)[0] for p in procs]
        results = sorted((p.returncode, out) for p, out in zip(procs, outs, strict=True))
    finally:
        for p in procs:
            p.kill()
        _remove_leftovers()
    (ran, out_ran), (refused, out_refused) = results
    assert (ran, refused) == (0, 2), f"exits {ran}, {refused}\n{out_ran[-1500:]}\n{out_refused}"
    assert "nothing left behind" in out_ran and "WARNING" not in out_ran
    # (Without its pid when it looked in the instant between the other's lock and its write.)
    assert re.search(r"^demo: refusing to run: another demo is running( \(pid \d+\))?; "
                     r"one at a time: Ctrl-C in its terminal stops it",
                     out_refused, re.M), out_refused
    _nothing_left()


def test_a_demo_killed_with_sigkill_is_cleaned_up_by_the_next(tmp_path: Path) -> None:
    killed = subprocess.Popen([sys.executable, "-m", "wgvsock.ui.demo", "--live", "0",
                               "--iperf-seconds", "0"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, cwd=REPO)
    try:
        wait_for(lambda: "wgdemo-enclave" in run("ip", "netns", "list").stdout, 60,
                 "the demo's namespaces")
        tmp = Path(json.loads(STATE_FILE.read_text())["tmp"])
        killed.kill()
        killed.wait(10)
        res = subprocess.run([sys.executable, "-m", "wgvsock.ui.demo", "--live", "0",
                              "--iperf-seconds", "0"], capture_output=True, text=True,
                             timeout=240, cwd=REPO)
    finally:
        killed.kill()
        _remove_leftovers()
    assert res.returncode == 0, res.stderr + res.stdout[-3000:]
    for name in NAMESPACES:
        assert f"(removed namespace {name} left by an earlier run)" in res.stdout
    assert f"(removed {tmp} left by an earlier run)" in res.stdout
    assert not tmp.exists()
    _nothing_left()
