"""`wgvsock status` without root: formatting, rendering on rich's recording console, and the
collector against UAPI sockets served from a temporary directory."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

from wgvsock.core.crypto import generate_private_key, key_to_base64, public_key
from wgvsock.device.device import _link_states
from wgvsock.device.uapi import DeviceConfig, DeviceStatus, PeerStatus, UAPIServer
from wgvsock.ui import status as st

NOW = 1_700_000_000.0


def _console(width: int = 80) -> Console:
    # force_terminal so styles are emitted and can be checked; record to export what was shown.
    return Console(record=True, width=width, force_terminal=True, color_system="standard",
                   legacy_windows=False)


def _show(snap: st.Snapshot, width: int = 80, footer: str | None = None) -> tuple[str, str]:
    """(plain text, text with ANSI styles) of the dashboard at `width` columns."""
    console = _console(width)
    console.print(st.Dashboard(snap, (lambda s: footer) if footer else None))
    styled = console.export_text(clear=False, styles=True)
    return console.export_text(), styled


# -- pure formatting ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * 1024 - 1, "10.0 KiB"),  # rounds up into the next decimal place, still 3 digits
        (123 * 1024, "123 KiB"),
        (1023.4 * 1024, "1023 KiB"),
        (1023.6 * 1024, "1.00 MiB"),  # carried, not "1024 KiB"
        (5 * 1024**2 + 300 * 1024, "5.29 MiB"),
        (3 * 1024**3, "3.00 GiB"),
        (2 * 1024**4, "2.00 TiB"),
    ],
)
def test_human_bytes(n: float, text: str) -> None:
    assert st.human_bytes(n) == text
    assert len(text) <= 8  # the column is 8 wide


def test_human_bytes_never_wider_than_its_column() -> None:
    # Up to the UAPI's largest counter, 2^64 - 1 (it read "16384 PiB", cut in the column).
    assert st.human_bytes(2**64 - 1) == "16.0 EiB"
    for exp in range(0, 64):
        for mant in (1.0, 1.4999, 9.995, 9.9999, 99.95, 99.999, 999.5, 1023.49, 1023.5):
            assert len(st.human_bytes(mant * 2**exp)) <= 8, mant * 2**exp


@pytest.mark.parametrize(
    ("rate", "text"),
    [(None, "-"), (0, "0 B/s"), (-3.0, "0 B/s"), (512.7, "512 B/s"),
     (1.2 * 1024**2, "1.20 MiB/s"), (250 * 1024, "250 KiB/s")],
)
def test_human_rate(rate: float | None, text: str) -> None:
    assert st.human_rate(rate) == text


@pytest.mark.parametrize(
    ("age", "text"),
    [
        (None, "never"),
        (0, "0 s ago"),
        (-1.5, "0 s ago"),  # the daemon's and our clock readings differ a little
        (-4.0, "in future"),  # the wall clock was stepped back: never "0 s ago" in green
        (12.7, "12 s ago"),
        (59.99, "59 s ago"),
        (60, "1 min ago"),
        (3 * 60 + 59, "3 min ago"),
        (3599, "59 min ago"),
        (3600, "1 h ago"),
        (86399, "23 h ago"),
        (86400 * 3 + 5, "3 d ago"),
    ],
)
def test_human_age(age: float | None, text: str) -> None:
    assert st.human_age(age) == text


@pytest.mark.parametrize(
    ("age", "state"),
    [(None, "never"), (-1.5, "fresh"), (-2.5, "future"), (0, "fresh"), (119.9, "fresh"),
     (120, "rekey"), (150, "rekey"), (180, "rekey"), (180.5, "stale"), (10_000, "stale")],
)
def test_health(age: float | None, state: str) -> None:
    assert st.health(age) == state


def test_readable_endpoint() -> None:
    # Our daemon's own readable form always wins.
    assert st.readable_endpoint("127.0.0.1:7002", {"wgvsock_endpoint": "unix:/x/7002.sock"},
                                "unix") == "unix:/x/7002.sock"
    # The IPv4-CID form becomes vsock://CID:PORT only where the interface is known to be vsock.
    assert st.readable_endpoint("0.0.0.16:5000", {}, "vsock") == "vsock://16:5000"
    assert st.readable_endpoint("1.2.3.4:5000", {}, "vsock") == f"vsock://{0x01020304}:5000"
    assert st.readable_endpoint("0.0.0.16:5000", {}, None) == "0.0.0.16:5000"
    assert st.readable_endpoint("0.0.0.16:5000", {}, "udp") == "0.0.0.16:5000"
    assert st.readable_endpoint("[fd00::1]:51820", {}, "vsock") == "[fd00::1]:51820"
    assert st.readable_endpoint(None, {}, "vsock") is None


@pytest.mark.parametrize(("raw", "shown"), [
    # wireguard-go-vsock v0.2.5 names an accepted vsock connection's peer this way (seen in
    # tests/guest/test_seed_vsock.py); these forms can only be vsock, whatever the network.
    ("local(1):2323982615", "vsock://1:2323982615"),
    ("host(2):5000", "vsock://2:5000"),
    ("hypervisor(0):9", "vsock://0:9"),
    ("vm(16):8172", "vsock://16:8172"),
    # Not one of those forms: shown as given.
    ("vm(2):5000", "vm(2):5000"),
    ("local(2):5000", "local(2):5000"),
    ("host(16):5000", "host(16):5000"),
    ("vm(16):", "vm(16):"),
    ("vm(99999999999):1", "vm(99999999999):1"),
])
def test_readable_endpoint_of_the_go_releases_named_forms(raw: str, shown: str) -> None:
    assert st.readable_endpoint(raw, {}, None) == shown


def test_a_named_vsock_endpoint_tells_the_network_of_a_foreign_daemon() -> None:
    """wireguard-go-vsock has no wgvsock_network key: a peer in a named vsock form shows it is
    vsock, so its other peers' IPv4-CID endpoints read as vsock too, with their CIDs."""
    dev = {"private_key": generate_private_key(), "extra": {},
           "peers": [{"public_key": public_key(generate_private_key()), "allowed_ips": [],
                      "endpoint": "local(1):2323982615"},
                     {"public_key": public_key(generate_private_key()), "allowed_ips": [],
                      "endpoint": "0.0.0.16:5000"}]}
    iface = st.interface_view("wg0", "/run/wireguard/wg0.sock", dev, NOW)
    assert iface.network == "vsock"
    assert [(p.endpoint, p.cid) for p in iface.peers] == [("vsock://1:2323982615", 1),
                                                          ("vsock://16:5000", 16)]
    assert [p.endpoint_uapi for p in iface.peers] == ["local(1):2323982615", "0.0.0.16:5000"]
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run/wireguard", interfaces=[iface]))
    assert "network vsock" in plain and "vsock://16:5000" in plain
    assert st.Snapshot(time=NOW, run_dir="/r", interfaces=[iface]).to_json()[
        "interfaces"][0]["peers"][0]["cid"] == 1
    # Without such a peer the network stays unknown and the IPv4 form stays as it is.
    dev["peers"].pop(0)
    iface = st.interface_view("wg0", "/run/wireguard/wg0.sock", dev, NOW)
    assert iface.network is None and iface.peers[0].endpoint == "0.0.0.16:5000"


