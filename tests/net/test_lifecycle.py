"""How the daemon starts and stops, as a process: background start-up handshake, failures with a
reason, the three ways to stop it (ip link del, rm of the UAPI socket, SIGTERM), `-f`, and MTU
changes made with `ip link` while it runs."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from wgvsock.device.device import TUN_QUEUE_LEN

from .daemonctl import link_exists, only_pid, process_gone, sock_path
from .netlab import DAEMON, Lab, Namespace, connect_pair, ping, wait_for

pytestmark = [pytest.mark.root]

# The daemon notices a deleted interface or socket file within 0.5 s; allow for a busy machine.
STOP_WITHIN = 5.0


def _unix_files(lab: Lab) -> list[str]:
    return sorted(os.listdir(lab.unix_dir)) if lab.unix_dir.exists() else []


def _start(lab: Lab, label: str = "a") -> tuple[Namespace, str, int]:
    ns = lab.netns(label)
    ifname = lab.ifname(label)
    lab.start_daemon(ns, ifname, "unix")
    # Background start-up reports ready only once the UAPI socket serves: it is there at once.
    assert os.path.exists(sock_path(ifname))
    assert f"interface: {ifname}" in ns.wg("show", ifname).stdout
    assert link_exists(ns, ifname)
    return ns, ifname, only_pid(ns)


def _assert_all_gone(lab: Lab, ns: Namespace, ifname: str, pid: int, reason: str) -> None:
    # Looked for often: the time test_stop measures is the daemon's, not this loop's.
    wait_for(lambda: process_gone(pid), STOP_WITHIN, f"the daemon to exit after {reason}",
             max_delay=0.02)
    assert not os.path.exists(sock_path(ifname))
    assert not link_exists(ns, ifname)
    assert _unix_files(lab) == []
    assert all(process_gone(p) for p in ns.pids())
    assert f"shutting down: {reason}" in lab.log(ifname)
    assert f"{ifname}: stopped ({reason})" in lab.log(ifname)


def _dumps_core_on_abort(lab: Lab, command: list[str], ready: Callable[[], bool]) -> bool:
    """Whether COMMAND, started with core dumps allowed (RLIMIT_CORE unlimited, its working
    directory ours) and aborted (SIGABRT, as systemd's watchdog does) once READY, is dumped:
    the core flag of its wait status, however the host's core_pattern stores dumps."""
    cwd = lab.tmp / "cores"
    cwd.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        command, cwd=cwd, env=lab.env(WGVSOCK_LOG_FILE=str(lab.tmp / "aborted.log")),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                                      resource.RLIM_INFINITY)))
    try:
        wait_for(ready, 30, f"{command} to be ready")
        os.kill(proc.pid, signal.SIGABRT)
        _, status = os.waitpid(proc.pid, 0)
        proc.returncode = -signal.SIGABRT  # reaped here, to read the core flag
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGABRT, status
        return os.WCOREDUMP(status)
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        for core in cwd.iterdir():
            core.unlink()


def test_the_daemon_is_kept_out_of_core_dumps(lab: Lab) -> None:
    """It holds the private key and every session key: the watchdog's SIGABRT (or a crash)
    had them written to disk (systemd-coredump keeps dumps), and any process of its user
    could read its memory. Like ssh-agent, it makes itself non-dumpable."""
    # The probe: where the host's core_pattern hands dumps to a helper that is missing or
    # declines, nothing is dumped, and this host cannot tell.
    if not _dumps_core_on_abort(lab, ["sleep", "60"], lambda: True):
        pytest.skip("this host writes no core dumps (kernel.core_pattern), not even sleep's")
    ns = lab.netns("a")
    ifname = lab.ifname("a")
    assert not _dumps_core_on_abort(
        lab, ["ip", "netns", "exec", ns.name, DAEMON, "-f", "-n", "unix", ifname],
        lambda: os.path.exists(sock_path(ifname)))


