"""`wgvsock status` against real daemons in namespaces: ours (over the Unix stand-in for vsock)
and Debian's wireguard-go; the live view in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgvsock.device.uapi import uapi_set

from .daemonctl import only_pid, process_gone
from .netlab import VENV_BIN, Keys, Lab, Namespace, connect_pair, ping, run, wait_for

pytestmark = [pytest.mark.root]

WGVSOCK = str(VENV_BIN / "wgvsock")


def status_json(*ifnames: str) -> dict:
    res = run(WGVSOCK, "status", "--once", "--json", *ifnames, check=False)
    assert res.returncode in (0, 1), res.stderr
    return json.loads(res.stdout)


def status_text(*ifnames: str, width: int = 80) -> str:
    env = dict(os.environ, COLUMNS=str(width))
    return run(WGVSOCK, "status", "--once", *ifnames, check=False, env=env).stdout


def wg_dump(ns: Namespace, ifname: str) -> list[list[str]]:
    return [line.split("\t") for line in ns.wg("show", ifname, "dump").stdout.splitlines()]


def assert_agrees_with_wg(ns: Namespace, ifname: str) -> dict:
    """`status --json` and `wg show dump` for one moment: both are read twice around the
    JSON, and a pair of dumps that differ (a keepalive slipped in) is retried."""
    for _ in range(20):
        before = wg_dump(ns, ifname)
        doc = status_json(ifname)
        if wg_dump(ns, ifname) == before:
            break
    else:
        raise AssertionError(f"{ifname}: counters never held still")
    (iface,) = doc["interfaces"]
    assert iface["error"] is None
    dev, *peer_rows = before
    assert iface["public_key"] == dev[1]
    assert iface["listen_port"] == int(dev[2])
    assert len(iface["peers"]) == len(peer_rows)
    peers = {p["public_key"]: p for p in iface["peers"]}
    for pub, _psk, endpoint, allowed, handshake, rx, tx, keepalive in peer_rows:
        p = peers[pub]
        assert (p["endpoint_uapi"] or "(none)") == endpoint
        assert (",".join(p["allowed_ips"]) or "(none)") == allowed
        assert p["latest_handshake"] == int(handshake)
        assert (p["rx_bytes"], p["tx_bytes"]) == (int(rx), int(tx))
        assert p["persistent_keepalive"] == (0 if keepalive == "off" else int(keepalive))
    return iface


def _unix_pair(lab: Lab) -> tuple[Namespace, str, Namespace, str, Keys, Keys]:
    a, b = lab.netns("a"), lab.netns("b")
    ia, ib = lab.ifname("a"), lab.ifname("b")
    lab.start_daemon(a, ia, "unix")
    lab.start_daemon(b, ib, "unix")
    ka, kb = connect_pair(lab, a, ia, "127.0.0.1:7002", b, ib, None, a_port=7001, b_port=7002)
    ping(a, "10.99.0.2")
    return a, ia, b, ib, ka, kb


def test_json_agrees_with_wg_show_dump(lab: Lab) -> None:
    a, ia, b, ib, ka, kb = _unix_pair(lab)
    dialer = assert_agrees_with_wg(a, ia)
    listener = assert_agrees_with_wg(b, ib)
    (pa,), (pb,) = dialer["peers"], listener["peers"]
    # The extras only our daemon gives: readable endpoints and the stream connection.
    assert dialer["network"] == "unix"
    assert pa["endpoint"] == f"unix:{lab.unix_dir}/7002.sock"
    assert (pa["connection"], pa["reconnects"]) == ("connected", 0)
    assert pb["endpoint"].startswith("unix:<inbound #")
    assert (pb["connection"], pb["reconnects"]) == ("connected", 0)
    assert pa["health"] == pb["health"] == "fresh"
    assert pa["public_key"] == kb.public_b64 and pb["public_key"] == ka.public_b64
    # `wg show` still copes with the reply that now carries the connection keys.
    assert kb.public_b64 in a.wg("show", ia).stdout


def test_listener_counts_the_connections_its_peer_came_back_on(lab: Lab) -> None:
    """The listening side (the parent) has no dialler of its own: its reconnect count is the
    number of new connections its peer came back on."""
    a, ia, _b, ib, ka, _kb = _unix_pair(lab)
    pid = only_pid(a)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: process_gone(pid), 10, "the dialling daemon to die")
    lab.start_daemon(a, ia, "unix")
    keyfile = lab.tmp / f"{ia}.key"  # connect_pair wrote it; the peer's state is reapplied
    a.wg("set", ia, "private-key", str(keyfile), "listen-port", "7001", "peer",
         status_json(ib)["interfaces"][0]["public_key"], "allowed-ips", "10.99.0.2/32",
         "endpoint", "127.0.0.1:7002")
    a.ip("addr", "add", "10.99.0.1/24", "dev", ia)
    a.ip("link", "set", ia, "up")
    ping(a, "10.99.0.2")
    peer = status_json(ib)["interfaces"][0]["peers"][0]
    assert peer["public_key"] == ka.public_b64
    assert (peer["connection"], peer["reconnects"]) == ("connected", 1)


def test_peer_gone_shows_reconnects_and_a_stale_socket(lab: Lab) -> None:
    _a, ia, b, ib, _ka, kb = _unix_pair(lab)
    pid = only_pid(b)
    os.kill(pid, signal.SIGKILL)  # leaves its UAPI socket behind, as a crash does
    wait_for(lambda: process_gone(pid), 10, "the daemon to die")

    def redialling() -> dict | None:
        p = status_json(ia)["interfaces"][0]["peers"][0]
        return p if p["connection"] in ("dialing", "backoff") and p["reconnects"] else None

    peer = wait_for(redialling, 15, "the dialler to notice")
    assert peer["reconnects"] >= 1
    doc = status_json(ia, ib)
    assert doc["totals"]["unreadable"] == 1
    err = doc["interfaces"][1]["error"]
    assert "connection refused" in err and "stale socket" in err
    text = status_text(ia, ib)
    # In words: "backoff" was the dialler's jargon for waiting to try again.
    assert re.search(r"(dialing|connection failed, retrying), \d+ reconnects?", text), text
    assert "backoff" not in text
    assert f"✗ {ib}  stale socket: connection refused" in text
    assert kb.public_b64[:8] in text  # the readable interface keeps its rows


# -- the live view in a real terminal -------------------------------------------------------


class Tmux:
    """A private tmux server (its own socket), so nothing else's sessions are touched."""

    def __init__(self, name: str) -> None:
        self.server = name
        self.session = "status"
        self.socket_path = ""

    def __call__(self, *args: str, check: bool = True) -> str:
        return run("tmux", "-L", self.server, *args, check=check).stdout

    def start(self, command: str, width: int = 80, height: int = 30) -> None:
        self("new-session", "-d", "-s", self.session, "-x", str(width), "-y", str(height),
             command)
        self.socket_path = self("display-message", "-p", "#{socket_path}").strip()

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", self.session, check=False)

    def wait_screen(self, pattern: str, what: str, timeout: float = 10.0) -> str:
        """Polls the pane until `pattern` (a regex, multiline) appears; returns the screen."""
        def found() -> str | None:
            screen = self.screen()
            return screen if re.search(pattern, screen, re.M) else None

        return wait_for(found, timeout, what)

    def kill(self) -> None:
        self("kill-server", check=False)
        # kill-server leaves the socket file behind.
        if self.socket_path:
            Path(self.socket_path).unlink(missing_ok=True)