def test_link_states_for_the_uapi() -> None:
    """The per-peer keys the device adds: connected wins over a dialler's own state."""
    links = _link_states({
        "connections": [{"endpoint": "unix:/r/1.sock", "direction": "out", "age": 3.0},
                        {"endpoint": "unix:<inbound #4>", "direction": "in", "age": 1.0},
                        {"endpoint": "unix:<inbound #5>", "direction": "in", "age": 1.0,
                         "stalled": True, "dropped": 3}],
        "dialers": [
            {"endpoint": "unix:/r/1.sock", "state": "connected", "reconnects": 2},
            {"endpoint": "vsock://16:5000", "state": "backoff", "reconnects": 5},
            {"endpoint": "vsock://17:5000", "state": "connecting", "reconnects": 0},
        ],
    })
    assert links == {
        "unix:/r/1.sock": {"wgvsock_conn": "connected", "wgvsock_reconnects": "2"},
        "unix:<inbound #4>": {"wgvsock_conn": "connected"},
        "unix:<inbound #5>": {"wgvsock_conn": "stalled"},
        "vsock://16:5000": {"wgvsock_conn": "backoff", "wgvsock_reconnects": "5"},
        "vsock://17:5000": {"wgvsock_conn": "dialing", "wgvsock_reconnects": "0"},
    }
    assert _link_states({"network": "udp", "stream": False}) is None


# -- rendering ---------------------------------------------------------------------------------


def _peer(key: str, age: float | None, **kw: object) -> st.PeerView:
    p = st.PeerView(public_key=key, handshake_age=age, health=st.health(age),
                    latest_handshake=int(NOW - age) if age is not None else 0)
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def _snapshot() -> st.Snapshot:
    parent = st.InterfaceView(
        name="wg0", socket="/run/wg0.sock",
        public_key="PARENTKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", listen_port=5000,
        network="vsock", role="parent", profile="demo", attested=True,
        peers=[
            _peer("FRESHKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", 12.0, label="enclave", cid=16,
                  attested=True, attestation="attested", endpoint="vsock://16:5000",
                  rx_bytes=5 * 1024**2,
                  tx_bytes=1234, rx_rate=1.2 * 1024**2, tx_rate=0.0, persistent_keepalive=25,
                  allowed_ips=["10.0.0.2/32", "fd00::2/128"], connection="connected",
                  reconnects=2),
            _peer("REKEYKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", 150.0,
                  endpoint="unix:/var/run/wgvsock/a/very/long/directory/name/7002.sock",
                  connection="backoff"),
            _peer("STALEKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", 3 * 60 + 5.0,
                  endpoint="192.168.1.1:51820", allowed_ips=[f"10.1.{i}.0/24" for i in range(12)]),
            _peer("NEVERKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", None),
        ],
    )
    broken = st.InterfaceView(
        name="wg9", socket="/run/wg9.sock",
        error="connection refused on /run/wg9.sock: stale socket, no daemon is serving it",
    )
    return st.Snapshot(time=NOW, run_dir="/run", interfaces=[parent, broken])


def test_dashboard_rows_units_and_labels() -> None:
    plain, _ = _show(_snapshot())
    lines = plain.splitlines()
    assert lines[0].startswith("wgvsock status · 2 interfaces · 4 peers · rx 5.00 MiB")
    assert "1 unreadable" in plain
    head = next(line for line in lines if line.startswith("wg0"))
    for part in ("parent (profile demo)", "key PARENTKE…", "port 5000", "network vsock",
                 "4 peers"):
        assert part in head
    row = next(line for line in lines if "FRESHKEY" in line)
    assert re.search(r"vsock://16:5000 +12 s ago +5\.00 MiB +1\.21 KiB +1\.20 MiB/s +0 B/s$", row)
    after = lines[lines.index(row) + 1 :]
    details = " ".join(x.strip() for x in after[: next(
        n for n, x in enumerate(after) if not x.startswith(" " * 12))])
    for part in ("enclave CID 16", "attested ✓", "connected, 2 reconnects", "keepalive 25 s",
                 "allowed 10.0.0.2/32, fd00::2/128"):
        assert part in details
    # A long endpoint keeps its distinctive tail.
    assert re.search(r"…[a-z/]*7002\.sock", plain)
    assert "2 min ago" in plain and "3 min ago" in plain and "never" in plain
    assert "connection failed, retrying" in plain
    # Rates are "-" until a second sample exists.
    never = next(line for line in lines if "NEVERKEY" in line)
    assert never.split()[-2:] == ["-", "-"]