@pytest.mark.parametrize("how", ["ip-link-del", "rm-socket", "sigterm", "sigint"])
def test_stop(lab: Lab, how: str) -> None:
    ns, ifname, pid = _start(lab)
    # Its transport socket file in WGVSOCK_UNIX_DIR must go too.
    port = int(lab.uapi(ifname)["extra"]["wgvsock_port"])
    assert _unix_files(lab) == [f"{port}.sock"]
    t0 = time.monotonic()
    if how == "ip-link-del":
        ns.ip("link", "del", ifname)
        reason = f"interface {ifname} was removed"
    elif how == "rm-socket":
        os.unlink(sock_path(ifname))
        reason = "UAPI socket was removed"
    else:
        sig = signal.SIGTERM if how == "sigterm" else signal.SIGINT
        os.kill(pid, sig)
        reason = f"received {sig.name}"
    _assert_all_gone(lab, ns, ifname, pid, reason)
    elapsed = time.monotonic() - t0
    # Polling notices within 0.5 s; a signal at once. Shutdown itself must not hang on the
    # TUN reader (it used to wait out a 2 s join on a read() that close() does not wake): that
    # join alone would take the 2 s this stays short of, the rest is room for a busy machine
    # (typically 0.05 s for a signal, 0.5 s for polling).
    assert elapsed < 1.9, elapsed


@pytest.mark.parametrize("how", ["create", "nocreate", "copytruncate", "unsafe"])
def test_the_log_follows_logrotate(lab: Lab, how: str) -> None:
    """Rotated as logrotate does (no postrotate signal), the daemon's next lines go to the
    file now at $WGVSOCK_LOG_FILE: the one `create` made, else one it makes, 0600; with
    `copytruncate`, from the start of the emptied file, no run of NUL bytes before them. One
    whose mode lets others write is not used: the lines, and one saying why, stay in the old.
    Before, they all went to the renamed file (and, once logrotate removed it, nowhere)."""
    _, ifname, pid = _start(lab)
    log = lab.tmp / f"{ifname}.log"
    old = lab.tmp / f"{ifname}.log.1"
    assert f"interface {ifname} up" in log.read_text()
    # A rotation is looked for when a record is written, at most once a second: the next
    # one (the shutdown's) is then sure to look. A lower bound, not a measure.
    time.sleep(1.2)
    if how == "copytruncate":
        old.write_bytes(log.read_bytes())
        os.truncate(log, 0)
    else:
        log.rename(old)
        if how != "nocreate":
            mode = 0o666 if how == "unsafe" else 0o640
            os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            os.chmod(log, mode)
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: process_gone(pid), STOP_WITHIN, "the daemon to exit after SIGTERM")
    stopped = f"{ifname}: stopped (received SIGTERM)"
    if how == "unsafe":
        assert log.read_text() == ""
        lines = old.read_text().splitlines()
        refusals = [line for line in lines if "was rotated, but the file now there" in line]
        assert len(refusals) == 1, lines
        assert f"WGVSOCK_LOG_FILE={log} is writable by others (mode 666)" in refusals[0]
        assert stopped in lines[-1]
        return
    text = log.read_bytes()
    assert b"\0" not in text
    assert stopped in text.decode() and "shutting down" in text.decode()
    assert f"interface {ifname} up" in old.read_text()
    assert "shutting down" not in old.read_text()
    if how == "nocreate":
        assert log.stat().st_mode & 0o777 == 0o600
    if how == "copytruncate":
        assert f"interface {ifname} up" not in text.decode()


def test_socket_replaced_by_other_file_stops(lab: Lab) -> None:
    ns, ifname, pid = _start(lab)
    path = sock_path(ifname)
    os.unlink(path)
    with open(path, "w") as f:  # somebody else's file now: it must not be deleted
        f.write("not ours\n")
    try:
        wait_for(lambda: process_gone(pid), STOP_WITHIN, "the daemon to exit")
        assert not link_exists(ns, ifname)
        with open(path) as f:
            assert f.read() == "not ours\n"
    finally:
        os.unlink(path)


