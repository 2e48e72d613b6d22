"""The stream transport against a peer (or a stranger) that does not play along: found by a
read-only review of conn/, each failing before its fix."""

from __future__ import annotations

import socket
import threading
import time

from wgvsock.conn.caps import CAP_PARTIAL_CSUM, CAP_SUPER, CAP_UNCHECKED_TRANSPORT, encode_hello
from wgvsock.conn.endpoint import Endpoint
from wgvsock.conn.framing import encode_frame
from wgvsock.conn.stream import IOV_MAX, StreamBind
from wgvsock.ui.nslab import wait_for

DATA = b"\x04" + b"x" * 47  # a transport message's shape; the bind does not look inside


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(128)
    return s


def test_a_listener_that_sends_a_frame_and_hangs_up_is_redialled_with_backoff() -> None:
    """Before: one valid frame made the connection "stable", so the dialler redialled at once,
    forever (7400 connections and 14600 log lines in 3 s)."""
    srv = _listener()
    accepts = [0]
    stop = threading.Event()

    def serve() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except TimeoutError:
                continue
            accepts[0] += 1
            c.sendall(encode_frame(b"\x05" + b"j" * 31))
            c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    b = StreamBind("tcp")
    b.backoff_min, b.backoff_max = 0.1, 0.2
    b.open(0, lambda d, ep: None)
    try:
        b.send(DATA, b.parse_endpoint(f"127.0.0.1:{srv.getsockname()[1]}"))
        wait_for(lambda: accepts[0] >= 2, 5, "a first redial")
        time.sleep(1.0)  # a rate: how many redials one second holds
        dialer = b.status()["dialers"][0]
    finally:
        b.close()
        stop.set()
        t.join()
        srv.close()
    assert accepts[0] <= 15, f"{accepts[0]} connections in about a second"
    assert dialer["failures"] >= 1


def test_only_a_peer_s_hello_counts_for_the_device_s_offload() -> None:
    """Before: any stranger's hello switched the whole device's TUN offload (an ioctl under
    the kernel's rtnl lock), thousands of times a second if it kept reconnecting."""
    peer = [False]
    notices = []
    b = StreamBind("tcp")
    b.hello = encode_hello(CAP_UNCHECKED_TRANSPORT, 0)
    b.authenticated = lambda ep: peer[0]
    b.caps_changed = lambda: notices.append(b.any_peer_has(CAP_SUPER | CAP_PARTIAL_CSUM))
    received = []
    port = b.open(0, lambda d, ep: received.append(bytes(d)))
    s = socket.create_connection(("127.0.0.1", port))
    try:
        s.sendall(encode_frame(encode_hello(CAP_SUPER | CAP_PARTIAL_CSUM, 65000)))
        s.recv(64)  # our answering hello: theirs was taken
        assert not b.any_peer_has(CAP_SUPER | CAP_PARTIAL_CSUM)
        assert notices == []
        # Its first message that authenticates makes the connection a peer's.
        peer[0] = True
        s.sendall(encode_frame(DATA))
        wait_for(lambda: received, 5, "the message")
        wait_for(lambda: notices == [True], 5, "the capability notice")
        assert b.any_peer_has(CAP_SUPER | CAP_PARTIAL_CSUM)
    finally:
        s.close()
        wait_for(lambda: notices == [True, False], 5, "the notice that it went")
        b.close()


def test_a_port_no_socket_takes_does_not_kill_the_dialler() -> None:
    """Before: OverflowError from connect() ended the dialler thread, and the daemon's
    thread-death hook stopped the daemon (a parent's welcome could carry such a port)."""
    died: list[BaseException | None] = []
    old = threading.excepthook
    threading.excepthook = lambda a: died.append(a.exc_value)
    b = StreamBind("tcp")
    b.open(0, lambda d, ep: None)
    try:
        b.send(DATA, Endpoint("inet", "127.0.0.1", 70000))
        wait_for(lambda: any(d["failures"] for d in b.status()["dialers"]), 5,
                 "the dial to fail")
        assert "port must be 0-65535" in b.status()["dialers"][0]["last_error"]
    finally:
        b.close()
        threading.excepthook = old
    assert died == []


def test_a_batch_of_more_messages_than_one_sendmsg_takes_arrives_whole() -> None:
    """Before: two buffers a message in one sendmsg(); above IOV_MAX / 2 messages it failed
    with EMSGSIZE and the healthy connection was torn down."""
    got: list[bytes] = []
    a, b = StreamBind("tcp"), StreamBind("tcp")
    a.open(0, lambda d, ep: None)
    pb = b.open(0, lambda d, ep: got.append(bytes(d)))
    ep = a.parse_endpoint(f"127.0.0.1:{pb}")
    try:
        a.send(DATA, ep)
        wait_for(lambda: got, 5, "the first message (the connection)")
        # The peer may see the queued first message before the dialler publishes the
        # connection; a batch sent in between is queued while dialling (16 at most, by design).
        wait_for(lambda: a.status()["connections"], 5, "the connection to be published")
        n = IOV_MAX  # 2n buffers
        batch = [b"\x04" + i.to_bytes(4, "big") + b"x" * 91 for i in range(n)]
        a.send_batch(batch, ep)
        wait_for(lambda: len(got) == n + 1, 10, f"{n} messages")
        assert got[1:] == batch
        assert a.status()["send_failures"] == 0
        assert a.status()["dialers"][0]["dropped"] == 0
    finally:
        a.close()
        b.close()