def test_a_link_that_is_down_is_said_in_red() -> None:
    """Down, the daemon has no sessions (wgvsock_link): the header says so first, and only
    then; a daemon that does not say (wireguard-go) shows nothing."""
    def head(extra: dict[str, str]) -> tuple[str | None, str, str]:
        iface = st.interface_view("wg0", "/run/wireguard/wg0.sock",
                                  {"extra": extra, "peers": []}, NOW)
        plain, styled = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]))
        return (iface.link, next(line for line in plain.splitlines() if line.startswith("wg0")),
                styled)

    link, line, styled = head({"wgvsock_link": "down"})
    assert link == "down" and line.startswith("wg0  link down  ")
    assert "\x1b[1;31mlink down\x1b[0m" in styled
    for extra, state in (({"wgvsock_link": "up"}, "up"), ({}, None),
                         ({"wgvsock_link": "\x1b[2Jdown"}, None)):
        link, line, _ = head(extra)
        assert link == state and "link" not in line


@pytest.mark.parametrize(("age_text", "colour"), [
    ("12 s ago", "32"),  # fresh: green
    ("2 min ago", "33"),  # due for rekey: yellow
    ("3 min ago", "31"),  # stale: red
    ("never", "2"),  # never: dim
])
def test_handshake_colour_by_health(age_text: str, colour: str) -> None:
    _, styled = _show(_snapshot())
    assert re.search(rf"\x1b\[{colour}m *{age_text}", styled), styled


@pytest.mark.parametrize("width", [80, 100, 60, 50])
def test_fits_the_width(width: int) -> None:
    plain, _ = _show(_snapshot(), width, footer="at 12:00:00 · every 1 s · q quits")
    for line in plain.splitlines():
        assert len(line) <= width, line
    # Every peer keeps its row; in narrow terminals the rates move to the detail line.
    for key in ("FRESHKEY", "REKEYKEY", "STALEKEY", "NEVERKEY"):
        assert key in plain
    if width < st.WIDE_MIN:
        assert "rx/s 1.20 MiB/s" in plain
    else:
        assert re.search(r"rx/s +tx/s$", plain.splitlines()[plain.splitlines().index(
            next(x for x in plain.splitlines() if x.startswith("wg0"))) + 1])


def test_unreadable_interface_line() -> None:
    plain, styled = _show(_snapshot())
    line = next(x for x in plain.splitlines() if "wg9" in x)
    assert line.startswith("✗ wg9  connection refused")
    assert "stale socket" in plain
    assert "\x1b[31m" in styled  # said in red


def test_empty_state_says_what_to_do(tmp_path: Path) -> None:
    snap = st.Collector(run_dir=str(tmp_path)).sample()
    plain = " ".join(_show(snap)[0].split())
    assert f"no WireGuard interfaces under {tmp_path}" in plain
    assert "wgvsock parent up --profile FILE" in plain
    assert "wireguard-go-vsock wg0" in plain
    snap = st.Collector(run_dir=str(tmp_path / "missing")).sample()
    assert "(the directory does not exist)" in " ".join(_show(snap)[0].split())


def test_view_is_cropped_to_the_screen_height() -> None:
    console = _console(80)
    console.height = 8
    opts = console.options.update(height=8)
    lines = list(console.render_lines(st.Dashboard(_snapshot()), opts))
    text = [("".join(seg.text for seg in line)).rstrip() for line in lines]
    assert len(text) == 8
    # It says what is hidden: before, only "more lines below".
    assert text[-1].startswith("… 3 more peers, 1 more interface below"), text
    # Only the lines of the last shown peer hidden: no peer or interface to count.
    snap = st.Snapshot(time=NOW, run_dir="/r", interfaces=[_snapshot().interfaces[0]])
    for height in range(4, 30):
        opts = console.options.update(height=height)
        rows = [("".join(seg.text for seg in line)).rstrip()
                for line in console.render_lines(st.Dashboard(snap), opts)]
        last = rows[-1]
        if not last.startswith("… "):
            continue
        shown = sum(any(k in row for row in rows) for k in ("FRESHKEY", "REKEYKEY",
                                                            "STALEKEY", "NEVERKEY"))
        if shown == 4:
            assert last.startswith("… more lines below"), (height, last)
        else:
            assert last.startswith(f"… {4 - shown} more peer"), (height, last)
            head = any(row.startswith("wg0") for row in rows[:-1])
            assert ("1 more interface" in last) != head, (height, rows)


def test_a_handshake_in_the_future_is_said_so_not_shown_fresh() -> None:
    """The wall clock stepped back (or the daemon's is ahead): before, "0 s ago" in green,
    as if the tunnel had just shaken hands."""
    iface = st.InterfaceView(name="wg0", socket="/s", peers=[
        _peer("FUTUREKEYAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=", -300.0)])
    plain, styled = _show(st.Snapshot(time=NOW, run_dir="/r", interfaces=[iface]))
    row = next(line for line in plain.splitlines() if "FUTUREKE" in line)
    assert re.search(r" in future +0 B +0 B", row), row
    assert "handshake 5 min in the future (clock stepped back?)" in plain
    assert "\x1b[32m" not in styled.split("FUTUREKE", 1)[1]  # no green anywhere on it
    for width in (40, 60, 100):
        assert all(len(x) <= width for x in _show(
            st.Snapshot(time=NOW, run_dir="/r", interfaces=[iface]), width)[0].splitlines())