@pytest.fixture
def tmux(lab: Lab) -> Iterator[Tmux]:
    t = Tmux(f"wgvsock-test-{lab.tag}")
    try:
        yield t
    finally:
        t.kill()


_RATE = r"(?:-|\d+(?:\.\d+)? [KMGT]?i?B/s)"


def _rates(screen: str, short_key: str) -> tuple[str, str] | None:
    """The rx/s and tx/s cells of the peer row that starts with `short_key`."""
    for line in screen.splitlines():
        if line.strip().startswith(short_key):
            m = re.search(rf"({_RATE}) +({_RATE})$", line.rstrip())
            return (m.group(1), m.group(2)) if m else None
    return None


def _moving(rate: str) -> bool:
    return rate not in ("-", "0 B/s")


def test_live_view_in_tmux(lab: Lab, tmux: Tmux) -> None:
    a, ia, _b, ib, ka, kb = _unix_pair(lab)
    key_a, key_b = ka.public_b64[:8] + "…", kb.public_b64[:8] + "…"
    before, after = lab.tmp / "stty.before", lab.tmp / "stty.after"
    # `trap` so the shell outlives a Ctrl-C and reports; its child still gets SIGINT's default.
    script = (f"trap true INT; stty -g > {before}; "
              f"{shlex.quote(WGVSOCK)} status --interval 0.5 {ia} {ib}; "
              f"rc=$?; stty -g > {after}; echo EXITED rc=$rc; sleep 600")
    tmux.start(f"sh -c {shlex.quote(script)}")

    # Both peer rows show, with rates once there are two samples; idle, they read 0 B/s.
    def idle() -> str | None:
        s = tmux.screen()
        ra, rb = _rates(s, key_b), _rates(s, key_a)
        return s if ra and rb and not any(map(_moving, ra + rb)) and "-" not in ra else None

    screen = wait_for(idle, 15, "both peer rows with idle rates")
    assert f"{ia}  key {key_a}" in screen and "network unix" in screen
    assert "q quits" in screen
    assert all(len(line) <= 80 for line in screen.splitlines())

    # Traffic through the tunnel: the rate columns move.
    pinger = a.popen("ping", "-q", "-i", "0.05", "-s", "1000", "-c", "100", "10.99.0.2")
    try:
        def moving() -> str | None:
            s = tmux.screen()
            r = _rates(s, key_b)
            return s if r and _moving(r[0]) and _moving(r[1]) else None

        screen = wait_for(moving, 10, "non-zero rates on the screen")
        # The header's totals carry the rates too.
        assert re.search(r"· rx \S+ \S+ \([1-9][0-9.]* [KMG]?i?B/s\)", screen), screen
    finally:
        pinger.kill()
        pinger.wait(5)

    # A narrower terminal: the layout follows, the rates move into the detail line.
    tmux("resize-window", "-t", tmux.session, "-x", "60", "-y", "30")
    narrow = tmux.wait_screen(r"^ +rx/s \S", "the narrow layout")
    assert key_b in narrow
    assert all(len(line) <= 60 for line in narrow.splitlines())

    tmux("send-keys", "-t", tmux.session, "q")
    done = tmux.wait_screen("EXITED", "q to quit")
    assert "EXITED rc=0" in done
    assert before.read_text() == after.read_text()  # the terminal is as it was


