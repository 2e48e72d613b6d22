"""What a device on a stream transport makes of handshake messages from strangers: when it is
under load, and what a cookie reply is bound to. Device without a TUN; the peer is an Engine
of its own whose messages are fed to the device as a connection's reader would."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import pytest

from wgvsock.conn.endpoint import Endpoint
from wgvsock.conn.stream import StreamBind
from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.core.engine import REPLY, SEND, Engine
from wgvsock.device.device import _ANSWER_LIMIT, _LOAD_CAPACITY, Device
from wgvsock.device.uapi import parse_set

from .test_tun import in_netns, netns  # noqa: F401 - netns is a fixture

# The types of the messages the device sends back.
RESPONSE, COOKIE_REPLY = 2, 3


class _Rig:
    def __init__(self, d: str) -> None:
        self.sent: list = []
        sent = self.sent

        class Up(Device):  # an interface that is up, whose sends are recorded
            def _is_up(self) -> bool:
                return True

            def _perform(self, actions) -> None:
                sent.extend(a for a in actions if a[0] in (SEND, REPLY))

        self.bind = StreamBind("tcp4")
        self.dev = Up("wgdload0", self.bind, run_dir=os.path.join(d, "run"))
        self.dev._sync_link()
        me, them = generate_private_key(), generate_private_key()
        self.dev.uapi_set(
            parse_set(f"private_key={me.hex()}\npublic_key={public_key(them).hex()}\n")
        )
        self.peer_engine = Engine(them)
        self.peer = self.peer_engine.add_peer(public_key(me))
        self.peer.endpoint = "the device"

    def initiation(self) -> bytes:
        self.peer.handshake.last_sent = None  # (the engine's own limit on initiations)
        ((kind, _, msg),) = self.peer_engine.initiate_handshake(self.peer, time.monotonic())
        assert kind == SEND
        return bytes(msg)

    def answer_to(self, msg: bytes, ep: Endpoint) -> bytes:
        """What the device sends back for `msg` from `ep`."""
        before = len(self.sent)
        self.dev._on_receive(msg, ep)
        [(kind, to, reply)] = self.sent[before:]
        # A response is the peer's (to where it is now), a cookie reply the source's.
        assert (to.endpoint if kind == SEND else to) == ep
        return bytes(reply)


@pytest.fixture
def rig() -> Iterator[_Rig]:
    d = tempfile.mkdtemp(prefix="wgdload", dir="/tmp")
    r = _Rig(d)
    try:
        yield r
    finally:
        r.bind.close()
        shutil.rmtree(d, ignore_errors=True)


def test_junk_with_a_handshake_type_does_not_put_the_device_under_load(rig: _Rig) -> None:
    """Frames that start with byte 1 or 2 counted towards being under load before any mac1
    check: 1300 a second of 38 bytes each, from anyone, kept a device under load, and a
    restarted peer's initiation got only a cookie reply (review finding). Now only messages
    of a handshake's size with our mac1 count, as only they cost a DH."""
    stranger = Endpoint("inet", "192.0.2.9", 40000, 1)
    for i in range(2000):
        rig.dev._on_receive(bytes([1 + i % 2, 0, 0, 0]) + os.urandom(34), stranger)
        rig.dev._on_receive(bytes([1, 0, 0, 0]) + os.urandom(144), stranger)  # right size
    assert not rig.sent
    peer = Endpoint("inet", "192.0.2.7", 40001, 2)
    assert rig.answer_to(rig.initiation(), peer)[0] == RESPONSE


def test_a_cookie_holds_for_the_peers_next_connection(rig: _Rig) -> None:
    """Under load a peer's initiation gets a cookie reply, and its retry (REKEY_TIMEOUT later)
    carries mac2 for it. The cookie was bound to the stream connection, which a peer whose
    connection was closed meanwhile (to make room, say) no longer had: every retry got a new
    cookie reply. Now it is bound to the host, as wireguard-go binds it to the address."""
    first = Endpoint("inet", "192.0.2.7", 40001, 2)
    again = Endpoint("inet", "192.0.2.7", 40002, 3)

    def loaded() -> None:
        rig.dev._load.note_queue(_LOAD_CAPACITY, _LOAD_CAPACITY, time.monotonic())

    loaded()
    reply = rig.answer_to(rig.initiation(), first)
    assert reply[0] == COOKIE_REPLY
    rig.peer_engine.decapsulate(reply, first, time.monotonic())  # the peer keeps the cookie
    assert rig.peer.cookies.has_cookie
    loaded()
    assert rig.answer_to(rig.initiation(), again)[0] == RESPONSE