# -- collection from real UAPI sockets ------------------------------------------------------


class _Fake:
    """A UAPI handler with a fixed state that fails the test on any `set`."""

    def __init__(self, status: DeviceStatus) -> None:
        self.status = status
        self.sets = 0

    def uapi_get(self) -> DeviceStatus:
        return self.status

    def uapi_set(self, cfg: DeviceConfig) -> None:
        self.sets += 1
        raise AssertionError("status must never send set")


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "run"
    d.mkdir()
    yield d


def _serve(run_dir: Path, name: str, status: DeviceStatus) -> tuple[UAPIServer, _Fake]:
    fake = _Fake(status)
    return UAPIServer(name, fake, str(run_dir)), fake


def _stale_socket(run_dir: Path, name: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / f"{name}.sock"))
    s.close()  # never listened: connecting is refused, as for a daemon that died


def test_collector_reads_servers_and_reports_the_stale_one(run_dir: Path) -> None:
    priv = generate_private_key()
    peer_key = public_key(generate_private_key())
    status = DeviceStatus(
        private_key=priv, listen_port=0,
        peers=[PeerStatus(public_key=peer_key, endpoint="0.0.0.16:5000",
                          last_handshake_time_sec=int(NOW) - 30, rx_bytes=100, tx_bytes=200,
                          persistent_keepalive_interval=25, allowed_ips=["10.0.0.2/32"])],
        extra={"wgvsock_network": "vsock", "wgvsock_port": "3000000000",
               "wgvsock_role": "parent", "wgvsock_profile": "demo",
               "wgvsock_attested": "false", "wgvsock_enclave_key": peer_key.hex()},
    )
    server, fake = _serve(run_dir, "wga", status)
    _stale_socket(run_dir, "wgb")
    clock = iter([10.0, 10.0, 12.0, 12.0])
    try:
        col = st.Collector(run_dir=str(run_dir), clock=lambda: next(clock), wall=lambda: NOW)
        first = col.sample()
        assert [i.name for i in first.interfaces] == ["wga", "wgb"]
        a, b = first.interfaces
        assert b.error is not None and "connection refused" in b.error
        assert a.error is None
        assert a.public_key == key_to_base64(public_key(priv))
        assert a.listen_port == 3_000_000_000  # the vsock port that listen_port cannot carry
        p = a.peers[0]
        assert (p.endpoint, p.endpoint_uapi, p.cid) == ("vsock://16:5000", "0.0.0.16:5000", 16)
        assert (p.label, p.attested, p.health) == ("enclave", False, "fresh")
        assert p.handshake_age == pytest.approx(30.0)
        assert p.rx_rate is None
        status.peers[0].rx_bytes += 1000
        status.peers[0].tx_bytes += 4096
        second = col.sample()
        p = second.interfaces[0].peers[0]
        assert (p.rx_rate, p.tx_rate) == (500.0, 2048.0)
        assert second.totals()["rx_rate"] == 500.0
        plain, _ = _show(second)
        assert "not attested" in plain and "enclave CID 16" in plain
        assert "port 3000000000" in plain
        assert "500 B/s" in plain and "2.00 KiB/s" in plain
        assert fake.sets == 0
    finally:
        server.close()


def test_counters_going_down_give_no_rate() -> None:
    state = {"rx": 5000}

    def fetch(path: str, timeout: float) -> dict:
        return {"private_key": None, "listen_port": 1, "fwmark": 0, "extra": {}, "peers": [{
            "public_key": bytes(32), "endpoint": None, "last_handshake_time_sec": 0,
            "last_handshake_time_nsec": 0, "rx_bytes": state["rx"], "tx_bytes": 0,
            "persistent_keepalive_interval": 0, "allowed_ips": [], "preshared_key": None,
            "extra": {}}]}

    ticks = iter([1.0, 2.0])
    col = st.Collector(["wg0"], "/nonexistent", fetch=fetch, clock=lambda: next(ticks))
    col.sample()
    state["rx"] = 10  # the daemon restarted
    assert col.sample().interfaces[0].peers[0].rx_rate is None


@pytest.mark.parametrize(("exc", "words"), [
    (PermissionError(13, "Permission denied"), "permission denied"),
    (ConnectionRefusedError(111, "Connection refused"), "stale socket"),
    (FileNotFoundError(2, "No such file"), "no such interface"),
    (TimeoutError("timed out"), "no answer"),
])
def test_unreadable_reasons(exc: OSError, words: str) -> None:
    def fetch(path: str, timeout: float) -> dict:
        raise exc

    snap = st.Collector(["wg0"], "/r", fetch=fetch).sample()
    assert words in (snap.interfaces[0].error or "")
    assert words in _show(snap)[0]


Answer = Callable[[socket.socket, threading.Event], None]