def test_live_view_quits_on_ctrl_c(lab: Lab, tmux: Tmux) -> None:
    script = (f"trap true INT; {shlex.quote(WGVSOCK)} status --interval 0.5 --run-dir {lab.tmp}; "
              "echo EXITED rc=$?")
    tmux.start(f"sh -c {shlex.quote(script + '; sleep 600')}")
    tmux.wait_screen("no WireGuard interfaces under", "the empty state")
    tmux("send-keys", "-t", tmux.session, "C-c")
    assert "EXITED rc=0" in tmux.wait_screen("EXITED", "Ctrl-C to quit")


def test_on_a_dumb_terminal_snapshots_are_printed(lab: Lab, tmux: Tmux) -> None:
    """TERM=dumb: rich draws a live view only where it can move the cursor, so the live view
    showed an empty screen until q. There a snapshot is printed every interval instead, as
    to a pipe, and q still ends it."""
    view = (f"TERM=dumb {shlex.quote(WGVSOCK)} status --interval 0.5 --run-dir {lab.tmp}; "
            "echo EXITED rc=$?; sleep 600")
    tmux.start(f"sh -c {shlex.quote(view)}")
    screen = tmux.wait_screen(r"(?s)no WireGuard interfaces under.*no WireGuard interfaces",
                              "two snapshots", timeout=15)
    assert "q quits" not in screen
    tmux("send-keys", "-t", tmux.session, "q")
    assert "EXITED rc=0" in tmux.wait_screen("EXITED", "q to end the snapshots")


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
def test_live_view_gives_the_terminal_back_on_hangup_and_term(lab: Lab, tmux: Tmux,
                                                              sig: signal.Signals) -> None:
    """SIGHUP (the ssh session or the terminal went away, or `kill -HUP`) killed the view
    where it stood: the terminal stayed in the alternate screen, cbreak and no echo."""
    before, after, pidfile = lab.tmp / "stty.before", lab.tmp / "stty.after", lab.tmp / "pid"
    view = (f"echo $$ > {pidfile}; exec {shlex.quote(WGVSOCK)} status --interval 0.5 "
            f"--run-dir {lab.tmp}")
    script = (f"stty -g > {before}; sh -c {shlex.quote(view)}; rc=$?; stty -g > {after}; "
              "echo EXITED rc=$rc; sleep 600")
    tmux.start(f"sh -c {shlex.quote(script)}")
    tmux.wait_screen("no WireGuard interfaces under", "the empty state")
    os.kill(int(pidfile.read_text()), sig)
    assert "EXITED rc=0" in tmux.wait_screen("EXITED", f"{sig.name} to end the view")
    assert tmux("display-message", "-p", "-t", tmux.session, "#{alternate_on}").strip() == "0"
    assert before.read_text() == after.read_text()


