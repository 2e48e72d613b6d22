"""The stream transport itself on real AF_VSOCK (CID 1, vsock_loopback), in this process: what
tests/conn/test_binds.py proves over TCP and Unix sockets, where the kernel's vsock works in
its own way. No daemons: a few seconds of TCG.

- The largest frames (65535-byte messages, the framing's limit) cross whole both ways, many in
  one sendmsg(): vsock moves a stream in packets of at most 64 KiB against the peer's credit
  (its buffer, 256 KiB by default: SO_VM_SOCKETS_BUFFER_SIZE, not SO_SNDBUF).
- A silent inbound connection is closed at FIRST_FRAME_TIMEOUT. The limit is the socket's
  SO_RCVTIMEO, which CPython cannot set on AF_VSOCK (it parses every option value there as a
  u64: bind.py goes through libc), and which vsock's recvmsg answers with EAGAIN.
- A peer that stops reading: the sender waits for credit, SO_SNDTIMEO (set through libc too)
  bounds the wait (EAGAIN, or a short write), and the connection is closed, not held for ever.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

import pytest

from tests.conn.test_binds import opened
from tests.net.netlab import SLOWDOWN
from wgvsock.conn.bind import Bind
from wgvsock.conn.framing import MAX_PAYLOAD
from wgvsock.conn.stream import StreamBind
from wgvsock.ui.nslab import wait_for

pytestmark = [pytest.mark.root, pytest.mark.guest]

LOOPBACK_CID = 1
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_PORT_ANY = 0xFFFFFFFF
WAIT = 10.0 * SLOWDOWN
FAST = {"backoff_min": 0.01, "backoff_max": 0.05}


def _message(i: int, size: int) -> bytes:
    # A transport message (type 4): its frames carry a CRC unless the peer said otherwise.
    return b"\x04\0\0\0" + i.to_bytes(4, "little") + bytes([i % 251]) * (size - 8)


def test_largest_frames_both_ways_over_vsock(binds: list[Bind]) -> None:
    a, a_in, _ = opened(binds, StreamBind("vsock"))
    b, b_in, b_port = opened(binds, StreamBind("vsock"))
    b_ep = a.parse_endpoint(f"vsock://{LOOPBACK_CID}:{b_port}")
    first = _message(0, MAX_PAYLOAD)
    a.send(first, b_ep)
    data, from_a = b_in.get(WAIT)
    assert data == first
    # Eight of them in one sendmsg() each way: more than the peer's 256 KiB of credit.
    batch = [_message(i, MAX_PAYLOAD) for i in range(1, 9)]
    a.send_batch(batch, b_ep)
    b.send_batch(batch, from_a)
    assert [b_in.get(WAIT)[0] for _ in batch] == batch
    assert [a_in.get(WAIT)[0] for _ in batch] == batch
    assert a.status()["send_failures"] == b.status()["send_failures"] == 0


def test_silent_inbound_connection_is_closed_at_the_first_frame_deadline(
    binds: list[Bind], monkeypatch: pytest.MonkeyPatch
) -> None:
    import wgvsock.conn.stream as stream

    monkeypatch.setattr(stream, "FIRST_FRAME_TIMEOUT", 1.0)
    b, _b_in, b_port = opened(binds, StreamBind("vsock"))
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as silent:
        silent.settimeout(WAIT)
        silent.connect((LOOPBACK_CID, b_port))
        wait_for(lambda: b.status()["accepted"] == 1, WAIT, "the bind to accept")
        # Closed by the bind (its receive timed out): an end of stream, or vsock's reset.
        with contextlib.suppress(ConnectionResetError):
            assert silent.recv(1) == b""
    wait_for(lambda: b.status()["connections"] == [], WAIT, "the connection to be gone")


def test_a_peer_not_reading_is_closed_after_the_send_timeout(binds: list[Bind]) -> None:
    deaf = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    deaf.bind((VMADDR_CID_ANY, VMADDR_PORT_ANY))
    deaf.listen(4)
    kept: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_never_read() -> None:
        conn, _ = deaf.accept()
        kept.append(conn)  # open, unread, until the test ends
        stop.wait()

    acceptor = threading.Thread(target=accept_and_never_read, daemon=True)
    acceptor.start()
    try:
        a, _a_in, _ = opened(binds, StreamBind("vsock", send_timeout=1.0, **FAST))
        assert isinstance(a, StreamBind)
        ep = a.parse_endpoint(f"vsock://{LOOPBACK_CID}:{deaf.getsockname()[1]}")
        a.send(_message(0, 64), ep)
        wait_for(lambda: a.status()["connections"], WAIT, "the connection to the deaf peer")
        batch = [_message(i, MAX_PAYLOAD) for i in range(4)]

        def failed() -> bool:
            a.send_batch(batch, ep)
            return a.status()["send_failures"] >= 1

        # Once the peer's credit is used up, a send waits the send timeout and then the
        # connection goes ("send timed out (peer not reading)").
        wait_for(failed, WAIT, "a send to the deaf peer to time out")
    finally:
        stop.set()
        acceptor.join(WAIT)
        for conn in kept:
            conn.close()
        deaf.close()


def test_only_the_cids_the_owner_admits_get_in(
    binds: list[Bind], monkeypatch: pytest.MonkeyPatch
) -> None:
    """refuse_from on real vsock: the accept() address carries the peer's CID (here every
    connection comes from CID 1, the loopback). A bind that admits only CID 16 closes the
    connection at once (not at the first-frame deadline, pushed out of reach here), counted;
    one that admits CID 1 carries messages both ways."""
    import wgvsock.conn.stream as stream

    monkeypatch.setattr(stream, "FIRST_FRAME_TIMEOUT", 600.0)
    seen: list[object] = []

    def only(cid: int) -> Callable[[object], str | None]:
        def refuse(addr: object) -> str | None:
            seen.append(addr)
            return None if isinstance(addr, tuple) and addr[0] == cid else f"expected CID {cid}"
        return refuse

    fenced = StreamBind("vsock")
    fenced.refuse_from = only(16)
    fenced, fenced_in, fenced_port = opened(binds, fenced)
    with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as stranger:
        stranger.settimeout(WAIT)
        stranger.connect((LOOPBACK_CID, fenced_port))
        # Silent: only the fence can close it before WAIT (a frame could end it for framing).
        with contextlib.suppress(ConnectionResetError):  # vsock's reset, or an end of stream
            assert stranger.recv(1) == b""
    assert seen and isinstance(seen[0], tuple) and seen[0][0] == LOOPBACK_CID, seen
    status = fenced.status()
    assert (status["refused"], status["accepted"], status["connections"]) == (1, 0, [])
    assert fenced_in.empty_for(0.5)

    admitting = StreamBind("vsock")
    admitting.refuse_from = only(LOOPBACK_CID)
    b, b_in, b_port = opened(binds, admitting)
    a, a_in, _ = opened(binds, StreamBind("vsock", **FAST))
    a.send(_message(1, 64), a.parse_endpoint(f"vsock://{LOOPBACK_CID}:{b_port}"))
    data, from_a = b_in.get(WAIT)
    assert data == _message(1, 64) and (from_a.kind, from_a.host) == ("vsock", LOOPBACK_CID)
    b.send(_message(2, 64), from_a)
    assert a_in.get(WAIT)[0] == _message(2, 64)
    assert (b.status()["refused"], b.status()["accepted"]) == (0, 1)
