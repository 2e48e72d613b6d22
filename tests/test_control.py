"""The control protocol against well-behaved and hostile clients, over real Unix sockets."""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import logging
import os
import socket
import struct
import threading
import time
import types
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from tests.test_acceptwait import pipe_released, wake_pipe
from tests.unsayable import Unsayable
from wgvsock.services import control
from wgvsock.services.control import (
    ControlError,
    ControlServer,
    Verdict,
    encode,
    read_message,
    register,
)

# A bound on waits for the server's thread: CI runs on a loaded 2-core machine.
WAIT = 10.0


class Recorder:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.reason = "no"
        self.installed: list[bytes] = []
        self.seen: list[tuple[bytes, bytes | None, bytes]] = []
        self.event = threading.Event()

    def verify(self, key, doc, nonce):
        self.seen.append((key, doc, nonce))
        return Verdict(self.accept, attested=doc is not None,
                       reason="" if self.accept else self.reason)

    def install(self, key, verdict):
        self.installed.append(key)
        self.event.set()


def make_server(path: str, **kw) -> tuple[ControlServer, Recorder]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    rec = Recorder()
    srv = ControlServer(listener, profile="demo", public_key=b"P" * 32, wg_port=51820,
                        verify=rec.verify, install=rec.install, **kw)
    srv.start()
    return srv, rec


@pytest.fixture
def server(tmp_path):
    path = str(tmp_path / "control.sock")
    # Each exchange (challenge to register) must fit in this: room for a busy CI's pauses in
    # the test's own thread, which plays the enclave.
    srv, rec = make_server(path, timeout=5.0)
    try:
        yield path, srv, rec
    finally:
        srv.close()


def dial(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def frame(obj) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def expect_closed(s: socket.socket, timeout: float = WAIT) -> None:
    """Reads until EOF; the server must hang up on a broken client."""
    s.settimeout(timeout)
    while s.recv(4096):
        pass


def test_register_round_trip(server):
    path, _srv, rec = server
    with dial(path) as s:
        welcome = register(s, b"E" * 32, attest=lambda nonce, key: b"doc:" + nonce)
    assert welcome.parent_public_key == b"P" * 32 and welcome.wg_port == 51820
    # The recorder's verdict pins no image: a genuine enclave, and the welcome says so.
    assert welcome.attested and welcome.state == "genuine"
    key, doc, nonce = rec.seen[0]
    assert key == b"E" * 32 and len(nonce) == 32
    assert rec.installed == [b"E" * 32]
    # The document is for a hash of the challenge, never the challenge itself: whoever answers
    # on the control port chooses the challenge, and could pass another service's through.
    assert doc == b"doc:" + control.attested_nonce(nonce) != b"doc:" + nonce
    assert control.attested_nonce(nonce) == hashlib.sha256(
        b"wgvsock control v1: attestation for this challenge\0" + nonce).digest()


@contextlib.contextmanager
def _welcome_with(**fields) -> Iterator[socket.socket]:
    """The enclave's end of a socketpair on which a parent sent a challenge and a welcome."""
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame({"v": 1, "type": "challenge", "profile": "demo",
                              "nonce": base64.b64encode(b"n" * 32).decode()}))
        parent.sendall(frame({"v": 1, "type": "welcome", "wg_port": 51820,
                              "public_key": base64.b64encode(b"P" * 32).decode(), **fields}))
        yield enclave


@pytest.mark.parametrize("attested", [True, False])
def test_welcome_says_whether_the_enclave_was_attested(attested):
    with _welcome_with(attested=attested) as enclave:
        assert register(enclave, b"E" * 32, timeout=5).attested is attested


@pytest.mark.parametrize(("fields", "state"), [
    ({"attested": True, "attestation": "genuine"}, "genuine"),
    ({"attested": True, "attestation": "attested"}, "attested"),
    ({"attested": False, "attestation": "debug"}, "debug"),
    # An older parent says only `attested`; a word not known yet reads as that says.
    ({"attested": True}, "attested"),
    ({"attested": False}, "unattested"),
    ({"attested": True, "attestation": "very\nwell"}, "attested"),
])
def test_welcome_says_how_the_enclave_was_attested(fields, state):
    with _welcome_with(**fields) as enclave:
        assert register(enclave, b"E" * 32, timeout=5).state == state


@pytest.mark.parametrize("fields", [{"attested": "false"}, {"attested": "true"},
                                    {"attested": 1}, {"attested": 0}, {"attested": None}, {}])
def test_welcome_whose_attested_is_not_a_boolean_is_refused(fields):
    # bool(...) read the string "false" as attested; the protocol says a boolean.
    with _welcome_with(**fields) as enclave, pytest.raises(ControlError, match="attested"):
        register(enclave, b"E" * 32, timeout=5)


def test_refusal_is_reported_and_nothing_installed(server):
    path, _srv, rec = server
    rec.accept = False
    with dial(path) as s, pytest.raises(ControlError, match="refused"):
        register(s, b"E" * 32)
    assert rec.installed == []


def test_a_parents_refusal_reason_reaches_the_log_escaped_and_cut_short():
    # The parent is outside the enclave's trust: 64 KiB of reason with line breaks in it must
    # not become 64 KiB of forged log lines.
    reason = "verifier error: PCR0 mismatch\nINFO enclave: attested, all fine\n" + "x" * 60000
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame({"v": 1, "type": "challenge", "profile": "demo",
                              "nonce": base64.b64encode(b"n" * 32).decode()}))
        parent.sendall(frame({"v": 1, "type": "refused", "reason": reason}))
        with pytest.raises(ControlError) as e:
            register(enclave, b"E" * 32, timeout=5)
    text = str(e.value)
    assert text.startswith("parent refused this enclave: verifier error: PCR0 mismatch\\nINFO")
    assert "\n" not in text and len(text) < 1100 and text.endswith("... (60065 chars)")


def test_a_refusal_reason_from_the_enclaves_document_is_logged_and_sent_escaped(
    server, caplog,
):
    # The verifier's reason quotes the enclave's own document (a certificate subject): the
    # parent's log line and the refusal it sends back carry it escaped and cut short.
    path, _srv, rec = server
    rec.accept = False
    rec.reason = "bad-chain: 'CN=x\nINFO control: enclave registered\x1b[2J'" + "y" * 9000
    with caplog.at_level(logging.WARNING, logger="wgvsock.control"), dial(path) as s, \
            pytest.raises(ControlError) as e:
        register(s, b"E" * 32)
    logged = [r.getMessage() for r in caplog.records if "refused an enclave" in r.getMessage()]
    assert len(logged) == 1 and logged[0].isprintable() and len(logged[0]) < 600
    assert "CN=x\\nINFO control: enclave registered\\x1b[2J" in logged[0]
    assert str(e.value).isprintable() and "... (" in str(e.value)