@contextlib.contextmanager
def raw_uapi(path: Path, reply: bytes | Answer, answers: int = 2) -> Iterator[list[bytes]]:
    """A UAPI socket at `path` that answers `answers` requests, whatever they are, with
    `reply`, or by calling `reply(conn, done)` (`done` is set when the test is over); yields
    the list of requests it received, whole."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    received: list[bytes] = []
    done = threading.Event()

    def serve() -> None:
        for _ in range(answers):
            try:
                conn, _ = listener.accept()
            except OSError:  # closed: the test is over
                return
            with conn, contextlib.suppress(OSError):
                data = b""
                while not data.endswith(b"\n\n"):
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk
                received.append(data)
                if callable(reply):
                    reply(conn, done)
                else:
                    conn.sendall(reply)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield received
    finally:
        done.set()
        with contextlib.suppress(OSError):  # wakes an accept() still waiting (close does not)
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        t.join(10)


def test_only_get_is_ever_sent(run_dir: Path) -> None:
    """A raw server records every request byte: status must send `get=1` and nothing else."""
    with raw_uapi(run_dir / "wgr.sock", b"listen_port=51820\nerrno=0\n\n") as received:
        col = st.Collector(run_dir=str(run_dir))
        col.sample()
        col.sample()
    assert received == [b"get=1\n\n", b"get=1\n\n"]


def test_main_once_json_and_text(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = DeviceStatus(private_key=generate_private_key(), listen_port=51820, peers=[
        PeerStatus(public_key=public_key(generate_private_key()), endpoint="192.0.2.1:51820",
                   last_handshake_time_sec=0, rx_bytes=7, tx_bytes=9,
                   allowed_ips=["10.9.0.0/24"])])
    server, _ = _serve(run_dir, "wgm", status)
    try:
        assert st.main(["--once", "--json", "--run-dir", str(run_dir)]) == 0
        doc = json.loads(capsys.readouterr().out)
        iface = doc["interfaces"][0]
        assert (iface["name"], iface["listen_port"], iface["network"]) == ("wgm", 51820, None)
        peer = iface["peers"][0]
        assert (peer["endpoint"], peer["rx_bytes"], peer["tx_bytes"]) == ("192.0.2.1:51820", 7, 9)
        assert (peer["latest_handshake"], peer["health"]) == (0, "never")
        assert "private_key" not in json.dumps(doc)
        # Plain text when stdout is not a terminal: no escape sequences at all.
        assert st.main(["--once", "--run-dir", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert "wgm" in out and "192.0.2.1:51820" in out and "never" in out
        assert "network unknown" in out
        _stale_socket(run_dir, "wgz")
        assert st.main(["--once", "--run-dir", str(run_dir)]) == 1
        assert "✗ wgz" in capsys.readouterr().out
        assert st.main(["--once", "--run-dir", str(run_dir), "../x"]) == 2
    finally:
        server.close()


def test_env_run_dir_is_the_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(st.ENV_RUN_DIR, str(tmp_path))
    assert st.Collector().run_dir == str(tmp_path)
    assert os.fspath(tmp_path) in _show(st.Collector().sample())[0]


@pytest.mark.parametrize(("value", "attested", "debug", "state", "shown"), [
    ("true", True, False, "attested", "attested ✓"),
    ("false", False, False, "unattested", "not attested"),
    # Issue 12, item 5: a debug-mode enclave that allow_debug let in is shown as such.
    ("debug", False, True, "debug", "debug enclave, not attested"),
    # A genuine enclave with no PCR0 pinned: any image would have passed.
    ("genuine", False, False, "genuine", "genuine enclave, image not pinned"),
    # A word this version does not know says nothing.
    ("maybe", None, False, None, None),
])
def test_attestation_states(value: str, attested: bool | None, debug: bool, state: str | None,
                            shown: str | None) -> None:
    enclave = public_key(generate_private_key())
    dev = {"private_key": generate_private_key(),
           "peers": [{"public_key": enclave, "allowed_ips": []}],
           "extra": {"wgvsock_role": "parent", "wgvsock_attested": value,
                     "wgvsock_enclave_key": enclave.hex()}}
    iface = st.interface_view("wg0", "/run/wireguard/wg0.sock", dev, NOW)
    assert (iface.attested, iface.debug, iface.attestation) == (attested, debug, state)
    peer = iface.peers[0]
    assert (peer.label, peer.attested, peer.debug, peer.attestation) == (
        "enclave", attested, debug, state)
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run/wireguard", interfaces=[iface]))
    if shown is not None:
        assert shown in plain
    if state != "attested":
        assert "attested ✓" not in plain
    shown_json = st.Snapshot(time=NOW, run_dir="/r", interfaces=[iface]).to_json()[
        "interfaces"][0]
    assert (shown_json["debug"], shown_json["attestation"]) == (debug, state)
    assert shown_json["peers"][0]["attestation"] == state


def test_on_a_parent_only_the_enclaves_peer_is_the_attested_enclave() -> None:
    """A peer added by hand (`wg set wg0 peer X ...`) beside the enclave is a plain peer: the
    parent's verdict is about the key that registered, which it names in its reply."""
    enclave, other = public_key(generate_private_key()), public_key(generate_private_key())
    dev = {"private_key": generate_private_key(),
           "peers": [{"public_key": other, "allowed_ips": []},
                     {"public_key": enclave, "allowed_ips": []}],
           "extra": {"wgvsock_role": "parent", "wgvsock_attested": "true",
                     "wgvsock_enclave_key": enclave.hex()}}
    iface = st.interface_view("wg0", "/run/wireguard/wg0.sock", dev, NOW)
    shown = {p.public_key: (p.label, p.attested) for p in iface.peers}
    assert shown == {key_to_base64(enclave): ("enclave", True),
                     key_to_base64(other): (None, None)}
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run/wireguard", interfaces=[iface]))
    assert plain.count("attested ✓") == 1
    # Without the enclave's key (no enclave registered) no peer is taken for it.
    del dev["extra"]["wgvsock_enclave_key"]
    iface = st.interface_view("wg0", "/run/wireguard/wg0.sock", dev, NOW)
    assert all((p.label, p.attested) == (None, None) for p in iface.peers)