def test_foreground_stays_and_stops_on_sigterm(lab: Lab) -> None:
    ns = lab.netns("f")
    ifname = lab.ifname("f")
    err = lab.tmp / "fg.err"
    with open(err, "wb") as out:
        proc = ns.popen(DAEMON, "-f", "-n", "unix", ifname, env=lab.env(), stdout=out,
                        stderr=out)
    wait_for(lambda: os.path.exists(sock_path(ifname)) or proc.poll() is not None, 15,
             "the UAPI socket")
    assert proc.poll() is None, err.read_text()
    # `ip netns exec` execs the daemon: the process we started is the daemon itself.
    assert ns.pids() == [proc.pid]
    assert f"interface: {ifname}" in ns.wg("show", ifname).stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(STOP_WITHIN) == 0
    assert not os.path.exists(sock_path(ifname))
    assert not link_exists(ns, ifname)
    assert _unix_files(lab) == []
    # In the foreground the log goes to stderr.
    assert "shutting down: received SIGTERM" in err.read_text()


# The daemon in the foreground, with SIGTERM handled while its main thread holds the lock of
# the event it waits on (as it does for a moment in every Event.wait with a timeout).
_SIGTERM_UNDER_LOCK = r"""
import logging, os, signal, sys, threading
logging.basicConfig(level=logging.INFO)
from wgvsock import daemon
real_wait = threading.Event.wait
fired = []
def wait(self, timeout=None):
    if (not fired and timeout is not None and threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        fired.append(1)
        with self._cond:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100):  # the handler runs between these bytecodes
                pass
    return real_wait(self, timeout)
threading.Event.wait = wait
sys.exit(daemon.run_foreground(sys.argv[1], "unix", False))
"""


# The daemon in the foreground, with SIGTERM arriving while the interface is being made.
_SIGTERM_WHILE_STARTING = r"""
import logging, os, signal, sys
logging.basicConfig(level=logging.INFO)
from wgvsock import daemon
from wgvsock.device import device as device_mod
class Device(device_mod.Device):
    def start(self):
        os.kill(os.getpid(), signal.SIGTERM)  # as `kill` the moment the UAPI socket appears
        super().start()
device_mod.Device = Device
sys.exit(daemon.run_foreground(sys.argv[1], "unix", False))
"""


@pytest.mark.parametrize("script", [_SIGTERM_UNDER_LOCK, _SIGTERM_WHILE_STARTING],
                         ids=["under-lock", "while-starting"])
