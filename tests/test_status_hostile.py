"""What a misbehaving UAPI socket, a huge daemon or an odd start cannot do to `wgvsock status`:
take the whole dashboard down, hold it past its timeout, fill its memory, make a redraw slow,
or make `q` wait. (Any process may put a socket in the run directory.)"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.device.uapi import UAPIError, _complete, uapi_get
from wgvsock.ui import status as st

from .test_status_format import raw_uapi


def _reply(*lines: str) -> bytes:
    return ("".join(line + "\n" for line in lines) + "errno=0\n\n").encode()


def test_a_number_that_is_not_ascii_digits_is_ignored(tmp_path: Path) -> None:
    """str.isdigit() accepts "²" and int() then raised, taking every interface off the
    dashboard; 5000 digits made int() raise too (Python's limit on long conversions)."""
    peer = public_key(generate_private_key()).hex()
    odd = {"wga": "²", "wgb": "9" * 5000, "wgc": "٣"}
    with contextlib.ExitStack() as stack:
        for name, value in odd.items():
            stack.enter_context(raw_uapi(
                tmp_path / f"{name}.sock",
                lambda conn, done, v=value: conn.sendall(_reply(
                    "listen_port=51820", f"wgvsock_port={v}", f"public_key={peer}",
                    f"wgvsock_reconnects={v}"))))
        snap = st.Collector(None, str(tmp_path)).sample()
    assert [i.name for i in snap.interfaces] == ["wga", "wgb", "wgc"]
    for iface in snap.interfaces:
        assert iface.error is None, iface.error
        assert iface.listen_port == 51820  # the UAPI's own, not the odd extra key
        assert iface.peers[0].reconnects is None


def test_a_reply_the_view_cannot_take_costs_only_its_own_interface(tmp_path: Path) -> None:
    good = {"listen_port": 1, "peers": [], "extra": {}}

    def fetch(path: str, timeout: float) -> dict:
        if path.endswith("wgbad.sock"):
            return {"listen_port": 1, "peers": [{"public_key": "not bytes"}], "extra": {}}
        return good

    snap = st.Collector(["wgbad", "wgok"], str(tmp_path), fetch=fetch).sample()
    bad, ok = snap.interfaces
    assert bad.error is not None and bad.error.startswith(
        f"cannot show the reply of {tmp_path}/wgbad.sock: ")
    assert ok.error is None and ok.listen_port == 1


@pytest.mark.parametrize("names", [["wgbad"], ["wgbad", "wgok"]], ids=["alone", "threads"])
def test_an_unexpected_error_reading_one_interface_is_its_error_row(tmp_path: Path,
                                                                    names: list[str]) -> None:
    """Before: an exception _read does not expect (a bug in the UAPI client, say) left that
    interface's slot empty when read by a thread, and sample() failed later with a TypeError
    about unpacking None, or went up from sample() as it was when alone; now it is that
    interface's error, as an unreachable daemon's is."""
    def fetch(path: str, timeout: float) -> dict:
        if path.endswith("wgbad.sock"):
            raise RuntimeError("boom")
        return {"listen_port": 1, "peers": [], "extra": {}}

    snap = st.Collector(names, str(tmp_path), fetch=fetch).sample()
    assert [i.name for i in snap.interfaces] == names
    bad = snap.interfaces[0]
    assert bad.error == f"cannot read {tmp_path}/wgbad.sock: RuntimeError('boom')"
    assert all(i.error is None and i.listen_port == 1 for i in snap.interfaces[1:])


def test_a_reply_dripped_a_byte_at_a_time_is_cut_off_at_the_timeout(tmp_path: Path) -> None:
    """The timeout bounds the whole exchange: before, it bounded each read, and a socket that
    sent a byte every 100 ms held the dashboard (and its Ctrl-C) for as long as it liked."""
    def drip(conn: socket.socket, done: threading.Event) -> None:
        while not done.wait(0.1):
            conn.sendall(b"x")

    # Longer than uapi_get's 2 s default, which must not be what ends it; a timeout per read
    # would never end. The bound above it leaves a busy CI's pauses room.
    timeout = 3.0
    path = tmp_path / "wgdrip.sock"
    with raw_uapi(path, drip):
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            uapi_get(str(path), timeout=timeout)
        took = time.monotonic() - started
    assert timeout <= took < timeout + 3, took
    words = st._describe_error(TimeoutError(), str(path))
    assert words == (f"no answer: {path} did not reply within 2 s (daemon hung? --timeout "
                     "waits longer)")


def test_timeout_sets_how_long_each_daemon_may_take(tmp_path: Path) -> None:
    """--timeout: a slow machine (or a daemon busy for a while) is given longer, and the error
    names the time that was waited."""
    def slow(conn: socket.socket, done: threading.Event) -> None:
        if not done.wait(1.0):  # answers after 1 s: past 0.3 s, within 5 s
            conn.sendall(_reply("listen_port=7"))

    sock = tmp_path / "wgslow.sock"
    with raw_uapi(sock, slow):
        cut = subprocess.run([sys.executable, "-m", "wgvsock.ui.status", "--once", "--json",
                              "--run-dir", str(tmp_path), "--timeout", "0.3"],
                             capture_output=True, text=True, timeout=60, check=False)
    assert cut.returncode == 1, cut.stderr
    assert "did not reply within 0.3 s" in cut.stdout, cut.stdout
    sock.unlink()
    with raw_uapi(sock, slow):
        waited = subprocess.run([sys.executable, "-m", "wgvsock.ui.status", "--once", "--json",
                                 "--run-dir", str(tmp_path), "--timeout", "5"],
                                capture_output=True, text=True, timeout=60, check=False)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert '"listen_port": 7' in waited.stdout, waited.stdout


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "3601", "soon"])
def test_a_timeout_that_is_not_a_sane_number_of_seconds_is_refused(value: str) -> None:
    res = subprocess.run([sys.executable, "-m", "wgvsock.ui.status", "--once",
                          f"--timeout={value}"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2
    assert "--timeout" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_a_reply_larger_than_the_limit_is_refused(tmp_path: Path) -> None:
    def flood(conn: socket.socket, done: threading.Event) -> None:
        chunk = b"wgvsock_x=" + b"y" * 65536 + b"\n"
        while not done.is_set():
            conn.sendall(chunk)

    path = tmp_path / "wgbig.sock"
    with raw_uapi(path, flood), pytest.raises(UAPIError, match="larger than 1 MiB"):
        uapi_get(str(path), timeout=10, limit=1 << 20)


@pytest.mark.parametrize(("buf", "whole"), [
    (b"errno=0\n\n", True),
    (b"listen_port=1\n\nerrno=0\n\n", True),
    (b"listen_port=1\nerrno=-22\n\n", True),
    (b"errno=-99999999999\n\n", True),  # whole: parse_get refuses the number at once
    (b"listen_port=1\nxerrno=0\n\n", False),
    (b"listen_port=1\n\n", False),
    (b"errno=0\n", False),
    (b"", False),
])
def test_the_end_of_a_reply_is_found_from_its_last_line(buf: bytes, whole: bool) -> None:
    assert _complete(bytearray(buf)) is whole


def _huge_snapshot(peers: int) -> st.Snapshot:
    iface = st.InterfaceView(name="wg0", socket="/run/wg0.sock", listen_port=1)
    for n in range(peers):
        iface.peers.append(st.PeerView(
            public_key=f"{n:043d}=", handshake_age=None, health="never",
            allowed_ips=[f"10.{n >> 8 & 255}.{n & 255}.{i}/32" for i in range(20)]))
    return st.Snapshot(time=0.0, run_dir="/run", interfaces=[iface])


def test_only_what_fits_the_window_is_laid_out() -> None:
    console = Console(width=100, force_terminal=True, color_system=None)
    snap = _huge_snapshot(20_000)
    lines = st.render_lines(snap, console, 100, max_lines=40)
    assert 40 < len(lines) < 60
    opts = console.options.update(height=30)
    shown = ["".join(s.text for s in line).rstrip()
             for line in console.render_lines(st.Dashboard(snap), opts)]
    assert len(shown) == 30
    rows = sum(line.startswith("  000") for line in shown)
    assert shown[-1] == (f"… {20_000 - rows} more peers below: enlarge the window, or use "
                         "--json")
    # A peer's allowed IPs are counted past the first few (--json has them all).
    assert any("10.0.0.7/32 and 12 more" in line for line in shown), shown


class _PressedQ:
    """A terminal where `q` has been pressed."""

    def wait(self, timeout: float) -> str | None:
        return "q"


def test_q_is_read_even_when_sampling_is_slower_than_the_interval() -> None:
    # Before, a sample that was due was taken without looking at the keys, so with samples
    # slower than the interval (a hung daemon) `q` waited indefinitely.
    assert list(st._ticks(1e-9, _PressedQ())) == []


def test_json_stream_with_stdin_closed(tmp_path: Path) -> None:
    """`wgvsock status --json <&-` (a service or a pipeline without stdin): sys.stdin is None."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import os, sys; os.close(0); sys.stdin = None; "
         "from wgvsock.ui.status import main; sys.exit(main(sys.argv[1:]))",
         "--json", "--interval", "0.05", "--run-dir", str(tmp_path)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith('{"time": '), proc.stderr.read() if proc.poll() else first
    finally:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize("value", ["1e12", "inf", "nan", "0", "-1"])
def test_an_interval_out_of_range_is_refused(value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        st.main(["--interval", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "must be a number of seconds above 0 and at most 86400 (a day)" in err
    assert "Traceback" not in err


def test_what_is_not_a_socket_is_named_so_not_a_stale_socket(tmp_path: Path) -> None:
    """connect() answers ECONNREFUSED for a regular file, a directory or a FIFO in the run
    directory, which read "stale socket ... (no daemon is serving it)"."""
    (tmp_path / "wgfile.sock").write_text("")
    (tmp_path / "wgdir.sock").mkdir()
    os.mkfifo(tmp_path / "wgfifo.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(str(tmp_path / "wgstale.sock"))  # bound, never listening: stale
    snap = st.Collector(None, str(tmp_path)).sample()
    errors = {i.name: i.error for i in snap.interfaces}
    assert errors == {
        "wgdir": f"not a socket: {tmp_path}/wgdir.sock is a directory, which no daemon "
                 "serves (remove it: a daemon makes its own socket as it starts)",
        "wgfifo": f"not a socket: {tmp_path}/wgfifo.sock is a FIFO, which no daemon "
                  "serves (remove it: a daemon makes its own socket as it starts)",
        "wgfile": f"not a socket: {tmp_path}/wgfile.sock is a regular file, which no daemon "
                  "serves (remove it: a daemon makes its own socket as it starts)",
        "wgstale": f"stale socket: connection refused on {tmp_path}/wgstale.sock (no daemon "
                   "is serving it: its daemon stopped without removing it, as after a crash; "
                   "started again, it replaces the socket)",
    }


def test_a_socket_of_another_kind_is_named_so(tmp_path: Path) -> None:
    """A datagram or seqpacket socket in the run directory, which a process holds: connect()
    answers EPROTOTYPE, which read "cannot read ...: Protocol wrong type for socket"."""
    held = []
    try:
        for name, kind in (("wgdgram", socket.SOCK_DGRAM), ("wgseq", socket.SOCK_SEQPACKET)):
            s = socket.socket(socket.AF_UNIX, kind)
            held.append(s)
            s.bind(str(tmp_path / f"{name}.sock"))
        held[1].listen()
        snap = st.Collector(None, str(tmp_path)).sample()
    finally:
        for s in held:
            s.close()
    errors = {i.name: i.error for i in snap.interfaces}
    assert errors == {
        name: f"not a UAPI socket: {tmp_path}/{name}.sock is a datagram or seqpacket socket, "
              "not the stream socket a WireGuard daemon serves (another program's, still open)"
        for name in ("wgdgram", "wgseq")
    }


@pytest.mark.parametrize("json_out", [False, True])
def test_once_exits_1_when_the_run_directory_cannot_be_listed(tmp_path: Path, json_out: bool,
                                                              capsys) -> None:
    """Not a directory (or not readable): nothing was read, which --once reported with exit
    0, as if every interface were fine. A run directory that does not exist is no error:
    nothing runs."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    extra = ["--json"] if json_out else []
    assert st.main(["--once", *extra, "--run-dir", str(not_a_dir)]) == 1
    assert f"cannot list {not_a_dir}: Not a directory" in " ".join(capsys.readouterr().out.split())
    assert st.main(["--once", *extra, "--run-dir", str(tmp_path / "missing")]) == 0


def test_the_live_view_is_cropped_to_the_window_and_says_so(tmp_path: Path) -> None:
    """rich's Live renders its renderable inside a Group, which hands it no height: the view
    was laid out whole on every redraw (a daemon with thousands of peers cost a redraw
    seconds) and cut at the window's bottom without the line saying there is more below, so
    an interface past the bottom was simply not there."""
    for n in range(30):  # each an unreadable interface: one line, no daemon needed
        (tmp_path / f"wg{n:02d}.sock").write_text("")
    out = io.StringIO()
    console = Console(file=out, width=60, height=10, force_terminal=True, color_system=None)
    assert st.live(run_dir=str(tmp_path), console=console, stdin=io.StringIO(),
                   duration=0.05) == 0
    # Said whole in 60 columns: the advice after it is left out rather than cut.
    assert re.search(r"\n… 2\d more interfaces below *(\x1b|$)", out.getvalue()), out.getvalue()


_LIVE = ("import io, sys; from rich.console import Console; from wgvsock.ui.status import live; "
         "sys.exit(live(run_dir=sys.argv[1], timeout=30, stdin=io.StringIO(), "
         "console=Console(file=io.StringIO(), force_terminal=True)))")


@pytest.mark.parametrize("how", ["--once", "--json", "live"])
def test_ctrl_c_while_daemons_hang_ends_at_once_and_quietly(tmp_path: Path, how: str) -> None:
    """Ctrl-C while two daemons had not answered yet: the reads went on in the thread pool's
    threads, which Python waits for at exit, so the dashboard stayed for the whole --timeout
    (up to an hour); --once and the live view's first sample printed a KeyboardInterrupt
    traceback as well."""
    asked = [threading.Event(), threading.Event()]

    def hang(event: threading.Event, conn: socket.socket, done: threading.Event) -> None:
        event.set()
        done.wait(60)

    with contextlib.ExitStack() as stack:
        for n, event in enumerate(asked):
            stack.enter_context(raw_uapi(tmp_path / f"wghang{n}.sock",
                                         lambda conn, done, e=event: hang(e, conn, done)))
        cmd = ([sys.executable, "-c", _LIVE, str(tmp_path)] if how == "live" else
               [sys.executable, "-m", "wgvsock.ui.status", how, "--timeout", "30",
                "--run-dir", str(tmp_path)])
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            assert all(e.wait(20) for e in asked), "the dashboard never asked both daemons"
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            _out, err = proc.communicate(timeout=60)
            took = time.monotonic() - started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
    assert took < 5, took
    assert "Traceback" not in err, err
    assert proc.returncode == (130 if how == "--once" else 0), err


def _live_footer(tmp_path: Path, stdin: object) -> str:
    out = io.StringIO()
    console = Console(file=out, width=100, height=12, force_terminal=True, color_system=None)
    assert st.live(run_dir=str(tmp_path), console=console, stdin=stdin,  # type: ignore[arg-type]
                   duration=0.05) == 0
    return out.getvalue()


def test_without_a_terminal_on_stdin_the_view_does_not_promise_that_q_quits(
        tmp_path: Path) -> None:
    """`wgvsock status < /dev/null` (or run by a script, or the demo under one) said "q quits",
    but with no terminal on stdin no key reaches it: it must say how to stop it instead."""
    with open(os.devnull) as devnull:
        shown = _live_footer(tmp_path, devnull)
    assert "q quits" not in shown, shown
    assert f"Ctrl-C or `kill {os.getpid()}` quits" in shown, shown


def test_with_a_terminal_on_stdin_q_quits(tmp_path: Path) -> None:
    controller, terminal = os.openpty()
    try:
        with open(terminal, closefd=False) as stdin:
            shown = _live_footer(tmp_path, stdin)
    finally:
        os.close(controller)
        os.close(terminal)
    assert "q quits" in shown and "Ctrl-C" not in shown, shown


@pytest.mark.parametrize("searchable", [True, False])
def test_a_run_directory_that_cannot_be_listed_gives_advice_that_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, searchable: bool) -> None:
    """Not root, with a run directory of mode 0700 (`WGVSOCK_RUN_DIR` under a private one):
    it advised "or name the interfaces to read", which then failed as well, since a
    directory that cannot be searched lets no socket in it be reached."""
    def listdir(path: str) -> list[str]:
        raise PermissionError(13, "Permission denied", path)

    real_access = os.access
    monkeypatch.setattr(st.os, "listdir", listdir)
    monkeypatch.setattr(st.os, "access", lambda path, mode, **kw: searchable
                        if str(path) == str(tmp_path) and mode == os.X_OK
                        else real_access(path, mode, **kw))
    names, error = st.discover(str(tmp_path))
    assert names == []
    assert error == (f"cannot list {tmp_path}: permission denied (run as root"
                     + (", or name the interfaces to read)" if searchable else ")"))