def test_replayed_nonce_is_refused(server):
    path, _srv, rec = server
    with dial(path) as s:
        first = read_message(s, time.monotonic() + WAIT)
    old_nonce = first["nonce"]
    with dial(path) as s:
        read_message(s, time.monotonic() + WAIT)  # a fresh challenge we ignore
        s.sendall(encode({"type": "register", "nonce": old_nonce,
                          "public_key": base64.b64encode(b"E" * 32).decode(),
                          "attestation": None}))
        reply = read_message(s, time.monotonic() + WAIT)
    assert reply["type"] == "refused" and "nonce" in reply["reason"]
    assert rec.installed == []


@pytest.mark.parametrize(
    "payload, why",
    [
        (struct.pack(">I", control.MAX_MESSAGE + 1), "oversized"),
        (struct.pack(">I", 0), "zero length"),
        (struct.pack(">I", 100) + b"{", "truncated"),
        (frame({"v": 2, "type": "register"}), "wrong version"),
        (frame({"v": 1.0, "type": "register"}), "version as a float"),
        (frame({"v": True, "type": "register"}), "version as a boolean"),
        (frame([1, 2, 3]), "not an object"),
        (struct.pack(">I", 3) + b"\xff\xfe\xfd", "not JSON"),
        (frame({"v": 1, "type": "register", "nonce": "!!", "public_key": "x"}), "bad base64"),
        (frame({"v": 1, "type": "welcome"}), "wrong message"),
    ],
)
def test_hostile_clients_are_cut_off_and_server_keeps_serving(server, payload, why):
    path, _srv, rec = server
    with dial(path) as s:
        read_message(s, time.monotonic() + WAIT)
        s.sendall(payload)
        if why == "truncated":
            s.shutdown(socket.SHUT_WR)
        expect_closed(s)
    assert rec.installed == []
    with dial(path) as s:
        assert register(s, b"F" * 32).wg_port == 51820


def test_peer_text_in_errors_is_cut_short():
    """A hostile peer's strings reach the log only cut short, never 64 KiB per connection."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frame({"v": "x" * 60000, "type": "register"}))
        with pytest.raises(control.ControlError) as err:
            read_message(b, time.monotonic() + 2)
    assert len(str(err.value)) < 120 and "60002 chars" in str(err.value)


def test_slow_client_times_out_without_blocking_others(tmp_path):
    # The server's own exchange limit, short of the 10 s default (which must not be what cuts
    # the slow client off) and longer than the other client is given to register in (which a
    # server held up by the slow one could not meet).
    limit = 4.0
    srv, _rec = make_server(str(tmp_path / "control.sock"), timeout=limit)
    slow = dial(str(tmp_path / "control.sock"))
    start = time.monotonic()  # before the server's accept, where its deadline starts
    try:
        with dial(str(tmp_path / "control.sock")) as s:
            register(s, b"G" * 32, timeout=limit - 1)
        read_message(slow, time.monotonic() + WAIT)
        expect_closed(slow)
        took = time.monotonic() - start
    finally:
        slow.close()
        srv.close()
    assert limit <= took < control.EXCHANGE_TIMEOUT - 2, took


def test_new_enclave_replaces_the_previous_connection(server):
    path, _srv, rec = server
    first = dial(path)
    try:
        register(first, b"A" * 32)
        with dial(path) as second:
            register(second, b"B" * 32)
            # the first enclave's control connection is closed by the parent
            first.settimeout(WAIT)
            data = b""
            while True:
                chunk = first.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert rec.installed == [b"A" * 32, b"B" * 32]
    finally:
        first.close()


def test_the_end_of_the_held_connection_is_logged(server, caplog, monkeypatch):
    """Before: nothing in the parent's log when the enclave's held control connection ended,
    so an enclave that exited showed nowhere until its tunnel went quiet. A connection the
    parent ends itself (replaced by a newer registration) is not reported as ended."""
    path, srv, _rec = server
    ended = threading.Event()
    hold = srv._hold

    def hold_and_tell(conn):
        hold(conn)
        ended.set()

    monkeypatch.setattr(srv, "_hold", hold_and_tell)
    with caplog.at_level(logging.INFO, logger="wgvsock.control"):
        first = dial(path)
        register(first, b"A" * 32)
        with dial(path) as second:
            register(second, b"B" * 32)
            assert ended.wait(5)  # the first, replaced
            ended.clear()
        first.close()
        assert ended.wait(5)  # the second, closed by its enclave
    lines = [r.getMessage() for r in caplog.records if "connection ended" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "the enclave's control connection ended (" in lines[0]


def test_encode_refuses_oversized_messages():
    with pytest.raises(ControlError):
        encode({"type": "register", "attestation": "x" * (control.MAX_MESSAGE + 1)})


def test_held_connection_stays_in_step_when_a_message_arrives_in_pieces(monkeypatch):
    """A ping whose body arrives after the holder's next deadline must still be read whole;
    reading it in two halves used to leave the stream out of step (a length of '{"v"')."""
    # The holder's deadlines come every 0.15 s, and it gives up after 0.45 s of silence. Each
    # body comes 0.25 s after its length, past a deadline; the next length comes with it, so
    # that a pause of this thread anywhere never reads as silence (CI once saw 0.1 s and 0.3 s
    # fail, a busy machine taking the 50 ms of slack, and later a pause between messages).
    monkeypatch.setattr(control, "PING_INTERVAL", 0.15)
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    result: list[str] = []
    holder = threading.Thread(target=lambda: result.append(control.hold_connection(ours, stop)))
    ping = encode({"type": "ping"})
    theirs.sendall(ping[:4])  # before the holder starts: its silence timer starts with it
    holder.start()
    try:
        for _ in range(2):
            time.sleep(0.25)  # the slow sender is the scenario: past the holder's deadline
            theirs.sendall(ping[4:] + ping[:4])
        time.sleep(0.25)
        # While the third is half-read: the holder ends once it has the body. An out-of-step
        # read ended it at the first body already ("message length ...").
        stop.set()
        theirs.sendall(ping[4:])
    finally:
        stop.set()
        # It notices within a second; the bound is for a machine that stalls the process
        # (3 s once ran out there, the holder not yet ended).
        holder.join(WAIT)
        ours.close()
        theirs.close()
    assert not holder.is_alive() and result == ["stopped"], result


def test_held_connection_on_a_descriptor_above_1024():
    """select() cannot watch descriptor 1024 or above: a parent with many connections would
    have dropped its enclave's control connection at once, and the enclave re-registered in a
    loop. The holder polls instead."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200: cannot open descriptor 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    a, theirs = socket.socketpair()
    os.dup2(a.fileno(), 1100)
    a.close()
    ours = socket.socket(fileno=1100)
    stop = threading.Event()
    result: list[str] = []
    holder = threading.Thread(target=lambda: result.append(control.hold_connection(ours, stop)))
    holder.start()
    try:
        theirs.settimeout(5)
        assert control.read_message(theirs, time.monotonic() + 5)["type"] == "ping"
        theirs.sendall(encode({"type": "ping"}))
        holder.join(0.3)
        assert holder.is_alive(), result
        theirs.shutdown(socket.SHUT_RDWR)  # the other side goes: the holder says why
        holder.join(5)
        assert not holder.is_alive() and result and "closed" in result[0], result
    finally:
        stop.set()
        holder.join(3.0)
        ours.close()
        theirs.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _tcp_server(**kw) -> tuple[ControlServer, Recorder, int]:
    """A server on the TCP stand-in, on 127.0.0.1: tests can then connect from 127.0.0.2 as
    a second peer (all of 127/8 is loopback)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    rec = Recorder()
    srv = ControlServer(listener, profile="demo", public_key=b"P" * 32, wg_port=51820,
                        verify=kw.pop("verify", rec.verify), install=rec.install, **kw)
    srv.start()
    return srv, rec, listener.getsockname()[1]


def _dial_tcp(port: int, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))


def test_a_flood_with_slow_attestation_cannot_lock_the_enclave_out():
    """Issue 12.3: 500 connections a second from another peer, each left silent after its
    challenge, while every verification takes 100 ms: the enclave still registers, ten
    times in a row, within 5 s. The old listener dropped the oldest pending exchange when
    full, so the flood kept pushing out the enclave's (0 of 10 got through)."""
    rec_holder: list[Recorder] = []

    def slow_verify(key, doc, nonce):
        time.sleep(0.1)  # an attestation check against a slow NSM/CA
        return rec_holder[0].verify(key, doc, nonce)

    # Ten registrations in a row from one address: more than the per-peer limit lets through,
    # which is not what this is about.
    srv, rec, port = _tcp_server(verify=slow_verify, timeout=30.0, register_burst=10)
    rec_holder.append(rec)
    stop = threading.Event()
    under_way = threading.Event()
    opened: collections.deque[socket.socket] = collections.deque()
    attempts = [0]

    def flood() -> None:
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += 1 / 500
            attempts[0] += 1
            # Refused, or the backlog is full: the flood goes on regardless.
            with contextlib.suppress(OSError):
                opened.append(_dial_tcp(port, "127.0.0.2"))
            while len(opened) > 200:  # stay within the file descriptor limit
                opened.popleft().close()
            if attempts[0] == 150:
                under_way.set()
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    flooder = threading.Thread(target=flood)
    flooder.start()
    try:
        assert under_way.wait(10)  # the flood is in full swing before the enclave shows up
        start = time.monotonic()
        registered = 0
        for i in range(10):
            with _dial_tcp(port) as s:
                register(s, bytes([i + 1]) * 32, timeout=5.0)
                registered += 1
        took = time.monotonic() - start
    finally:
        stop.set()
        flooder.join()
        for s in opened:
            s.close()
        srv.close()
    assert registered == 10
    assert took < 5, took
    assert srv.refused_connections >= 100  # the flood was turned away at the door