def _stranger_initiation(device_key: bytes) -> bytes:
    """An initiation from someone who knows the device's public key, and no more."""
    stranger = Engine(generate_private_key())
    them = stranger.add_peer(device_key)
    them.endpoint = "the device"
    ((_, _, msg),) = stranger.initiate_handshake(them, time.monotonic())
    return bytes(msg)


def test_under_load_a_window_answers_so_many_and_one_source_cannot_take_them_all(
    rig: _Rig,
) -> None:
    """A cookie reply to every initiation that passes mac1 took the reader's whole time from
    20000 a second on (tests/net/test_udp_hostile.py). Now a window answers _ANSWER_LIMIT
    sources' first messages and _ANSWER_LIMIT more, first come; the rest go unanswered unless
    they carry a valid mac2, so a peer that got a cookie comes through a flood, and a source
    that floods alone leaves others theirs. (The transport does not matter here.)"""
    dev = rig.dev
    key = dev.engine.public_key
    assert key is not None
    peer_ep = Endpoint("inet", "192.0.2.7", 40001, 2)
    flooder = Endpoint("inet", "192.0.2.9", 40000, 3)
    other = Endpoint("inet", "192.0.2.10", 40000, 4)

    def window() -> None:  # a new window, under load
        dev._hs_window_start = time.monotonic() - 1.0
        dev._load.note_queue(_LOAD_CAPACITY, _LOAD_CAPACITY, time.monotonic())

    def answers(msg: bytes, ep: Endpoint) -> list[int]:
        before = len(rig.sent)
        dev._on_receive(msg, ep)
        return [reply[0] for _, _, reply in rig.sent[before:]]

    window()
    assert answers(_stranger_initiation(key), flooder) == [COOKIE_REPLY]
    assert answers(_stranger_initiation(key), flooder) == [COOKIE_REPLY]
    dev._answered_again = _ANSWER_LIMIT  # as if the flooder had sent that many more
    # Its next ones in this window, with no mac2 or a made-up one: nothing.
    assert answers(_stranger_initiation(key), flooder) == []
    assert answers(_stranger_initiation(key)[:-16] + os.urandom(16), flooder) == []
    # Another source still gets its cookie, and a peer's retry with its cookie its response.
    assert answers(_stranger_initiation(key), other) == [COOKIE_REPLY]
    reply = rig.answer_to(rig.initiation(), peer_ep)
    assert reply[0] == COOKIE_REPLY
    rig.peer_engine.decapsulate(reply, peer_ep, time.monotonic())
    assert rig.answer_to(rig.initiation(), peer_ep)[0] == RESPONSE
    # The next window answers the flooder again.
    window()
    assert answers(_stranger_initiation(key), flooder) == [COOKIE_REPLY]
    # As many sources as a window answers: a new one waits for the next window.
    dev._answered.update(f"source {i}".encode() for i in range(_ANSWER_LIMIT))
    assert answers(_stranger_initiation(key), other) == []


@pytest.mark.root
def test_offload_switches_are_logged_rate_limited(rig: _Rig, caplog, netns: str) -> None:  # noqa: F811
    """Each switch of the TUN's offload was logged at INFO: a peer that reconnected (or
    before, sent hellos) without end filled the log (17383 lines in 30 s). Now a few lines,
    then one in 10 s that says how many were left out. A real TUN (in a namespace of its
    own): the compiled device takes no stand-in."""
    import logging

    from wgvsock.device.tun import Tun

    state = [False]
    rig.dev.tun = in_netns(netns, lambda: Tun.create("wgtun0", offload=True))
    rig.dev.engine.mtu = 65000  # above the MTU where offload is on for every peer
    rig.bind.any_peer_has = lambda flags: state[0]  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.INFO, logger="wgvsock.device"):
            for i in range(100):
                state[0] = i % 2 == 0
                rig.dev._caps_changed()
        assert rig.dev.tun.offloading is False
        lines = [r for r in caplog.records if "segmentation offload" in r.getMessage()]
        assert 1 <= len(lines) <= 6, len(lines)
    finally:
        rig.dev.tun.close()
        rig.dev.tun = None
