"""Hostile input into the core: random and mutated messages come back as drops, never raise."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wgvsock.core.engine import DROP, REPLY, SEGMENTED, SEND, TUNNEL
from wgvsock.core.messages import TYPE_COOKIE_REPLY, TYPE_INITIATION, TYPE_RESPONSE, TYPE_TRANSPORT

from .wire import Pair, ip4

PREFIXES = [TYPE_INITIATION, TYPE_RESPONSE, TYPE_COOKIE_REPLY, TYPE_TRANSPORT, b"", b"\x05\0\0\0"]


def _valid_messages():
    p = Pair(seed=7)
    p.a_to_b()
    p.b_to_a()
    p.under_load["B"] = True
    p.pa.handshake.last_sent = None
    p.now += 6
    p.a_to_b()
    return p, [m for side in ("A", "B") for m in p.sent[side]]


PAIR, VALID = _valid_messages()


def _check(out):
    assert isinstance(out, list)
    for kind, _target, data in out:
        assert kind in (SEND, REPLY, TUNNEL, SEGMENTED, DROP)
        assert isinstance(data, (bytes, str))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=300), load=st.booleans())
def test_random_messages_never_raise(prefix, body, load):
    for engine in (PAIR.a, PAIR.b):
        _check(engine.decapsulate(prefix + body, "X", PAIR.now, src_key=b"X", under_load=load))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    index=st.integers(min_value=0, max_value=len(VALID) - 1),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255)), max_size=4),
    cut=st.integers(min_value=-20, max_value=0),
    extra=st.binary(max_size=20),
    load=st.booleans(),
)
def test_mutated_messages_never_raise(index, flips, cut, extra, load):
    msg = bytearray(VALID[index])
    for pos, mask in flips:
        msg[pos % len(msg)] ^= mask
    if cut:
        msg = msg[:cut]
    msg += extra
    for engine in (PAIR.a, PAIR.b):
        out = engine.decapsulate(bytes(msg), "X", PAIR.now, src_key=b"X", under_load=load)
        _check(out)
        if flips or cut or extra:
            # A changed message must never yield a packet for the tunnel.
            assert not any(k in (TUNNEL, SEGMENTED) for k, _, _ in out)


@settings(max_examples=300, deadline=None)
@given(packet=st.binary(max_size=200))
def test_random_packets_from_tun_never_raise(packet):
    _check(PAIR.a.encapsulate(packet, PAIR.now))


def test_transport_with_valid_tag_but_garbage_inside_is_dropped():
    p = Pair()
    p.a_to_b()
    kp = p.pa.keypairs.current
    truncated = ip4("10.0.0.1", "10.0.0.2")[:-5]
    for inner in (b"\x45" + bytes(5), b"\x60" + bytes(10), b"\x10" * 30, truncated):
        counter = kp.send_nonce
        kp.send_nonce += 1
        msg = kp.send.seal(kp.header, counter, inner, 0)
        out = p.b.decapsulate(msg, "A", p.now)
        assert out[-1][0] == DROP