def test_only_the_enclave_address_is_admitted():
    srv, rec, port = _tcp_server(
        refuse_from=lambda addr: None if addr[0] == "127.0.0.1" else "expected 127.0.0.1")
    try:
        with _dial_tcp(port, "127.0.0.2") as s:
            expect_closed(s)  # no challenge at all
        with _dial_tcp(port) as s:
            assert register(s, b"E" * 32).wg_port == 51820
    finally:
        srv.close()
    assert rec.installed == [b"E" * 32]


def test_challenged_connections_are_never_evicted(tmp_path):
    """A full listener refuses the newcomer: the ones already challenged keep their exchange."""
    path = str(tmp_path / "control.sock")
    srv, rec = make_server(path, timeout=30.0, max_clients=2, max_per_peer=8)
    first, second = dial(path), dial(path)
    try:
        challenges = [read_message(s, time.monotonic() + WAIT) for s in (first, second)]
        third = dial(path)
        expect_closed(third)
        third.close()
        for s, challenge, key in zip((first, second), challenges, (b"A" * 32, b"B" * 32),
                                     strict=True):
            s.sendall(encode({"type": "register", "nonce": challenge["nonce"],
                              "public_key": base64.b64encode(key).decode(),
                              "attestation": None}))
            assert read_message(s, time.monotonic() + WAIT)["type"] == "welcome"
        assert srv.refused_connections == 1
        assert rec.installed == [b"A" * 32, b"B" * 32]
    finally:
        first.close()
        second.close()
        srv.close()


def test_one_peer_cannot_hold_more_than_its_share(tmp_path):
    path = str(tmp_path / "control.sock")
    srv, _rec = make_server(path, timeout=30.0, max_per_peer=2)
    held = [dial(path) for _ in range(2)]
    try:
        for s in held:
            read_message(s, time.monotonic() + WAIT)
        with dial(path) as s:  # this process (SO_PEERCRED pid) has its two already
            expect_closed(s)
        assert srv.refused_connections == 1
    finally:
        for s in held:
            s.close()
        srv.close()


def test_an_answered_exchange_no_longer_counts_against_its_peer(tmp_path, monkeypatch):
    """An enclave that has its answer and dials again at once is heard, however slowly the
    parent's thread for the answered connection winds down (a CI run once refused the
    retry for "2 registrations in progress")."""
    path = str(tmp_path / "control.sock")
    release = threading.Event()
    sent = control._send

    def send_then_linger(conn, msg):
        sent(conn, msg)
        if msg["type"] in ("refused", "welcome"):
            release.wait(10)  # this connection's thread is slow from here on

    monkeypatch.setattr(control, "_send", send_then_linger)
    srv, rec = make_server(path, timeout=5.0, max_per_peer=2)
    try:
        rec.accept = False
        for _ in range(4):
            with dial(path) as s, pytest.raises(ControlError, match="refused"):
                register(s, b"E" * 32)
        rec.accept = True
        with dial(path) as s:
            assert register(s, b"E" * 32).wg_port == 51820
        assert srv.refused_connections == 0
    finally:
        release.set()
        srv.close()