def test_a_foreign_daemons_words_cannot_drive_the_terminal(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever a socket in the run directory answers, and whatever its file is called, the
    dashboard shows it escaped: no escape sequence, carriage return or bell reaches the
    operator's terminal. (A line break cannot arrive: the UAPI is a line protocol.)"""
    evil = "\x1b[2J\x1b]0;owned\x07\rdone"
    name = "wg\x1b[8m"
    peer_key = public_key(generate_private_key()).hex()
    reply = (f"listen_port=51820\nwgvsock_network={evil}\nwgvsock_role={evil}\n"
             f"wgvsock_profile={evil}\npublic_key={peer_key}\nendpoint={evil}\n"
             f"wgvsock_role={evil}\nwgvsock_conn={evil}\nallowed_ip=10.0.0.1/32{evil}\n"
             f"errno=0\n\n").encode()
    with raw_uapi(run_dir / f"{name}.sock", reply):
        snap = st.Collector(None, str(run_dir)).sample()
        (iface,) = snap.interfaces
        assert iface.error is None, iface.error
        plain, styled = _show(snap, width=200)
        shown = st.main(["--once", "--run-dir", str(run_dir)])
    out = capsys.readouterr().out
    assert shown == 0
    for text in (plain, out, styled):
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # rich's own styles aside
        for c in ("\x1b", "\x07", "\r"):
            assert c not in text, (c, text)
    assert "\\x1b[2J" in plain and "\\x1b[8m" in plain  # shown, not obeyed


# -- the parent's control-channel refusals ------------------------------------------------------

PCR_REASON = ("attestation refused: PCR0 is 2b90602f0a1b2c3d..., expected 7158862b0a1b2c3d... "
              "(the image is not the one pinned)")


def _refused_parent(extra: dict[str, str], peers: list | None = None) -> st.InterfaceView:
    return st.interface_view(
        "wg0", "/run/wireguard/wg0.sock",
        {"private_key": generate_private_key(), "peers": peers or [],
         "extra": {"wgvsock_role": "parent", "wgvsock_profile": "demo", **extra}}, NOW)


def test_control_refusals_are_read_from_the_uapi_keys() -> None:
    iface = _refused_parent({
        "wgvsock_control_refused_1": f"registration 3 12 CID 16; {PCR_REASON}",
        "wgvsock_control_refused_2": "throttled 2 13 CID 16; too many registrations (at most "
                                     "5 at once, then one every 1 s); later",
        "wgvsock_control_refused_3": "connection 1 40 CID 17; CID 17 is not the enclave",
        "wgvsock_control_refused_4": "not one",
        "wgvsock_control_refused_5": "connection 1 1 CID 18; after a gap: not read",
    })
    assert [(r.kind, r.count, r.age, r.who) for r in iface.control_refusals] == [
        ("registration", 3, 12, "CID 16"), ("throttled", 2, 13, "CID 16"),
        ("connection", 1, 40, "CID 17")]
    assert iface.control_refusals[0].reason == PCR_REASON
    # The reason's own "; " stays in it: only the first one ends who.
    assert iface.control_refusals[1].reason.endswith("1 s); later")
    as_json = st.Snapshot(time=NOW, run_dir="/r", interfaces=[iface]).to_json()
    assert as_json["interfaces"][0]["control_refusals"][0] == {
        "kind": "registration", "who": "CID 16", "reason": PCR_REASON, "count": 3, "age": 12}
    # Other daemons say nothing of the kind.
    assert st.interface_view("wg0", "/s", {"peers": [], "extra": {}}, NOW).control_refusals == []


def test_a_refused_enclave_is_shown_where_its_peer_would_be() -> None:
    """Before: "no peers configured", as if no enclave had started."""
    iface = _refused_parent({
        "wgvsock_control_refused_1": f"registration 3 12 CID 16; {PCR_REASON}",
        "wgvsock_control_refused_2": "connection 1 65 CID 17; CID 17 is not the enclave",
    })
    plain, styled = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 200)
    lines = plain.splitlines()
    head = next(n for n, line in enumerate(lines) if line.startswith("wg0"))
    assert lines[head + 1] == "  no enclave admitted; the control port refused:"
    assert lines[head + 2] == f"    enclave refused 3 times (last 12 s ago, CID 16): {PCR_REASON}"
    assert lines[head + 3] == ("    connection refused (1 min ago, CID 17): CID 17 is not the "
                               "enclave")
    assert "no peers configured" not in plain
    assert "\x1b[1;31menclave refused 3 times" in styled  # in bold red
    # With the enclave's earlier peer still there (a restarted enclave refused): above its row.
    peer = {"public_key": public_key(generate_private_key()), "allowed_ips": []}
    iface = _refused_parent({"wgvsock_control_refused_1": f"registration 1 2 CID 16; {PCR_REASON}"},
                            [peer])
    lines = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 200)[0].splitlines()
    at = next(n for n, line in enumerate(lines) if "enclave refused (2 s ago, CID 16)" in line)
    assert lines[at + 1].split()[:2] == ["peer", "endpoint"]
    assert "no enclave admitted" not in "\n".join(lines)


