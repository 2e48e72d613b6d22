"""The receiver's side of CAP_PARTIAL_CSUM (Device._on_receive_batch): a batch's TCP packets
go to the TUN marked for the kernel to finish their checksums as the hello on the connection
they came on said (Bind.receive_batch's flags), whatever connection the transport has for the
endpoint by the time they are written. No TUN device: the Tun writes virtio-net headers and
packets to a socket pair; the peer is a second engine that made a real handshake with the
device's."""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest

from wgvsock.conn.caps import CAP_PARTIAL_CSUM, CAP_SUPER

from .devrig import DeviceRig, tcp
from .stubbind import StubBind

_NEEDS_CSUM = 1


class _GoneBind(StubBind):
    """A stream transport that has no connection for any endpoint any more (peer_caps says
    nothing was offered), as when the one a batch came on was replaced or closed meanwhile;
    it keeps what the device sends."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data, ep):
        self.sent.append(bytes(data))
        return len(data)

    def peer_caps(self, ep):
        return (0, 0)


@pytest.fixture
def rig() -> Iterator[DeviceRig]:
    r = DeviceRig(_GoneBind())
    try:
        yield r
    finally:
        r.close()


def test_a_batch_from_a_connection_that_offered_partial_checksums_has_them_finished(
    rig
) -> None:
    """The sender left the checksums partial because the hello on this connection offered
    CAP_PARTIAL_CSUM; the connection is gone by the time the batch is written (peer_caps
    says (0, 0)). Each packet still goes as NEEDS_CSUM for the kernel to finish. Before
    0cb0092 the device asked peer_caps, wrote them as they were, and the kernel dropped
    them for their bad checksums."""
    # Two flows: packets of one would go as one GSO write, which needs no such word.
    packets = [tcp(40000), tcp(40001)]
    rig.dev._on_receive_batch([rig.sealed(p) for p in packets], rig.src,
                              CAP_SUPER | CAP_PARTIAL_CSUM)
    out = rig.written()
    assert [w[10:] for w in out] == packets
    for w in out:
        flags, _, _, _, start, offset = struct.unpack_from("<BBHHHH", w)
        assert (flags & _NEEDS_CSUM, start, offset) == (_NEEDS_CSUM, 20, 16)


def test_a_batch_from_a_connection_that_offered_nothing_goes_as_it_is(rig) -> None:
    """The Go seed's (no hello), or our daemon's with offload off: its checksums are complete,
    and its packets are written without looking for a partial one."""
    packets = [tcp(40000), tcp(40001)]
    rig.dev._on_receive_batch([rig.sealed(p) for p in packets], rig.src, 0)
    out = rig.written()
    assert [w[10:] for w in out] == packets
    assert all(w[0] & _NEEDS_CSUM == 0 for w in out)