def test_concurrent_registrations_are_serialised(tmp_path):
    """Issue 12.7: eight enclaves register at once. Installs never overlap, and the key the
    device ends up with, the key recorded and the connection the parent keeps all agree."""
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    device: dict[str, bytes] = {}
    active: list[int] = [0]
    most: list[int] = [0]

    def install(key, verdict):
        # Like Parent._install_enclave: configure the device, then record the key. The sleep
        # widens the window two unserialised installs would interleave in.
        active[0] += 1
        most[0] = max(most[0], active[0])
        device["peer"] = key
        time.sleep(0.05)
        device["recorded"] = key
        active[0] -= 1

    srv = ControlServer(listener, profile="demo", public_key=b"P" * 32, wg_port=51820,
                        verify=lambda k, d, n: Verdict(True), install=install, max_per_peer=16,
                        register_burst=16)  # eight at once from this one process
    srv.start()
    keys = [bytes([i + 1]) * 32 for i in range(8)]
    socks = {key: dial(path) for key in keys}
    barrier = threading.Barrier(len(keys))
    errors: list[BaseException] = []

    def one(key: bytes) -> None:
        try:
            s = socks[key]
            challenge = read_message(s, time.monotonic() + 5)
            barrier.wait()
            s.sendall(encode({"type": "register", "nonce": challenge["nonce"],
                              "public_key": base64.b64encode(key).decode(),
                              "attestation": None}))
            read_message(s, time.monotonic() + 5)
        except (ControlError, OSError, threading.BrokenBarrierError) as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(k,)) for k in keys]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)

        def still_held(s: socket.socket) -> bool:
            s.settimeout(1.0)
            try:
                while s.recv(4096):
                    pass
            except TimeoutError:
                return True  # pings, no EOF: the parent holds this one
            return False

        held = [k for k in keys if still_held(socks[k])]
    finally:
        srv.close()
        for s in socks.values():
            s.close()
    assert most[0] == 1, f"{most[0]} installs ran at once"
    assert device["peer"] == device["recorded"]
    assert held == [device["peer"]], "the held connection is not the installed enclave's"
    assert srv.registrations == len(keys) - len(errors)


def test_the_parent_admits_only_the_enclaves_cid():
    """Issue 12.3: over vsock the control port takes only the enclave's CID when it is
    known: named by parent.enclave_cid, fixed by parent.enclave.cid, or reported by
    nitro-cli for the enclave `up` started (nothing before that)."""
    from wgvsock.roles.parent import Parent
    from wgvsock.services.profile import parse_profile

    named = Parent(parse_profile("name: a\nparent:\n  enclave_cid: 16\n"))._enclave_filter()
    assert named is not None and named((16, 1234)) is None and named((3, 1234))
    fixed = Parent(parse_profile(
        "name: a\nparent:\n  enclave: {eif: /x.eif, cid: 20}\n"))._enclave_filter()
    assert fixed is not None and fixed((20, 1)) is None and fixed((16, 1))
    launched = Parent(parse_profile("name: a\nparent:\n  enclave: {eif: /x.eif}\n"))
    check = launched._enclave_filter()
    assert check is not None and check((16, 1))  # not started yet: nobody
    launched.supervisor = SimpleNamespace(info=SimpleNamespace(cid=16))  # as nitro-cli said
    assert check((16, 1)) is None and check((17, 1))
    assert Parent(parse_profile("name: a\n"))._enclave_filter() is None  # unknown: anyone
    unix = "name: a\ntransport: {kind: unix}\nparent:\n  enclave_cid: 16\n"
    assert Parent(parse_profile(unix))._enclave_filter() is None  # a stand-in: no CIDs


def test_the_enclave_check_racing_close_does_not_fail():
    """Before: the check read Parent.supervisor twice, and close() sets it to None after
    stopping the enclave while both ports still accept: a connection between the two reads
    made the check raise AttributeError ('NoneType' object has no attribute 'info'), an ERROR
    line from the WireGuard port and a failure the control port's accept loop counts."""
    from wgvsock.roles.parent import Parent
    from wgvsock.services.profile import parse_profile

    class Closing(Parent):
        # The supervisor as close() leaves it mid-check: there at the first read, gone after.
        @property
        def supervisor(self):
            got, self._reads = self._reads[:1], self._reads[1:]
            return got[0] if got else None

        @supervisor.setter
        def supervisor(self, value) -> None:
            self._reads = [value]

    parent = Closing(parse_profile("name: a\nparent:\n  enclave: {eif: /x.eif}\n"))
    check = parent._enclave_filter()
    assert check is not None
    parent.supervisor = SimpleNamespace(info=SimpleNamespace(cid=16))
    assert check((16, 1)) is None  # running when the check began: let in, as a moment before
    parent.supervisor = SimpleNamespace(info=SimpleNamespace(cid=16))
    assert "expected CID 16" in (check((17, 1)) or "")


def test_an_admission_check_that_raises_refuses_without_stopping_the_listener(caplog):
    """Before: a refuse_from that raised went to the accept loop's Survivor: a traceback for
    the first connection, and the 21st within 10 s stopped the listener (and with it the
    parent), so anyone who could reach the port while the check was broken could stop it.
    Now it refuses, as the WireGuard port's bind does: counted, kept for status, one
    rate-limited error line saying where the check raised."""
    broken = [True]

    def check(addr: object) -> str | None:
        if broken[0]:
            raise RuntimeError("no CID yet")
        return None

    clock = FakeClock()  # the log's limit stays in its first 10 s whatever CI's pace
    srv, rec, port = _tcp_server(refuse_from=check, clock=clock)
    try:
        with caplog.at_level(logging.DEBUG, logger="wgvsock"):
            for _ in range(30):
                with _dial_tcp(port) as s:
                    expect_closed(s)  # no challenge at all
            broken[0] = False
            with _dial_tcp(port) as s:
                assert register(s, b"E" * 32).wg_port == 51820
    finally:
        srv.close()
    assert rec.installed == [b"E" * 32]
    assert srv.refused_connections == 30
    records = [r for r in caplog.records if r.name.startswith("wgvsock")]
    assert not any(r.exc_info for r in records), [r.getMessage() for r in records if r.exc_info]
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith("control: the admission check failed (RuntimeError: no CID "
                                "yet) at test_control.py:")
    assert errors[0].endswith(" in check; refused a connection from 127.0.0.1")