@pytest.mark.parametrize("width", [80, 60, 40, 30])
def test_control_refusals_fit_narrow_terminals(width: int) -> None:
    iface = _refused_parent({
        "wgvsock_control_refused_1": f"registration 12345 99999 CID 4294967295; {PCR_REASON}",
        "wgvsock_control_refused_2": "throttled 2 1 pid 4242; " + "long " * 60,
    })
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), width)
    for line in plain.splitlines():
        assert len(line) <= width, (width, line)
    flat = " ".join(plain.split())
    assert "enclave refused 12345 times (last 1 d ago, CID 4294967295):" in flat
    assert PCR_REASON in flat


def test_a_parent_whose_enclave_never_registered_says_it_waits_for_one() -> None:
    """It said "no peers configured", which reads as a mistake in the profile: a parent's
    only peer is its enclave, added when the enclave registers."""
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[_refused_parent({})]))
    assert "no peers configured" not in plain and "refused" not in plain
    assert "  no enclave yet: the parent adds it as its peer when `wgvsock enclave up`\n" \
        "    registers on the control port\n" in plain, plain
    # Another daemon's interface (no role) has peers configured by hand, or none.
    other = st.interface_view("wg0", "/s", {"private_key": generate_private_key(), "peers": [],
                                            "extra": {}}, NOW)
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[other]))
    assert "  no peers configured" in plain and "enclave" not in plain


def test_a_peer_without_a_connection_says_so_in_words() -> None:
    """The enclave gone, the parent's peer showed "· none ·" among its details: none of what?"""
    peer = {"public_key": public_key(generate_private_key()), "allowed_ips": [],
            "extra": {"wgvsock_conn": "none"}}
    iface = _refused_parent({}, [peer])
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 100)
    assert "not connected · keepalive off" in plain and "none ·" not in plain, plain
    # --json keeps the daemon's own word.
    assert iface.peers[0].connection == "none"


@pytest.mark.parametrize(("state", "shown"), [
    ("backoff", "connection failed, retrying"),
    ("stalled", "stalled: the peer stopped reading"),
    ("dialing", "dialing"),
])
def test_a_connection_state_is_said_in_an_operators_words(state: str, shown: str) -> None:
    """"backoff" was jargon: the dialler waits to try again after its connects failed (or a
    connection died young). "stalled" did not say whose side stopped."""
    peer = {"public_key": public_key(generate_private_key()), "allowed_ips": [],
            "extra": {"wgvsock_conn": state, "wgvsock_reconnects": "3"}}
    iface = _refused_parent({}, [peer])
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 120)
    assert f"{shown}, 3 reconnects · keepalive off" in plain, plain
    assert "backoff" not in plain
    assert iface.peers[0].connection == state  # --json keeps the daemon's word


def _refusal_lines(*raw: str) -> list[str]:
    extra = {f"wgvsock_refused_{i}": r for i, r in enumerate(raw, 1)}
    view = st.interface_view("wg0", "/run/wg0.sock", {"extra": extra, "peers": []}, NOW)
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[view]), 120)
    return [line.strip() for line in plain.splitlines() if " ago" in line]


def test_each_kind_of_refusal_reads_as_what_happened() -> None:
    """The line was "refused KIND WHAT": "refused denied tcp ...", a stutter, and "refused
    to-parent tcp ...", a category rather than what became of the packet."""
    assert _refusal_lines(
        "denied 3 9 tcp 198.51.100.3:80; deny 198.51.100.3/32",
        "denied 1 9 tcp 169.254.169.254:80; credentials 169.254.169.254/32",
        "blocked 3 2 udp 198.51.100.2:5432",
        "to-parent 1 5 tcp 10.77.0.1:22",
        "limited 2 5 tcp 203.0.113.9:443",
    ) == [
        "denied tcp 198.51.100.3:80, 3 times (deny 198.51.100.3/32) · 9 s ago",
        "denied tcp 169.254.169.254:80 (credentials 169.254.169.254/32) · 9 s ago",
        "blocked udp 198.51.100.2:5432, 3 times (no allow entry) · 2 s ago",
        "blocked tcp 10.77.0.1:22 (a port of the parent itself) · 5 s ago",
        "dropped tcp 203.0.113.9:443, 2 times (over parent.egress.max_connections) · 5 s ago",
    ]
    assert _refusal_lines(  # (the dashboard shows 5)
        "spoofed 4 5 from 10.9.9.9",
        "forged 1 5 icmp 10.0.0.2 quoting tcp 10.0.0.2:41234 -> 198.51.100.2:80",
        "dns 1 60 tracker.example; not allowed",
    ) == [
        "spoofed packet from 10.9.9.9, 4 times · 5 s ago",
        "forged icmp 10.0.0.2 quoting tcp 10.0.0.2:41234 -> 198.51.100.2:80 · 5 s ago",
        "DNS refused tracker.example (not allowed) · 1 min ago",
    ]


def test_a_refusal_of_a_kind_this_release_does_not_know_says_refused() -> None:
    assert _refusal_lines("throttled 2 5 tcp 203.0.113.9:443") == [
        "refused throttled tcp 203.0.113.9:443, 2 times · 5 s ago"]


# As long as nitro-cli's own words make it: the fix at its end must not be cut off.
RUN_FAILED = ("run-enclave failed: [ E26 ] Insufficient memory requested. User provided "
              "`memory` is 256 MB, but based on the EIF file size, the minimum memory should "
              "be 512 MB; set parent.enclave.memory_mib to at least 512 (or make the image "
              "smaller)")