def test_sigterm_at_an_awkward_moment_stops_it_cleanly(lab: Lab, script: str) -> None:
    """Before: under-lock, the SIGTERM handler stopped the device itself, which waits for the
    lock the main thread held when the signal came, and the daemon hung until SIGKILL;
    while-starting, the handlers came after the start, so a SIGTERM sent as soon as the UAPI
    socket appeared killed it (exit -15; CI caught test_foreground_stays_and_stops_on_sigterm
    doing so)."""
    ns = lab.netns("s")
    ifname = lab.ifname("s")
    res = ns.run(sys.executable, "-c", script, ifname, env=lab.env(), check=False, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "shutting down: received SIGTERM" in res.stderr
    assert not os.path.exists(sock_path(ifname))
    assert not link_exists(ns, ifname)


def _start_fails(lab: Lab, ns: Namespace, ifname: str, *args: str, **env: str) -> str:
    full = lab.env(**env)
    if "LOG_LEVEL" not in env:  # set, the daemon's own log would come to our stderr too
        del full["LOG_LEVEL"]
    res = ns.run(DAEMON, *args, "-n", "unix", ifname, env=full, check=False, timeout=20)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("wireguard-go-vsock: failed to start interface"), lines[0]
    return lines[0]


def test_start_failures_report_a_reason(lab: Lab) -> None:
    ns = lab.netns("x")
    # 16 bytes: one more than IFNAMSIZ allows.
    line = _start_fails(lab, ns, "wgvsocktoolong16")
    assert "1-15 bytes" in line
    assert not os.path.exists(sock_path("wgvsocktoolong16"))

    # A name taken by an interface that is not a TUN (a bridge: this kernel has no dummy).
    other = lab.ifname("br")
    ns.ip("link", "add", other, "type", "bridge")
    line = _start_fails(lab, ns, other)
    assert "another type" in line
    assert link_exists(ns, other)  # still there, untouched
    assert not os.path.exists(sock_path(other))
    wait_for(lambda: all(process_gone(p) for p in ns.pids()), 5, "failed daemons to exit")
    assert _unix_files(lab) == []


@pytest.mark.parametrize("where", ["run-dir", "above"])
def test_start_refused_in_a_run_dir_others_could_change(lab: Lab, where: str) -> None:
    """Before, an existing run directory (and the ones above it) was used whatever its owner
    and mode: another user could swap our UAPI socket for their own, for wg(8) to send keys
    to. Now the daemon says which directory and the fix, and leaves nothing behind."""
    ns = lab.netns("r")
    ifname = lab.ifname("r")
    open_dir = lab.tmp / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    run_dir = open_dir if where == "run-dir" else open_dir / "run"
    line = _start_fails(lab, ns, ifname, WGVSOCK_RUN_DIR=str(run_dir))
    if where == "run-dir":
        assert line.endswith(f"refusing to keep sockets in {run_dir}: it has mode 0777, "
                             f"writable by other users; `chmod go-w {run_dir}`, or give it a "
                             "directory of its own (one that does not exist yet is made, "
                             "mode 0700)"), line
    else:
        said = (f": refusing to keep sockets in {run_dir}: {open_dir} above it is writable by "
                f"group and others (mode 777): other users could swap what is in it for their own; "
                f"`chmod go-w {open_dir}`")
        assert said in line, line
    assert os.listdir(open_dir) == []
    assert not link_exists(ns, ifname)
    wait_for(lambda: all(process_gone(p) for p in ns.pids()), 5, "failed daemons to exit")
    assert _unix_files(lab) == []


def test_start_refused_with_a_log_file_under_a_directory_others_could_change(lab: Lab) -> None:
    """The launcher, as root, appends to $WGVSOCK_LOG_FILE. Before, only a link at its last
    component was refused: the owner of a directory on its way (their home) could swap it for
    a link to /etc once the operator had looked. Now nothing starts, in one line saying where
    and the fix; a root-owned sticky directory, as /tmp, still takes the log."""
    ns = lab.netns("l")
    ifname = lab.ifname("l")
    home = lab.tmp / "home"
    (home / "logs").mkdir(parents=True)
    os.chown(home, 65534, 65534)
    log = home / "logs" / "wg.log"
    env = lab.env(WGVSOCK_LOG_FILE=str(log))
    del env["LOG_LEVEL"]
    res = ns.run(DAEMON, "-n", "unix", ifname, env=env, check=False, timeout=20)
    assert res.returncode == 1
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"wireguard-go-vsock: WGVSOCK_LOG_FILE={log}: {home} on its way "
                               "is owned by uid 65534, who could swap it"), lines[0]
    assert f"`chown root {home}`" in lines[0] and lines[0].endswith("nothing was started")
    assert not log.exists()
    assert not link_exists(ns, ifname)
    assert ns.pids() == []
    assert _unix_files(lab) == []

    shared = lab.tmp / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # as /tmp
    log = shared / "wg.log"
    res = ns.run(DAEMON, "-n", "unix", ifname, env=lab.env(WGVSOCK_LOG_FILE=str(log)),
                 check=False, timeout=20)
    assert res.returncode == 0, res.stderr
    assert f"interface {ifname} up" in log.read_text()


