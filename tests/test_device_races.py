"""A device's configuration changed while its transport dials and sends: what a removed peer,
or an endpoint given up, leaves behind (review of the device under concurrent change)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest

from wgvsock.conn.endpoint import Endpoint, display_endpoint
from wgvsock.conn.stream import StreamBind
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.device.device import Device
from wgvsock.device.uapi import parse_set
from wgvsock.ui.nslab import wait_for

TIMEOUT = 10.0


class _Up(Device):
    """A device whose interface is up, without a TUN: its sends go to the real transport."""

    def _is_up(self) -> bool:
        return True


@pytest.fixture
def scene() -> Iterator[tuple[_Up, StreamBind, str]]:
    """A device with a key over an open Unix stream transport (fast redials), and its
    socket directory, where a port P is the file P.sock."""
    d = tempfile.mkdtemp(prefix="wgr", dir="/tmp")
    os.chmod(d, 0o700)
    bind = StreamBind("unix", unix_dir=d, backoff_min=0.05, backoff_max=0.2)
    dev = _Up("wgrace0", bind, run_dir=os.path.join(d, "run"))
    bind.open(0, lambda data, ep: None)
    dev._sync_link()  # the link comes up
    dev.uapi_set(parse_set(f"private_key={generate_private_key().hex()}\n"))
    try:
        yield dev, bind, d
    finally:
        bind.close()
        shutil.rmtree(d, ignore_errors=True)


def _listener(d: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(os.path.join(d, f"{port}.sock"))
    s.listen(4)
    s.settimeout(TIMEOUT)
    return s


def _dialers(bind: StreamBind) -> list[str]:
    return [x["endpoint"] for x in bind.status()["dialers"]]


def _shown(bind: StreamBind, port: int) -> str:
    """How status() names the endpoint 127.0.0.1:PORT (here the socket file's path)."""
    return display_endpoint(bind.parse_endpoint(f"127.0.0.1:{port}"))


def _connections(bind: StreamBind) -> list[str]:
    return [x["endpoint"] for x in bind.status()["connections"]]


def _dial_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("wgvsock-unix-dial")]


def _read_until_closed(conn: socket.socket) -> bytes:
    """What comes on `conn` until its other end closes it (socket.timeout if it does not)."""
    got = b""
    while chunk := conn.recv(65536):
        got += chunk
    return got


def _peer_at(dev, port: int) -> bytes:
    """A new peer at 127.0.0.1:PORT with a keepalive of 1 s, so that it has something to
    send at once (a handshake initiation) and its dialler starts; its public key."""
    them = public_key(generate_private_key())
    dev.uapi_set(parse_set(f"public_key={them.hex()}\nendpoint=127.0.0.1:{port}\n"
                           "persistent_keepalive_interval=1\n"))
    return them


def test_a_removed_peers_endpoint_is_dialled_no_more(scene) -> None:
    """A peer whose endpoint does not answer yet: its handshake initiation waits in the
    transport's dialler for a connection. Before, removing the peer left the dialler
    redialling for redial_idle (300 s), and the first connection it made carried the removed
    peer's initiation (seen with `wg set` and a listener started after the removal)."""
    dev, bind, d = scene
    them = _peer_at(dev, 7301)
    wait_for(lambda: _dialers(bind), TIMEOUT, "a dialler for the peer's endpoint")
    dev.uapi_set(parse_set(f"public_key={them.hex()}\nremove=true\n"))
    wait_for(lambda: not _dialers(bind) and not _dial_threads(), TIMEOUT,
             "the removed peer's dialler to stop")
    # Nothing dials now; a listener there hears nothing, however long it waits.
    with _listener(d, 7301) as s:
        s.settimeout(2.0)  # longer than the test's redial backoff
        with pytest.raises(TimeoutError):
            s.accept()


def test_a_connection_dialled_to_a_removed_peer_is_closed(scene) -> None:
    """Before, the connection made for a peer stayed open after the peer was removed, with
    a reader thread and a dialler thread, until the other end closed it, and then was
    dialled again: 1000 peers added and removed kept 1000 connections and 2000 threads."""
    dev, bind, d = scene
    with _listener(d, 7302) as s:
        them = _peer_at(dev, 7302)
        conn, _ = s.accept()
        with conn:
            conn.settimeout(TIMEOUT)
            dev.uapi_set(parse_set(f"public_key={them.hex()}\nremove=true\n"))
            _read_until_closed(conn)
    wait_for(lambda: not _dialers(bind) and not _dial_threads(), TIMEOUT,
             "the removed peer's dialler to stop")
    assert not bind.status()["connections"]