def test_an_admission_check_whose_exception_cannot_be_said_still_refuses(caplog):
    """Before: the refusal's reason took str() of the check's exception, which raised again
    inside the handler, so the connection went uncounted to the accept loop's Survivor (a
    traceback; its 21st within 10 s stopped the control port and the parent). Now it is
    refused, counted and logged in one line like any failing check's."""

    def check(addr: object) -> str | None:
        raise Unsayable

    srv, _rec, port = _tcp_server(refuse_from=check, clock=FakeClock())
    try:
        with caplog.at_level(logging.DEBUG, logger="wgvsock"):
            for _ in range(25):
                with _dial_tcp(port) as s:
                    expect_closed(s)
        (refusal,) = srv.refusals.recent()
    finally:
        srv.close()
    assert srv.refused_connections == 25
    assert refusal.reason.startswith("the admission check failed (Unsayable (its message "
                                     "cannot be shown: ValueError)) at test_control.py:")
    records = [r for r in caplog.records if r.name.startswith("wgvsock")]
    assert not any(r.exc_info for r in records), [r.getMessage() for r in records if r.exc_info]
    errors = [r.getMessage() for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors


def test_a_verifier_whose_exception_cannot_be_said_still_refuses_the_enclave(server, caplog):
    """Before: the verdict's reason took str() of the verifier's exception, which raised again
    inside the handler, so the exchange ended as a bug: no refusal sent (the enclave read only
    a hang-up), none in `wgvsock status`'s refusals. Now it is refused as any verifier error
    is, its reason said through safetext.error."""
    path, srv, rec = server

    def verify(key, doc, nonce):
        raise Unsayable

    srv._verify = verify
    with caplog.at_level(logging.DEBUG, logger="wgvsock"), dial(path) as s, \
            pytest.raises(ControlError) as e:
        register(s, b"E" * 32)
    reason = "verifier error: Unsayable (its message cannot be shown: ValueError)"
    assert str(e.value) == f"parent refused this enclave: {reason}"
    assert [r.reason for r in srv.refusals.recent()] == [reason]
    assert rec.installed == []
    assert not any("exchange failed" in r.getMessage() for r in caplog.records)


def test_an_admission_check_that_raises_is_kept_for_status():
    def check(addr: object) -> str | None:
        raise RuntimeError("no CID yet")

    srv, _rec, port = _tcp_server(refuse_from=check)
    try:
        for _ in range(3):
            with _dial_tcp(port) as s:
                expect_closed(s)
        (refusal,) = srv.refusals.recent()
    finally:
        srv.close()
    assert (refusal.kind, refusal.who, refusal.count) == ("connection", "127.0.0.1", 3)
    assert refusal.reason.startswith("the admission check failed (RuntimeError: no CID yet) "
                                     "at test_control.py:")


def test_a_refused_cid_is_told_the_cid_expected_and_where_it_comes_from():
    """Before: 'CID 17 is not the enclave', in the log and `wgvsock status` alike, which did
    not say which CID the parent lets in, nor whether the profile or nitro-cli said so."""
    from wgvsock.roles.parent import Parent
    from wgvsock.services.profile import parse_profile

    def said(profile: str, cid: int | None = None) -> str:
        parent = Parent(parse_profile(profile))
        if cid is not None:
            parent.supervisor = SimpleNamespace(info=SimpleNamespace(cid=cid))
        srv, _rec, port = _tcp_server(refuse_from=parent._enclave_filter())
        try:
            # (The TCP stand-in's address is no CID: refused as another CID's would be.)
            with _dial_tcp(port) as s:
                expect_closed(s)
            return srv.refusals.uapi_keys()["wgvsock_control_refused_1"]
        finally:
            srv.close()

    assert said("name: a\nparent:\n  enclave_cid: 16\n").endswith(
        "127.0.0.1 is not the enclave (expected CID 16, the profile's parent.enclave_cid)")
    assert said("name: a\nparent:\n  enclave: {eif: /x.eif, cid: 20}\n").endswith(
        "(expected CID 20, the profile's parent.enclave.cid)")
    launched = "name: a\nparent:\n  enclave: {eif: /x.eif}\n"
    assert said(launched, 18).endswith(
        "(expected CID 18, which nitro-cli reported for the enclave this parent started)")
    assert said(launched).endswith(
        "(expected none: the enclave this parent starts is not running, and only the CID "
        "nitro-cli reports for it is let in)")


def test_refusals_are_logged_a_few_at_a_time(tmp_path, request, caplog):
    """A refused enclave registers again (less and less often), and several enclaves of one
    profile may all be refused: the parent's warning is rate-limited, not one per attempt."""
    path = str(tmp_path / "control.sock")
    # Twenty from this one process: each must reach the verifier, not the per-peer limit. The
    # limits' clock stands still: on a busy machine the twenty could take over the log's 10 s,
    # which lets a sixth line through.
    _srv, rec = make_server(path, timeout=5.0, register_burst=20, clock=FakeClock())
    request.addfinalizer(_srv.close)
    rec.accept = False
    with caplog.at_level(logging.WARNING, logger="wgvsock.control"):
        for _ in range(20):
            with dial(path) as s, pytest.raises(ControlError, match="refused"):
                register(s, b"E" * 32)
    logged = [r.getMessage() for r in caplog.records if "refused an enclave" in r.getMessage()]
    assert len(logged) == 5, logged


def test_protocol_errors_are_logged_a_few_at_a_time(server, caplog):
    """Anyone who reaches the port can break the protocol on every connection: the parent's
    warnings about it are rate-limited, not one per connection."""
    path, _srv, _rec = server
    with caplog.at_level(logging.WARNING, logger="wgvsock.control"):
        for _ in range(200):
            with dial(path) as s:
                read_message(s, time.monotonic() + WAIT)
                s.sendall(struct.pack(">I", 0))
                expect_closed(s)
        with dial(path) as s:  # still serving
            assert register(s, b"F" * 32).wg_port == 51820
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(logged) <= 6, logged
    assert "outside 1..65536" in logged[0]


def test_the_parents_control_socket_dir_must_be_its_own(tmp_path):
    """transport.path open to others would let them unlink the control socket and bind
    their own, to answer the enclave in the parent's place."""
    from wgvsock.roles.common import control_listener

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    transport = types.SimpleNamespace(kind="unix", path=str(shared), control_port=5100)
    with pytest.raises(PermissionError, match=rf"sockets in {shared}: it has mode 0777"):
        control_listener(transport)
    assert list(shared.iterdir()) == []
    transport.path = str(tmp_path / "own")
    with contextlib.closing(control_listener(transport)) as listener:
        assert listener.getsockname() == str(tmp_path / "own" / "5100.sock")
    assert (tmp_path / "own").stat().st_mode & 0o777 == 0o700


class FakeClock:
    """The control server's clock for its rate limits, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _exchange(s: socket.socket, key: bytes, attestation: bytes | None = None) -> dict:
    """The enclave's half by hand, returning the parent's answer as it was sent."""
    challenge = read_message(s, time.monotonic() + 5)
    s.sendall(encode({"type": "register", "nonce": challenge["nonce"],
                      "public_key": base64.b64encode(key).decode(),
                      "attestation": base64.b64encode(attestation).decode()
                      if attestation else None}))
    return read_message(s, time.monotonic() + 5)


def test_one_peer_may_register_a_few_times_at_once_then_once_a_second(caplog):
    """Before: nothing limited how often one peer registered; an enclave in a loop made
    7000 registrations (installs, verifications and INFO lines) in 3 s. Now 5 at once, then
    one a second; the rest are refused, unverified, with when to come back."""
    clock = FakeClock()
    srv, rec, port = _tcp_server(clock=clock)
    try:
        for _ in range(5):
            with _dial_tcp(port) as s:
                assert _exchange(s, b"E" * 32)["type"] == "welcome"
        with caplog.at_level(logging.WARNING, logger="wgvsock.control"):
            for _ in range(20):
                with _dial_tcp(port) as s:
                    reply = _exchange(s, b"E" * 32)
                assert reply["type"] == "refused", reply
                assert "too many registrations" in reply["reason"]
                assert reply["retry_after"] == 1.0
            with _dial_tcp(port, "127.0.0.2") as s:  # another peer has its own budget
                assert _exchange(s, b"F" * 32)["type"] == "welcome"
        assert len(rec.seen) == 6 and len(rec.installed) == 6  # none of the 20 was verified
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert 1 <= len(warned) <= 2 and "127.0.0.1" in warned[0], warned
        clock.now += 0.4
        with _dial_tcp(port) as s:
            reply = _exchange(s, b"E" * 32)
        assert reply["type"] == "refused" and reply["retry_after"] == 0.6
        clock.now += 0.6
        with _dial_tcp(port) as s:
            assert _exchange(s, b"E" * 32)["type"] == "welcome"
        with _dial_tcp(port) as s:  # and that one used the second up
            assert _exchange(s, b"E" * 32)["type"] == "refused"
        clock.now += 5.0  # a quiet peer gets its burst back, and no more than that
        for expected in ["welcome"] * 5 + ["refused"]:
            with _dial_tcp(port) as s:
                assert _exchange(s, b"E" * 32)["type"] == expected
    finally:
        srv.close()


def test_a_refusal_for_registering_too_often_says_when_to_come_back(server):
    """The enclave's side reads the parent's retry_after; a refusal without one, or with one
    that is no number of seconds, is a plain refusal."""
    def refused(**extra) -> control.Refused:
        parent, enclave = socket.socketpair()
        with parent, enclave:
            parent.sendall(frame({"v": 1, "type": "challenge", "profile": "demo",
                                  "nonce": base64.b64encode(b"n" * 32).decode()}))
            parent.sendall(frame({"v": 1, "type": "refused", "reason": "too many", **extra}))
            with pytest.raises(control.Refused) as e:
                register(enclave, b"E" * 32, timeout=5)
        return e.value

    assert refused(retry_after=2.5).retry_after == 2.5
    assert refused(retry_after=3).retry_after == 3.0
    for bad in ("2", True, -1, None, [1]):
        assert getattr(refused(retry_after=bad), "retry_after", None) is None, bad
    assert getattr(refused(), "retry_after", None) is None
    # Python's json reads NaN and Infinity: they are not seconds either.
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame({"v": 1, "type": "challenge", "profile": "demo",
                              "nonce": base64.b64encode(b"n" * 32).decode()}))
        body = b'{"v":1,"type":"refused","reason":"x","retry_after":Infinity}'
        parent.sendall(struct.pack(">I", len(body)) + body)
        with pytest.raises(control.Refused) as e:
            register(enclave, b"E" * 32, timeout=5)
    assert getattr(e.value, "retry_after", None) is None


def test_registrations_that_change_nothing_are_not_logged_each_time(caplog):
    """Before: one INFO line per registration, however often one enclave registered, until
    journald's per-unit limit dropped the parent's warnings and errors with them. Now a line
    for each that changes something (the first, a new key, another attestation state, the
    first after a removal) and a few, rate-limited, for the ones that change nothing."""
    clock = FakeClock()
    srv, _rec, port = _tcp_server(clock=clock)

    def registered(key: bytes, attestation: bytes | None = None) -> list[str]:
        caplog.clear()
        clock.now += 1.0  # within the registration limit
        with _dial_tcp(port) as s:
            assert _exchange(s, key, attestation)["type"] == "welcome"
        return [r.getMessage() for r in caplog.records
                if r.levelno >= logging.INFO and "registered" in r.getMessage()]

    a, b = base64.b64encode(b"A" * 32).decode(), base64.b64encode(b"B" * 32).decode()
    try:
        with caplog.at_level(logging.INFO, logger="wgvsock.control"):
            first = registered(b"A" * 32)
            assert len(first) == 1 and a in first[0] and "unattested" in first[0], first
            repeats = [line for _ in range(30) for line in registered(b"A" * 32)]
            assert 1 <= len(repeats) <= 3, repeats
            new_key = registered(b"B" * 32)
            assert len(new_key) == 1 and b in new_key[0], new_key
            new_state = registered(b"B" * 32, attestation=b"doc")
            assert len(new_state) == 1 and "genuine" in new_state[0], new_state
            srv.revalidate(lambda: False, lambda: None)  # a reload removed the enclave
            back = registered(b"B" * 32, attestation=b"doc")
            assert len(back) == 1 and b in back[0], back
            clock.now += 60.0  # what was left out is counted on the next line let through
            later = registered(b"B" * 32, attestation=b"doc") + registered(b"B" * 32, b"doc")
            assert any("similar messages suppressed" in line for line in later), later
    finally:
        srv.close()


def test_the_limit_forgets_peers_that_have_their_burst_back():
    """Every TCP address and Unix process that registers gets a bucket: those idle long
    enough to be full again are dropped, so many peers do not grow the table for good."""
    clock = FakeClock()
    limit = control.RegistrationLimit(5, 1.0, clock)
    for peer in range(1000):
        assert limit.take(peer) == 0.0
    assert len(limit._peers) == 1000
    clock.now += 4.0  # not yet: each still lacks part of a token
    assert limit.take("x") == 0.0 and len(limit._peers) == 1001
    clock.now += 1.0
    assert limit.take("x") == 0.0 and list(limit._peers) == ["x"]
    assert limit.take(7) == 0.0  # a forgotten peer starts with its whole burst


def test_the_last_refusals_are_kept_for_status_until_an_enclave_is_admitted():
    """Before: a refusal was in the parent's log only, and `wgvsock status` showed a parent
    with no peer as if no enclave had started. Now the server keeps its last refusals,
    newest first, each with its kind, who, why, how many times and how long ago, for the
    UAPI keys wgvsock_control_refused_N; admitting an enclave clears them."""
    clock = FakeClock()
    srv, rec, port = _tcp_server(clock=clock, refuse_from=lambda addr: (
        "expected another" if addr[0] == "127.0.0.3" else None))
    rec.accept, rec.reason = False, "attestation refused: PCR0 is aa..., expected bb..."
    try:
        for _ in range(3):
            with _dial_tcp(port) as s:
                assert _exchange(s, b"E" * 32)["type"] == "refused"
        clock.now += 5
        with _dial_tcp(port, "127.0.0.3") as s:
            expect_closed(s)
        clock.now += 2
        assert srv.refusals.uapi_keys() == {
            "wgvsock_control_refused_1": ("connection 1 2 127.0.0.3; 127.0.0.3 is not the enclave "
                                          "(expected another)"),
            "wgvsock_control_refused_2": "registration 3 7 127.0.0.1; attestation refused: "
                                         "PCR0 is aa..., expected bb...",
        }
        # The same refusal again counts up and is the newest once more; a registration the
        # per-peer limit turns away says so, in words that do not change each time.
        for _ in range(5):  # its burst is back after 7 s
            with _dial_tcp(port) as s:
                assert _exchange(s, b"E" * 32)["type"] == "refused"
        for _ in range(2):
            with _dial_tcp(port) as s:
                assert _exchange(s, b"E" * 32)["retry_after"] > 0
        (first, second, third) = srv.refusals.recent()
        assert (first.kind, first.count, first.who) == ("throttled", 2, "127.0.0.1")
        assert first.reason == ("too many registrations (at most 5 at once, then one every "
                                "1 s)")
        assert (second.kind, second.count, second.reason) == ("registration", 8, rec.reason)
        assert third.kind == "connection"
        clock.now += 1
        rec.accept = True
        with _dial_tcp(port) as s:
            assert _exchange(s, b"E" * 32)["type"] == "welcome"
        assert srv.refusals.uapi_keys() == {} and srv.refusals.recent() == []
    finally:
        srv.close()


def test_the_refusal_record_keeps_the_newest_few():
    clock = FakeClock()
    record = control.ControlRefusals(clock=clock)
    for i in range(control.REFUSALS_KEPT + 3):
        record.add("connection", f"CID {i}", f"CID {i} is not the enclave")
        clock.now += 1
    shown = record.recent()
    assert [r.who for r in shown] == [f"CID {i}" for i in reversed(range(3, 3 + len(shown)))]
    assert len(shown) == control.REFUSALS_KEPT
    # Words from a peer are escaped (one line, no terminal escapes) and cut short.
    record.add("registration", "CID 16", "bad\nline\x1b[2J" + "x" * 2000)
    value = record.uapi_keys()["wgvsock_control_refused_1"]
    assert "\n" not in value and "\x1b" not in value and len(value) < 700


@pytest.mark.parametrize(("family", "addr", "peer", "who"), [
    (socket.AF_VSOCK, (16, 1234), 16, "CID 16"),
    (socket.AF_INET, ("10.0.0.2", 5555), "10.0.0.2", "10.0.0.2"),
    (socket.AF_INET6, ("fd00::2", 5555, 0, 0), "fd00::2", "fd00::2"),
    (socket.AF_UNIX, "", 4242, "pid 4242"),
    (socket.AF_UNIX, "", None, "a local process"),
])
def test_who_is_on_the_other_end_is_named_as_an_operator_reads_it(family, addr, peer, who):
    assert control.peer_name(SimpleNamespace(family=family), addr, peer) == who


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_the_tcp_stand_in_s_control_port_takes_either_family(host):
    """transport.host may be IPv6 (the profile takes it, and the WireGuard stream listens on
    both families): the control port used to be an AF_INET socket, so `parent up` failed
    binding it, after making the tunnel, and `enclave up` could never dial it."""
    from wgvsock.roles.common import control_listener, dial_control

    transport = types.SimpleNamespace(kind="tcp", host=host, control_port=0)
    with contextlib.closing(control_listener(transport)) as listener:
        assert listener.getsockname()[0] == host
        transport.control_port = listener.getsockname()[1]
        with contextlib.closing(dial_control(transport)) as s:
            peer, _ = listener.accept()
            peer.close()
            assert s.getpeername()[:2] == (host, transport.control_port)


def test_a_control_socket_another_parent_answers_on_is_left_alone(tmp_path):
    """Two profiles given one transport.path and control_port: the second `up` unlinked the
    first's live control socket and bound its own, and the first's enclave registered with
    the second parent from then on. The WireGuard socket beside it was already kept (a
    socket someone answers on is never removed); the control socket now is too."""
    from wgvsock.roles.common import RoleError, control_listener

    own = tmp_path / "own"
    first = control_listener(types.SimpleNamespace(kind="unix", path=str(own),
                                                   control_port=5100))
    try:
        transport = types.SimpleNamespace(kind="unix", path=str(own), control_port=5100)
        with pytest.raises(RoleError, match=rf"{own}/5100.sock is another running parent's "
                           r"control socket.*transport.control_port"):
            control_listener(transport)
        with contextlib.closing(socket.socket(socket.AF_UNIX)) as s:
            s.connect(str(own / "5100.sock"))  # still the first's
            peer, _ = first.accept()
            peer.close()
    finally:
        first.close()
    # A socket nobody answers on (a parent killed with -9) is taken over as before.
    with contextlib.closing(control_listener(transport)) as listener:
        assert listener.getsockname() == str(own / "5100.sock")


# -- versions: an enclave image is immutable, so a parent meets enclaves of older (and, after a
# downgrade, newer) wgvsock releases for as long as they run.

def _challenge(**fields) -> dict:
    return {"v": 1, "type": "challenge", "profile": "demo",
            "nonce": base64.b64encode(b"n" * 32).decode(), **fields}


def test_fields_and_messages_a_side_does_not_know_are_ignored(server):
    # What a newer release adds to a message (a field, a message type while the connection is
    # held) must not break an older one: both sides read only the fields they know.
    path, _srv, rec = server
    with dial(path) as s:
        challenge = read_message(s, time.monotonic() + WAIT)
        s.sendall(encode({"type": "register", "nonce": challenge["nonce"],
                          "public_key": base64.b64encode(b"E" * 32).decode(),
                          "attestation": None, "tomorrow": {"x": [1, 2]}}))
        assert read_message(s, time.monotonic() + WAIT)["type"] == "welcome"
        s.sendall(encode({"type": "news", "what": "from a newer enclave"}))
        s.sendall(encode({"type": "ping"}))
        assert read_message(s, time.monotonic() + 12)["type"] == "ping"
    assert rec.installed == [b"E" * 32]
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame(_challenge(tomorrow=True)))
        parent.sendall(frame({"v": 1, "type": "welcome", "wg_port": 51820, "attested": False,
                              "public_key": base64.b64encode(b"P" * 32).decode(),
                              "tomorrow": "x"}))
        assert register(enclave, b"E" * 32, timeout=5).wg_port == 51820


def test_the_challenge_says_which_versions_the_parent_speaks(server):
    path, _srv, _rec = server
    with dial(path) as s:
        assert read_message(s, time.monotonic() + WAIT)["versions"] == [1]


@pytest.mark.parametrize("fields", [{"v": 2}, {"v": 2, "versions": [2, 3]},
                                    {"v": 1, "versions": [2]}])
def test_a_parent_that_no_longer_speaks_this_enclaves_version_is_named_as_such(fields):
    # Before: "unsupported protocol version 2 (this side speaks 1)", retried at the pace of a
    # parent that is not there (every second on vsock, for ever), without saying which side
    # is which or what to upgrade.
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame(_challenge(**fields)))
        with pytest.raises(control.Refused) as e:
            register(enclave, b"E" * 32, timeout=5)
        enclave.close()
        # No register (nor attestation) was sent: a refusal saying why, for the parent's log.
        said = read_message(parent, time.monotonic() + 5, any_version=True)
        assert said["type"] == "refused" and said["reason"] == str(e.value)
        parent.settimeout(2)
        assert parent.recv(100) == b""
    text = str(e.value)
    speaks = "version 2" if fields.get("versions") in (None, [2]) else "versions 2, 3"
    assert f"the parent speaks control protocol {speaks} and" in text
    assert "this enclave speaks version 1" in text
    assert "rebuild the enclave image with the parent's wgvsock" in text


def test_an_older_parent_is_named_as_the_side_to_upgrade(monkeypatch):
    # An enclave image of a later release (version 2 only) meets this release's parent.
    monkeypatch.setattr(control, "PROTOCOL_VERSION", 2)
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame(_challenge(versions=[1])))
        with pytest.raises(control.Refused) as e:
            register(enclave, b"E" * 32, timeout=5)
    assert str(e.value).startswith("the parent speaks control protocol version 1 and this "
                                   "enclave speaks version 2")
    assert "upgrade wgvsock on the parent" in str(e.value)


def test_an_enclaves_refusal_of_the_parent_is_logged_and_kept_for_status(server, caplog):
    path, srv, rec = server
    with caplog.at_level(logging.WARNING, logger="wgvsock.control"), dial(path) as s:
        read_message(s, time.monotonic() + WAIT)
        s.sendall(frame({"v": 2, "type": "refused", "reason": "upgrade\nyourself"}))
        expect_closed(s, WAIT)
    assert rec.installed == []
    said = "the enclave refused this parent: upgrade\\nyourself"
    assert said in " ".join(r.getMessage() for r in caplog.records)
    assert srv.refusals.recent()[0].reason == said


def test_a_newer_parent_that_still_speaks_this_enclaves_version_is_answered():
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame(_challenge(v=2, versions=[1, 2])))
        parent.sendall(frame({"v": 1, "type": "welcome", "wg_port": 51820, "attested": False,
                              "public_key": base64.b64encode(b"P" * 32).decode()}))
        assert register(enclave, b"E" * 32, timeout=5).wg_port == 51820
        parent.settimeout(2)
        (length,) = struct.unpack(">I", parent.recv(4))
        assert json.loads(parent.recv(length))["v"] == 1


def test_a_refusal_is_read_whatever_version_it_carries():
    # A refusal is how either side says why; one of another version still says it.
    parent, enclave = socket.socketpair()
    with parent, enclave:
        parent.sendall(frame(_challenge()))
        parent.sendall(frame({"v": 2, "type": "refused", "reason": "the reason"}))
        with pytest.raises(control.Refused, match="parent refused this enclave: the reason"):
            register(enclave, b"E" * 32, timeout=5)


def test_an_enclave_of_a_newer_version_is_told_to_upgrade_the_parent(server, caplog):
    # Before: the connection was closed without a word; the enclave saw "connection closed"
    # and the parent logged "unsupported protocol version 2 (this side speaks 1)".
    path, srv, rec = server
    with caplog.at_level(logging.WARNING, logger="wgvsock.control"), dial(path) as s:
        challenge = read_message(s, time.monotonic() + WAIT)
        s.sendall(frame({"v": 2, "type": "register", "nonce": challenge["nonce"],
                         "public_key": base64.b64encode(b"E" * 32).decode()}))
        reply = read_message(s, time.monotonic() + WAIT)
        expect_closed(s, WAIT)
    assert reply["type"] == "refused" and reply["versions"] == [1]
    assert ("this parent speaks control protocol version 1 and the enclave version 2: upgrade "
            "wgvsock on the parent") in reply["reason"]
    assert rec.installed == []
    logged = " ".join(r.getMessage() for r in caplog.records)
    assert "version 2" in logged and "upgrade wgvsock on the parent" in logged
    assert "upgrade wgvsock on the parent" in srv.refusals.recent()[0].reason


def test_a_close_that_outwaits_its_join_still_frees_the_port_once_the_thread_ends(tmp_path):
    """close() waits 2 s for the accept thread, and then left the listener and the wake pipe
    open "for the thread": on a loaded machine a thread a little late (here: one amid a
    connection's admission) kept the control port bound, and the pipe open, until the
    process ended. The thread now lets go of them itself when it ends after such a close."""
    srv, _rec = make_server(str(tmp_path / "control.sock"))
    admitting, go_on = threading.Event(), threading.Event()

    def slow_admit(conn, addr):
        admitting.set()
        go_on.wait(60)
        conn.close()

    srv._admit = slow_admit
    listener, thread = srv._listener, srv._thread
    pipe = wake_pipe(srv._waiting)
    with dial(str(tmp_path / "control.sock")):
        assert admitting.wait(WAIT)
        srv.close()  # gives up on the thread after its join
        assert thread.is_alive()
        go_on.set()
        thread.join(WAIT)
    assert not thread.is_alive()
    assert listener.fileno() == -1
    assert pipe_released(pipe), "wake pipe left open"


def test_a_second_close_writes_nothing_into_a_descriptor_reused_meanwhile(tmp_path):
    """close() released the wake pipe; a second close() (ControlServer's is not guarded, and
    before AcceptWait it wrote to -1) woke the thread again by writing a byte to the pipe's old
    number, which the process may have handed out since: here a pipe of someone else's got it."""
    srv, _rec = make_server(str(tmp_path / "control.sock"))
    old_w = srv._waiting._w
    srv.close()
    assert not srv._thread.is_alive()
    r, w = os.pipe()
    try:
        os.dup2(w, old_w)  # the number reused by another part of the process
        srv.close()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        for fd in (r, w, old_w):
            with contextlib.suppress(OSError):
                os.close(fd)


def test_a_close_from_the_accept_thread_itself_frees_the_port_as_the_thread_ends(tmp_path):
    """A close() called on the accept thread (from what it runs, as the UAPI server allows)
    joined the thread it ran on: RuntimeError, before the release was handed to the thread, so
    the listener and the wake pipe stayed open for good."""
    srv, _rec = make_server(str(tmp_path / "control.sock"))
    closed = threading.Event()
    failed: list[BaseException] = []

    def admit_and_close(conn, addr):
        conn.close()
        try:
            srv.close()
        except BaseException as e:
            failed.append(e)
        closed.set()

    srv._admit = admit_and_close
    listener, thread = srv._listener, srv._thread
    with dial(str(tmp_path / "control.sock")):
        assert closed.wait(WAIT)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert failed == []
    assert listener.fileno() == -1
    assert srv._waiting._released