def test_why_the_parents_enclave_is_not_running_is_shown_where_its_peer_would_be() -> None:
    """A parent that starts its enclave (parent.enclave) and whose run-enclave failed said
    only that no enclave had registered: the reason, with its fix, was in its log alone."""
    iface = _refused_parent({"wgvsock_enclave_down": RUN_FAILED})
    assert iface.enclave_down == RUN_FAILED
    plain, styled = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 400)
    assert f"  enclave not running: {RUN_FAILED}\n" in plain, plain
    assert "no enclave yet" not in plain
    # Said in bold red; the reason in plain text, as the control port's refusals are.
    assert "\x1b[1;31menclave not running: \x1b[0mrun-enclave failed" in styled, styled
    # Wrapped to a narrow window, words whole.
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 40)
    assert all(len(line) <= 40 for line in plain.splitlines()), plain
    assert "memory_mib to at least 512" in " ".join(plain.split())
    # What another daemon (no parent role) says of it is not taken for a parent's word.
    other = st.interface_view("wg0", "/s", {"peers": [], "extra": {
        "wgvsock_enclave_down": RUN_FAILED}}, NOW)
    assert other.enclave_down is None


def test_a_parents_word_on_its_enclave_cannot_drive_the_terminal() -> None:
    iface = _refused_parent({"wgvsock_enclave_down": "exited\x1b[2J\x1b]0;owned\x07 badly"})
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), 200)
    assert "\x1b" not in plain and "\x07" not in plain


def test_the_parent_says_why_its_enclave_is_not_running_in_its_status_keys() -> None:
    from types import SimpleNamespace

    from wgvsock.roles.parent import Parent
    from wgvsock.services.profile import parse_profile

    parent = Parent(parse_profile("name: a\nparent:\n  enclave: {eif: /x.eif}\n"))
    assert "wgvsock_enclave_down" not in parent._status_keys()  # no supervisor yet
    parent.supervisor = SimpleNamespace(info=None, last_reason=RUN_FAILED + "\nsecond\r\0line")
    assert parent._status_keys()["wgvsock_enclave_down"] == RUN_FAILED + " second line"
    parent.supervisor = SimpleNamespace(info=object(), last_reason=RUN_FAILED)  # runs again
    assert "wgvsock_enclave_down" not in parent._status_keys()


@pytest.mark.parametrize("columns", ["120", "60"])
def test_once_leaves_out_the_rates_it_can_never_have(
        run_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        columns: str) -> None:
    """A rate needs two samples: --once showed "-" in both rate columns (or "rx/s -  tx/s -"
    on each peer's detail line in a narrow terminal), which nothing in it could ever fill."""
    monkeypatch.setenv("COLUMNS", columns)
    status = DeviceStatus(private_key=generate_private_key(), listen_port=51820, peers=[
        PeerStatus(public_key=public_key(generate_private_key()), endpoint="192.0.2.1:51820",
                   rx_bytes=7, tx_bytes=9, allowed_ips=["10.9.0.0/24"])])
    server, _ = _serve(run_dir, "wgm", status)
    try:
        assert st.main(["--once", "--run-dir", str(run_dir)]) == 0
        out = capsys.readouterr().out
    finally:
        server.close()
    assert "rx/s" not in out and "tx/s" not in out, out
    header = next(line for line in out.splitlines() if line.split()[:2] == ["peer", "endpoint"])
    assert header.split() == ["peer", "endpoint", "handshake", "rx", "tx"]
    assert all(len(line) <= int(columns) for line in out.splitlines()), out


# -- the WireGuard port's refusals (the transport's admission check) ---------------------------


def test_the_wireguard_ports_refusals_are_counted_beside_the_control_ports() -> None:
    """Before: connections the parent's WireGuard port closed at accept (another enclave or
    VM's CID: Bind.refuse_from) were only in the metrics and in the log at DEBUG, while the
    control port's refusals showed; the dashboard said nothing of them."""
    iface = _refused_parent({"wgvsock_transport_refused": "3"})
    assert iface.transport_refused == 3
    plain, styled = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]))
    lines = plain.splitlines()
    head = next(n for n, line in enumerate(lines) if line.startswith("wg0"))
    assert lines[head + 1] == "  WireGuard port refused 3 connections"
    assert "\x1b[1;31mWireGuard port refused 3 connections" in styled  # in bold red
    assert st.Snapshot(time=NOW, run_dir="/r", interfaces=[iface]).to_json()[
        "interfaces"][0]["transport_refused"] == 3
    # Beside the egress counters, on their line; one refusal is one connection.
    iface = _refused_parent({"wgvsock_transport_refused": "1", "wgvsock_egress_allowed": "5",
                             "wgvsock_egress_denied": "0", "wgvsock_egress_blocked": "0"})
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]))
    assert re.search(r"^  egress allowed 5 .* WireGuard port refused 1 connection$", plain,
                     re.M), plain
    # None refused: nothing said (the count is in --json); a daemon that does not count
    # (wireguard-go, an enclave, a stand-in with no check) or a count that is not one: None.
    iface = _refused_parent({"wgvsock_transport_refused": "0"})
    assert iface.transport_refused == 0
    assert "refused" not in _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]))[0]
    for extra in ({}, {"wgvsock_transport_refused": "²"}, {"wgvsock_transport_refused": "-1"}):
        assert _refused_parent(extra).transport_refused is None


@pytest.mark.parametrize("width", [80, 40, 30])
def test_the_wireguard_ports_refusals_fit_narrow_terminals(width: int) -> None:
    iface = _refused_parent({"wgvsock_transport_refused": str(10**18),
                             "wgvsock_dns_queries": "12345", "wgvsock_dns_refused": "7"})
    plain, _ = _show(st.Snapshot(time=NOW, run_dir="/run", interfaces=[iface]), width)
    for line in plain.splitlines():
        assert len(line) <= width, (width, line)
    assert f"WireGuard port refused {10**18} connections" in " ".join(plain.split())