def test_a_peer_keeps_its_connections_while_it_is_and_they_go_with_it(scene) -> None:
    """A peer whose messages come on another connection (it roamed, say to one it dialled
    itself) keeps the one to its configured endpoint across other peers' changes, and one to
    an endpoint it was given before: the other side may reach us only there. When the peer
    is removed, both are closed."""
    dev, bind, d = scene
    them, other = (public_key(generate_private_key()) for _ in range(2))
    message = b"\x04" + bytes(47)
    with _listener(d, 7303) as first, _listener(d, 7304) as second:
        dev.uapi_set(parse_set(f"public_key={them.hex()}\nendpoint=127.0.0.1:7303\n"
                               "persistent_keepalive_interval=1\n"))
        old, _ = first.accept()
        # Up on our side too (accept() may return before our connect() does): an endpoint
        # given before is kept while a connection we dialled there is.
        wait_for(lambda: _shown(bind, 7303) in _connections(bind), TIMEOUT,
                 "the connection to 127.0.0.1:7303 to be up")
        with dev._lock:  # as the engine roams a peer to where it last heard from it
            dev.engine.peers[them].endpoint = Endpoint("unix", "", 0, conn_id=99)
        dev.uapi_set(parse_set(f"public_key={other.hex()}\n"))
        dev.uapi_set(parse_set(f"public_key={them.hex()}\nendpoint=127.0.0.1:7304\n"))
        bind.send(message, bind.parse_endpoint("127.0.0.1:7304"))
        new, _ = second.accept()
        with old, new:
            for conn, port in ((old, 7303), (new, 7304)):
                conn.settimeout(TIMEOUT)
                # Still the connection made first: a send to the endpoint comes on it.
                bind.send(message, bind.parse_endpoint(f"127.0.0.1:{port}"))
                got = b""
                while message not in got:
                    chunk = conn.recv(65536)
                    assert chunk, f"the connection to {port} was closed"
                    got += chunk
            dev.uapi_set(parse_set(f"public_key={them.hex()}\nremove=true\n"))
            _read_until_closed(old)
            _read_until_closed(new)


def test_a_link_gone_down_sends_nothing_it_queued_before(scene) -> None:
    """Before: the handshake initiation a dialler held for a peer that did not answer yet
    went out on the first connection made after `ip link set down`, whose sessions it had
    been made for were ended, and the dialler went on redialling while the link was down."""
    dev, bind, _ = scene
    _peer_at(dev, 7305)
    wait_for(lambda: _dialers(bind), TIMEOUT, "a dialler for the peer's endpoint")
    dev._set_link(False, [])  # as _sync_link does when the kernel says the link went down
    wait_for(lambda: not _dialers(bind) and not _dial_threads(), TIMEOUT,
             "the dialler to stop")


def test_a_new_private_key_sends_nothing_made_with_the_old_one(scene) -> None:
    """Before: the handshake initiation a dialler held for a peer that did not answer yet,
    made with the old private key, went out on the first connection made after the key was
    changed."""
    dev, bind, _ = scene
    _peer_at(dev, 7306)
    wait_for(lambda: _dialers(bind), TIMEOUT, "a dialler for the peer's endpoint")
    dev.uapi_set(parse_set(f"private_key={generate_private_key().hex()}\n"))
    wait_for(lambda: not _dialers(bind) and not _dial_threads(), TIMEOUT,
             "the dialler to stop")


def test_connecting_a_peer_a_set_removes_meanwhile_says_so(scene) -> None:
    """The enclave checks has_peer, then calls connect_peer; a `wg set ... remove` may come
    between. Before, connect_peer raised KeyError then, which the enclave's control loop
    logged as an unexpected error with a traceback. Now it answers False: no such peer."""
    dev, _, _ = scene
    them = public_key(generate_private_key())
    add = parse_set(f"public_key={them.hex()}\n")
    remove = parse_set(f"public_key={them.hex()}\nremove=true\n")
    endpoint = dev.bind.parse_endpoint("127.0.0.1:7307")
    stop = threading.Event()

    def churn() -> None:
        while not stop.is_set():
            dev.uapi_set(add)
            dev.uapi_set(remove)

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    answers: set[bool] = set()
    deadline = time.monotonic() + TIMEOUT
    try:
        # Both answers come within a few hundred tries here; bounded in time all the same.
        while answers != {True, False} and time.monotonic() < deadline:
            if dev.has_peer(them):
                time.sleep(0)  # another thread's turn: the set comes between here
                answers.add(dev.connect_peer(them, endpoint))
    finally:
        stop.set()
        churner.join(TIMEOUT)
    assert False in answers, "no set came between has_peer and connect_peer (try again)"
    assert not dev.connect_peer(them, endpoint) or dev.has_peer(them)


def test_a_peer_re_pointed_many_times_keeps_only_what_it_may_need(scene) -> None:
    """A long-running daemon re-pointed at new endpoints (`wg set ... endpoint` in a loop, an
    enclave's parent reconfigured: connect_peer). Before, the device remembered every endpoint
    a peer was ever given, and told the transport to keep them all: each one that did not
    answer kept a dialler (a thread) redialling it for redial_idle, and the memory grew with
    every change. An endpoint given before is kept only while a connection we dialled to it
    is up (test_a_peer_keeps_its_connections_while_it_is_and_they_go_with_it)."""
    dev, bind, _ = scene
    them = public_key(generate_private_key())
    dev.uapi_set(parse_set(f"public_key={them.hex()}\n"))
    changes = 60
    for i in range(changes):
        port = 7400 + i
        if i % 2:
            dev.uapi_set(parse_set(f"public_key={them.hex()}\nendpoint=127.0.0.1:{port}\n"))
        else:  # and a handshake initiation to it at once, so that the transport dials it
            assert dev.connect_peer(them, bind.parse_endpoint(f"127.0.0.1:{port}"))
    last = 7400 + changes - 1
    assert len(dev._configured[dev.engine.peers[them]]) <= 2, \
        "the device remembers every endpoint the peer was ever given"
    # Nothing ever answered at the earlier ones: nobody reaches us there, none is dialled.
    wait_for(lambda: set(_dialers(bind)) <= {_shown(bind, last)} and len(_dial_threads()) <= 1,
             TIMEOUT, "the diallers of the endpoints given before to stop")
    assert dev.engine.peers[them].endpoint == bind.parse_endpoint(f"127.0.0.1:{last}")
    # The one it is configured with now is dialled when there is something to send.
    assert dev.connect_peer(them, bind.parse_endpoint(f"127.0.0.1:{last}"))
    assert _dialers(bind) == [_shown(bind, last)]