def test_second_daemon_on_the_same_name(lab: Lab) -> None:
    ns, ifname, pid = _start(lab)
    files = _unix_files(lab)
    # Same namespace: the TUN is attached to the first daemon.
    line = _start_fails(lab, ns, ifname)
    assert "busy" in line
    # Another namespace: the TUN could be made there, but the UAPI socket is served.
    ns2 = lab.netns("b")
    line = _start_fails(lab, ns2, ifname)
    assert "another daemon already serves" in line
    wait_for(lambda: all(process_gone(p) for p in ns2.pids()), 5, "the failed daemon to exit")
    assert not link_exists(ns2, ifname)
    # The first one is untouched: same process, socket, interface and transport socket.
    assert only_pid(ns) == pid and not process_gone(pid)
    assert os.path.exists(sock_path(ifname))
    assert f"interface: {ifname}" in ns.wg("show", ifname).stdout
    assert _unix_files(lab) == files


def test_stale_socket_from_a_killed_daemon_is_replaced(lab: Lab) -> None:
    ns, ifname, pid = _start(lab)
    os.kill(pid, signal.SIGKILL)  # no clean-up: the socket file stays behind
    wait_for(lambda: process_gone(pid), 5, "the killed daemon to go")
    wait_for(lambda: not link_exists(ns, ifname), 5, "the interface to go with its last fd")
    assert os.path.exists(sock_path(ifname))
    lab.start_daemon(ns, ifname, "unix")
    assert f"interface: {ifname}" in ns.wg("show", ifname).stdout


@pytest.mark.parametrize("offload", ["1", "0"])
def test_tun_queue_takes_a_burst(lab: Lab, offload: str) -> None:
    """The kernel queues up to 1000 packets for our reads, not TUN's 500: with offload off one
    GSO send of the kernel's TCP arrives as 45 packets, and drops there cut TCP's rate."""
    ns = lab.netns("a")
    ifname = lab.ifname("a")
    lab.start_daemon(ns, ifname, "unix", WGVSOCK_OFFLOAD=offload)
    [link] = json.loads(ns.ip("-j", "link", "show", "dev", ifname).stdout)
    assert link["txqlen"] == TUN_QUEUE_LEN == 1000


def test_mtu_change_is_respected(lab: Lab) -> None:
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.start_daemon(a, ia, "unix")
    lab.start_daemon(b, ib, "unix")
    connect_pair(lab, a, ia, "127.0.0.1:7302", b, ib, None, a_port=7301, b_port=7302)
    ping(a, "10.99.0.2", count=1)  # handshake done, session up

    a.ip("link", "set", ia, "mtu", "1300")
    wait_for(lambda: f"{ia}: MTU changed to 1300" in lab.log(ia), 5, "the daemon to see MTU")

    def counters() -> tuple[int, int]:
        p = lab.uapi(ia)["peers"][0]
        return p["tx_bytes"], p["rx_bytes"]

    tx0, rx0 = counters()
    # 1272 bytes of ICMP payload + 28 of headers = a 1300-byte packet, exactly the MTU.
    a.run("ping", "-c", "1", "-W", "3", "-M", "do", "-s", "1272", "10.99.0.2")
    tx1, rx1 = counters()
    # Padding goes up to a multiple of 16 but never past the MTU: the 1300-byte request is
    # sent as 16 (header) + 1300 + 16 (tag) = 1332 bytes, not rounded up to 1312 + 32.
    assert tx1 - tx0 == 1332
    # b's MTU is still 1420, so its 1300-byte reply is padded to 1312: 1344 bytes.
    assert rx1 - rx0 == 1344
    # One byte more does not fit the interface any more.
    res = a.run("ping", "-c", "1", "-W", "1", "-M", "do", "-s", "1273", "10.99.0.2",
                check=False)
    assert res.returncode != 0
    assert counters()[0] == tx1  # refused by the kernel, never reached the daemon
    # Raising it again is seen too, and bigger packets flow.
    a.ip("link", "set", ia, "mtu", "1400")
    wait_for(lambda: f"{ia}: MTU changed to 1400" in lab.log(ia), 5, "the daemon to see MTU")
    a.run("ping", "-c", "1", "-W", "3", "-M", "do", "-s", "1372", "10.99.0.2")
    assert counters()[0] - tx1 == 16 + 1400 + 16