# -- other daemons and transports -------------------------------------------------------------


def test_against_wireguard_go(lab: Lab) -> None:
    """Debian's wireguard-go (no extra keys at all) beside our daemon over UDP."""
    o, g = lab.netns("o"), lab.netns("g")
    io, ig = lab.ifname("o"), lab.ifname("g")
    lab.veth(o, "192.168.79.1/24", g, "192.168.79.2/24")
    lab.start_daemon(o, io, "udp")
    lab.start_wireguard_go(g, ig)
    ko, kg = connect_pair(lab, o, io, "192.168.79.2:7102", g, ig, "192.168.79.1:7101",
                          a_port=7101, b_port=7102)
    ping(o, "10.99.0.2")
    theirs = assert_agrees_with_wg(g, ig)
    ours = assert_agrees_with_wg(o, io)
    (pg,), (po,) = theirs["peers"], ours["peers"]
    assert theirs["network"] is None and ours["network"] == "udp"
    assert pg["endpoint"] == pg["endpoint_uapi"] == "192.168.79.1:7101"
    assert po["endpoint"] == "192.168.79.2:7102"
    # Datagram transports have no connection to report.
    assert pg["connection"] is None and po["connection"] is None
    assert pg["health"] == "fresh" and pg["rx_bytes"] > 0
    text = status_text(ig, io)
    assert f"{ig}  key {kg.public_b64[:8]}…  port 7102  network unknown" in text
    row = next(line for line in text.splitlines() if line.strip().startswith(ko.public_b64[:8]))
    assert "192.168.79.1:7101" in row and "s ago" in row


def test_vsock_interface_shows_cid_and_32_bit_port(lab: Lab) -> None:
    """Never sends: the interface stays down, has no private key and no keepalive."""
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
    except (AttributeError, OSError) as e:
        pytest.skip(f"no AF_VSOCK stream sockets here: {e}")
    ns, ifname = lab.netns("v"), lab.ifname("v")
    lab.start_daemon(ns, ifname, "vsock")
    peer = Keys()
    assert uapi_set(f"/var/run/wireguard/{ifname}.sock",
                    f"public_key={peer.public_hex}\nendpoint=vsock://16:5000\n"
                    "allowed_ip=10.0.0.2/32\n") == 0
    doc = status_json(ifname)
    (iface,) = doc["interfaces"]
    port = int(lab.uapi(ifname)["extra"]["wgvsock_port"])
    assert (iface["network"], iface["listen_port"], iface["public_key"]) == ("vsock", port, None)
    (p,) = iface["peers"]
    assert (p["endpoint"], p["endpoint_uapi"], p["cid"]) == ("vsock://16:5000", "0.0.0.16:5000", 16)
    assert (p["connection"], p["health"]) == ("none", "never")
    text = status_text(ifname)
    assert f"port {port}" in text and "vsock://16:5000" in text and "never" in text
    assert "UP" not in ns.ip("-o", "link", "show", "dev", ifname).stdout.split(">")[0]


