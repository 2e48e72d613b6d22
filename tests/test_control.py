"""The control protocol against well-behaved and hostile clients, over real Unix sockets."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time

import pytest

from wgvsock import control
from wgvsock.control import ControlError, ControlServer, Verdict, encode, read_message, register


class Recorder:
    def __init__(self, accept: bool = True) -> None:
        self.accept = accept
        self.installed: list[bytes] = []
        self.seen: list[tuple[bytes, bytes | None, bytes]] = []
        self.event = threading.Event()

    def verify(self, key, doc, nonce):
        self.seen.append((key, doc, nonce))
        return Verdict(self.accept, attested=doc is not None, reason="" if self.accept else "no")

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
    srv, rec = make_server(path, timeout=1.0)
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


def expect_closed(s: socket.socket, timeout: float = 3.0) -> None:
    """Reads until EOF; the server must hang up on a broken client."""
    s.settimeout(timeout)
    while s.recv(4096):
        pass


def test_register_round_trip(server):
    path, _srv, rec = server
    with dial(path) as s:
        welcome = register(s, b"E" * 32, attest=lambda nonce, key: b"doc:" + nonce)
    assert welcome.parent_public_key == b"P" * 32 and welcome.wg_port == 51820
    assert welcome.attested
    key, doc, nonce = rec.seen[0]
    assert key == b"E" * 32 and doc == b"doc:" + nonce and len(nonce) == 32
    assert rec.installed == [b"E" * 32]


def test_refusal_is_reported_and_nothing_installed(server):
    path, _srv, rec = server
    rec.accept = False
    with dial(path) as s, pytest.raises(ControlError, match="refused"):
        register(s, b"E" * 32)
    assert rec.installed == []


def test_replayed_nonce_is_refused(server):
    path, _srv, rec = server
    with dial(path) as s:
        first = read_message(s, time.monotonic() + 2)
    old_nonce = first["nonce"]
    with dial(path) as s:
        read_message(s, time.monotonic() + 2)  # a fresh challenge we ignore
        s.sendall(encode({"type": "register", "nonce": old_nonce,
                          "public_key": base64.b64encode(b"E" * 32).decode(),
                          "attestation": None}))
        reply = read_message(s, time.monotonic() + 2)
    assert reply["type"] == "refused" and "nonce" in reply["reason"]
    assert rec.installed == []


@pytest.mark.parametrize(
    "payload, why",
    [
        (struct.pack(">I", control.MAX_MESSAGE + 1), "oversized"),
        (struct.pack(">I", 0), "zero length"),
        (struct.pack(">I", 100) + b"{", "truncated"),
        (frame({"v": 2, "type": "register"}), "wrong version"),
        (frame([1, 2, 3]), "not an object"),
        (struct.pack(">I", 3) + b"\xff\xfe\xfd", "not JSON"),
        (frame({"v": 1, "type": "register", "nonce": "!!", "public_key": "x"}), "bad base64"),
        (frame({"v": 1, "type": "welcome"}), "wrong message"),
    ],
)
def test_hostile_clients_are_cut_off_and_server_keeps_serving(server, payload, why):
    path, _srv, rec = server
    with dial(path) as s:
        read_message(s, time.monotonic() + 2)
        s.sendall(payload)
        if why == "truncated":
            s.shutdown(socket.SHUT_WR)
        expect_closed(s)
    assert rec.installed == []
    with dial(path) as s:
        assert register(s, b"F" * 32).wg_port == 51820


def test_slow_client_times_out_without_blocking_others(server):
    path, _srv, _rec = server
    slow = dial(path)
    try:
        with dial(path) as s:
            register(s, b"G" * 32)
        start = time.monotonic()
        read_message(slow, time.monotonic() + 2)
        expect_closed(slow)  # the 1 s exchange limit in the fixture
        assert time.monotonic() - start < 3
    finally:
        slow.close()


def test_new_enclave_replaces_the_previous_connection(server):
    path, _srv, rec = server
    first = dial(path)
    try:
        register(first, b"A" * 32)
        with dial(path) as second:
            register(second, b"B" * 32)
            # the first enclave's control connection is closed by the parent
            first.settimeout(3)
            data = b""
            while True:
                chunk = first.recv(4096)
                if not chunk:
                    break
                data += chunk
        assert rec.installed == [b"A" * 32, b"B" * 32]
    finally:
        first.close()


def test_encode_refuses_oversized_messages():
    with pytest.raises(ControlError):
        encode({"type": "register", "attestation": "x" * (control.MAX_MESSAGE + 1)})


def test_held_connection_stays_in_step_when_a_message_arrives_in_pieces(monkeypatch):
    """A ping whose body arrives after the holder's next deadline must still be read whole;
    reading it in two halves used to leave the stream out of step (a length of '{"v"')."""
    monkeypatch.setattr(control, "PING_INTERVAL", 0.1)
    ours, theirs = socket.socketpair()
    stop = threading.Event()
    result: list[str] = []
    holder = threading.Thread(target=lambda: result.append(control.hold_connection(ours, stop)))
    holder.start()
    try:
        ping = encode({"type": "ping"})
        for _ in range(3):
            theirs.sendall(ping[:4])
            time.sleep(0.25)  # the slow sender is the scenario: past the holder's deadline
            theirs.sendall(ping[4:])
        theirs.sendall(ping)
        holder.join(0.3)
        assert holder.is_alive(), result  # still in step: no "message length ..." error
    finally:
        stop.set()
        holder.join(3.0)
        ours.close()
        theirs.close()
    assert result == ["stopped"]


def test_a_flood_of_idle_connections_cannot_lock_the_enclave_out(tmp_path):
    path = str(tmp_path / "control.sock")
    srv, rec = make_server(path, timeout=30.0, max_clients=4)
    idle = [dial(path) for _ in range(6)]  # more than max_clients, and silent
    try:
        for s in idle:  # each gets its challenge: they are all being served or evicted
            s.settimeout(3)
        with dial(path) as s:
            assert register(s, b"R" * 32).wg_port == 51820
        assert rec.installed == [b"R" * 32]
    finally:
        for s in idle:
            s.close()
        srv.close()
