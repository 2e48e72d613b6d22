"""How a device counts a peer's tx_bytes (Device._perform, _perform_batch, _sent_later): what
the transport took, added by whichever thread sent it. Sends to one peer from several threads
(the TUN reader, a connection's reader answering, the timer) overlap, and a stream send may
wait a long time for the socket. No TUN device; the transport is a stand-in."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

import pytest

from wgvsock.conn.endpoint import Endpoint
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import SEND
from wgvsock.core.peer import Peer
from wgvsock.device.device import Device
from wgvsock.device.uapi import parse_set

from .stubbind import StubBind

_EP = Endpoint("unix", "peer", 1)
_INBOUND = Endpoint("unix", "", 0, conn_id=7)  # a connection the peer dialled


class _SlowBind(StubBind):
    """Takes every message; the first send waits for `release` (a socket with no room) and
    says when it is inside (`waiting`)."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.release = threading.Event()
        self.calls = 0

    def _wait_once(self) -> None:
        self.calls += 1
        if self.calls == 1:
            self.waiting.set()
            assert self.release.wait(10)

    def send(self, data, ep):
        self._wait_once()
        return len(data)

    def send_batch(self, messages, ep):
        self._wait_once()
        return sum(map(len, messages))

    def parse_endpoint(self, text):
        return Endpoint("unix", text.split(":")[0], 1)

    def peers_changed(self, endpoints, earlier=frozenset()):
        return earlier  # a connection dialled to each is up


class _Rig:
    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="wgtx")
        self.bind = _SlowBind()
        self.dev = Device("wgtxbytes", self.bind, run_dir=os.path.join(self.dir, "run"))
        key = public_key(generate_private_key())
        self.key = key
        self.set_endpoint("peer:1")
        self.peer: Peer = self.dev.engine.peers[key]
        assert self.peer.endpoint == _EP

    def set_endpoint(self, text: str) -> None:
        self.dev.uapi_set(parse_set(f"public_key={self.key.hex()}\nendpoint={text}\n"
                                    "allowed_ip=10.0.0.0/24\n"))

    def close(self) -> None:
        self.bind.release.set()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def rig() -> Iterator[_Rig]:
    r = _Rig()
    try:
        yield r
    finally:
        r.close()


def _while_a_send_waits(rig: _Rig, first: list, meanwhile) -> None:
    """`first` sent by a thread whose send waits; `meanwhile` run while it waits."""
    dev = rig.dev
    t = threading.Thread(target=dev._perform_batch if len(first) > 1 else dev._perform,
                         args=(first,))
    t.start()
    try:
        assert rig.bind.waiting.wait(10), "the first send never started"
        meanwhile()
    finally:
        rig.bind.release.set()
        t.join(10)
    assert not t.is_alive()


@pytest.mark.parametrize("batch", [False, True])
def test_sends_that_overlap_are_all_counted(rig: _Rig, batch: bool) -> None:
    """A thread read tx_bytes before it sent and wrote it back after: a keepalive another
    thread sent to the peer meanwhile (a reader answering a handshake response, while the TUN
    reader waited for room on the connection) was written over, lost from `wg show`."""
    peer = rig.peer
    first = [(SEND, peer, bytes(100))] + ([(SEND, peer, bytes(200))] if batch else [])

    def meanwhile() -> None:
        rig.dev._perform([(SEND, peer, bytes(32))])
        rig.dev._perform_batch([(SEND, peer, bytes(48)), (SEND, peer, bytes(64))])
        assert peer.tx_bytes == 32 + 48 + 64

    _while_a_send_waits(rig, first, meanwhile)
    assert peer.tx_bytes == (300 if batch else 100) + 32 + 48 + 64


def test_a_dialler_queue_counted_while_a_send_waits(rig: _Rig) -> None:
    """What a stream dialler reports it sent (sent_later, under the device's lock) while
    another send to the peer waits is kept too."""
    peer = rig.peer

    def meanwhile() -> None:
        rig.dev._sent_later(_EP, 500)
        assert peer.tx_bytes == 500

    _while_a_send_waits(rig, [(SEND, peer, bytes(100))], meanwhile)
    assert peer.tx_bytes == 600


def test_a_dialler_queue_is_counted_for_its_peer_that_moved_on(rig: _Rig) -> None:
    """A dialler's queue is reported by its endpoint when it goes (sent_later), which may be
    after the peer moved on: to a connection the other side dialled us on (both sides
    configured with an endpoint, and ours came up first: our initiation waited in the
    queue), or re-pointed while the queue drained. Counted for no peer before, though the
    other side received (and counted) it."""
    peer = rig.peer
    peer.endpoint = _INBOUND  # roamed
    rig.dev._sent_later(_EP, 148)
    assert peer.tx_bytes == 148
    rig.set_endpoint("elsewhere:1")  # re-pointed
    rig.dev._sent_later(_EP, 32)
    assert peer.tx_bytes == 148 + 32
    # The current endpoint's peer first: another may have been configured with it before.
    other = public_key(generate_private_key())
    rig.dev.uapi_set(parse_set(f"public_key={other.hex()}\nendpoint=peer:1\n"))
    rig.dev._sent_later(_EP, 64)
    assert rig.dev.engine.peers[other].tx_bytes == 64 and peer.tx_bytes == 148 + 32
    # An endpoint no peer has, or was configured with: nobody's.
    rig.dev._sent_later(Endpoint("unix", "nobody", 1), 100)
    assert peer.tx_bytes == 148 + 32 and rig.dev.engine.peers[other].tx_bytes == 64