def test_what_the_transport_drops_is_not_counted_as_sent(lab: Lab) -> None:
    """tx_bytes counts what the transport took, as wireguard-go's does. Before, the engine
    counted every message it sealed: b, which a had dialled, went on counting its pings to a
    after a was gone, though with no connection to a (and no endpoint to dial) each was
    dropped. A stream dialler's queue is counted when it goes (the bind tests)."""
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.start_daemon(a, ia, "unix")
    lab.start_daemon(b, ib, "unix")
    connect_pair(lab, a, ia, "127.0.0.1:7312", b, ib, None, a_port=7311, b_port=7312)
    ping(a, "10.99.0.2", count=1)

    def peer(ifname: str) -> dict:
        return lab.uapi(ifname)["peers"][0]

    sent = peer(ib)["tx_bytes"]
    assert sent > 0 and sent == peer(ia)["rx_bytes"]
    pid = only_pid(a)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: peer(ib)["extra"].get("wgvsock_conn") == "none", 10,
             "b to see a's connection go")
    res = b.run("ping", "-c", "3", "-i", "0.2", "-W", "1", "10.99.0.1", check=False)
    assert res.returncode != 0  # nobody there
    assert peer(ib)["tx_bytes"] == sent


def test_background_start_reports_only_when_ready(lab: Lab) -> None:
    ns = lab.netns("r")
    ifname = lab.ifname("r")
    env = lab.env()
    env.pop("WGVSOCK_LOG_FILE", None)
    env.pop("LOG_LEVEL", None)  # with it, the daemon would log to our stdout (test below)
    # The launcher's exit status is the readiness report; it returns with stdio closed so a
    # caller capturing its output (as wg-quick does) is not held up by the daemon.
    t0 = time.monotonic()
    res = subprocess.run(["ip", "netns", "exec", ns.name, DAEMON, "-n", "unix", ifname],
                         env=env, capture_output=True, text=True, timeout=20, check=False)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 10
    assert os.path.exists(sock_path(ifname))
    assert res.stdout == "" and res.stderr == ""
    pid = only_pid(ns)
    # The daemon is detached: its own session, not a child of anything we run.
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[3]) == pid  # session id: start_new_session


@pytest.mark.parametrize("level", ["verbose", "silent", None])
def test_a_background_daemon_logs_where_it_was_started_when_asked(lab: Lab,
                                                                   level: str | None) -> None:
    """As wireguard-go and the seed: `LOG_LEVEL=debug wireguard-go-vsock wg0` logs to the
    stdout and stderr it was started with. Before, a background daemon logged only to
    $WGVSOCK_LOG_FILE and closed both. Unset or silent, they are still closed."""
    ns = lab.netns("g")
    ifname = lab.ifname("g")
    env = lab.env()
    env.pop("WGVSOCK_LOG_FILE", None)
    env.pop("LOG_LEVEL", None)
    if level is not None:
        env["LOG_LEVEL"] = level
    out = lab.tmp / "started-with.log"
    with open(out, "wb") as f:  # a file, not a pipe: the daemon would hold a pipe open
        res = subprocess.run(["ip", "netns", "exec", ns.name, DAEMON, "-n", "unix", ifname],
                             env=env, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                             timeout=20, check=False)
    assert res.returncode == 0, out.read_text()
    pid = only_pid(ns)
    where = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in (1, 2)}
    if level == "verbose":
        assert where == {str(out)}
        assert f"interface {ifname} up: network unix" in out.read_text()
    else:
        assert where == {"/dev/null"}
        assert out.read_text() == ""


def test_a_start_failure_is_said_once_when_the_daemon_logs_where_it_was_started(
        lab: Lab) -> None:
    """The reason comes from the command that started it, not a second time in the daemon's
    log on the same stderr."""
    ns = lab.netns("o")
    line = _start_fails(lab, ns, "wgvsocktoolong16", LOG_LEVEL="debug")
    assert "1-15 bytes" in line