def test_run_dir_listing(lab: Lab) -> None:
    """Interfaces are found under --run-dir: a daemon told to put its socket elsewhere."""
    ns, ifname = lab.netns("r"), lab.ifname("r")
    run_dir = lab.tmp / "run"
    lab.start_daemon(ns, ifname, "unix", WGVSOCK_RUN_DIR=str(run_dir))
    res = run(WGVSOCK, "status", "--once", "--json", "--run-dir", str(run_dir))
    doc = json.loads(res.stdout)
    assert [i["name"] for i in doc["interfaces"]] == [ifname]
    assert Path(doc["interfaces"][0]["socket"]).parent == run_dir


def test_roles_label_parent_and_enclave(lab: Lab) -> None:
    """`parent up` / `enclave up` from one profile: the profile, the roles and the
    attestation verdict show on both sides (each side has its own run directory)."""
    from .test_roles import World

    world = World(lab)
    try:
        world.parent_cmd("up")
        world.start_enclave()
        wait_for(world.egress_works, 30, "the tunnel")
        parent = status_json("--run-dir", str(lab.tmp / "run-parent"))["interfaces"][0]
        enclave = status_json("--run-dir", str(lab.tmp / "run-enclave"))["interfaces"][0]
    finally:
        world.close()
    assert (parent["role"], parent["profile"], parent["attested"]) == ("parent", world.name, False)
    assert (enclave["role"], enclave["profile"]) == ("enclave", world.name)
    (to_enclave,), (to_parent,) = parent["peers"], enclave["peers"]
    # The profile does not require attestation, so the parent says it was not verified.
    assert (to_enclave["label"], to_enclave["attested"]) == ("enclave", False)
    assert (to_parent["label"], to_parent["attested"]) == ("parent", None)
    assert to_enclave["health"] == to_parent["health"] == "fresh"
    assert to_enclave["connection"] == to_parent["connection"] == "connected"
    assert to_enclave["public_key"] == enclave["public_key"]
    assert to_parent["public_key"] == parent["public_key"]


def test_the_wireguard_ports_refusals_show_in_the_live_view(lab: Lab, tmux: Tmux) -> None:
    """Connections the WireGuard port closes at accept (Bind.refuse_from; on the parent over
    vsock, another enclave or VM's CID) are counted in the device's `get`
    (wgvsock_transport_refused) and shown live, as the control port's refusals are. Before,
    only the metrics and the log at DEBUG had them. A device in this process, on the Unix
    stand-in with a check that admits nobody: this machine must never connect AF_VSOCK."""
    from wgvsock.conn.stream import StreamBind
    from wgvsock.device.device import Device
    from wgvsock.device.uapi import UAPIServer

    run_dir, unix_dir = lab.tmp / "run-door", lab.tmp / "unix-door"
    run_dir.mkdir()
    unix_dir.mkdir(mode=0o700)
    bind = StreamBind("unix", unix_dir=str(unix_dir))
    bind.refuse_from = lambda addr: "not the enclave (the test admits nobody)"
    ifname = lab.ifname("door")
    dev = Device(ifname, bind, run_dir=str(run_dir))
    bind.open(7101, lambda data, ep: None)
    server = UAPIServer(ifname, dev, str(run_dir))

    def knock(times: int) -> None:
        for _ in range(times):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(10)
                s.connect(str(unix_dir / "7101.sock"))
                assert s.recv(1) == b"", "a refused connection is closed at once"

    try:
        knock(3)
        wait_for(lambda: bind.status()["refused"] == 3, 10, "three refusals counted")
        assert dev.uapi_get().extra["wgvsock_transport_refused"] == "3"
        (iface,) = status_json("--run-dir", str(run_dir))["interfaces"]
        assert iface["transport_refused"] == 3
        script = f"{shlex.quote(WGVSOCK)} status --interval 0.5 --run-dir {run_dir}"
        tmux.start(f"sh -c {shlex.quote(script + '; sleep 600')}")
        tmux.wait_screen(r"^  WireGuard port refused 3 connections$", "the count on screen")
        knock(1)  # and it follows
        tmux.wait_screen(r"^  WireGuard port refused 4 connections$", "the new count")
    finally:
        server.close()
        bind.close()
    # A transport that checks nobody says nothing of it: nothing to count.
    plain = Device("wgplain", StreamBind("unix", unix_dir=str(unix_dir)), run_dir=str(run_dir))
    assert "wgvsock_transport_refused" not in plain.uapi_get().extra
