"""The transport messages' AEAD: the C extension (`_transport_aead`, a compiled build) and its
pure fallback against `cryptography`'s ChaCha20Poly1305 with WireGuard's nonce layout."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from wgvsock.core import transport_aead
from wgvsock.core.transport_aead import PureTransportKey, TransportKey

ROOT = Path(__file__).resolve().parents[2]
HEADER = b"\x04\x00\x00\x00\x11\x22\x33\x44"


def _native() -> type | None:
    try:
        from wgvsock.core._transport_aead import TransportKey as native
    except ModuleNotFoundError:
        return None
    return native


IMPLS = [PureTransportKey] + ([_native()] if _native() is not None else [])


def _reference(key: bytes, counter: int, packet: bytes, pad: int) -> bytes:
    counter_le = counter.to_bytes(8, "little")
    return HEADER + counter_le + ChaCha20Poly1305(key).encrypt(
        bytes(4) + counter_le, packet + bytes(pad), None)


def test_a_compiled_build_uses_the_extension():
    mypyc_built = any(ROOT.glob("wgvsock_native__mypyc.*.so"))
    if mypyc_built:
        assert _native() is not None, "make compile builds wgvsock/core/_transport_aead.c too"
        assert TransportKey is _native()
    else:
        assert TransportKey is PureTransportKey
    assert transport_aead.__all__ == ["PureTransportKey", "TransportKey"]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__module__)
def test_seal_and_open_match_cryptography(impl):
    rng = random.Random(11)
    key = rng.randbytes(32)
    tk = impl(key)
    # Around the size from which the extension releases the GIL (2048), and counters at the
    # edges of the 64-bit field.
    sizes = [0, 1, 15, 16, 17, 52, 96, 1420, 1424, 2032, 2047, 2048, 8920, 65535]
    counters = [0, 1, 2**32 - 1, 2**32, 2**64 - 1]
    for i, size in enumerate(sizes + [rng.randrange(70000) for _ in range(40)]):
        packet = rng.randbytes(size)
        counter = counters[i % len(counters)] if i < len(sizes) else rng.randrange(2**64)
        pad = i % 16
        msg = tk.seal(HEADER, counter, packet, pad)
        assert msg == _reference(key, counter, packet, pad), (size, counter, pad)
        assert tk.open(msg) == packet + bytes(pad)
        # Buffers other than bytes, as the TUN and stream readers hand them over.
        assert tk.seal(bytearray(HEADER), counter, memoryview(packet), pad) == msg
        assert tk.open(bytearray(msg)) == tk.open(memoryview(msg)) == packet + bytes(pad)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__module__)
def test_a_tail_seals_as_if_joined_to_the_packet(impl):
    """seal(..., tail): the segment-size trailer sealed after a super-packet without joining
    the two (a 64 KiB copy per message). The message is the one the joined bytes seal to,
    and opens to them (padding after the tail), from every kind of buffer and on both sides
    of the size from which the extension releases the GIL (2048)."""
    rng = random.Random(12)
    key = rng.randbytes(32)
    tk = impl(key)
    for size in (0, 1, 16, 2043, 2044, 2048, 8920, 64996):
        for tail in (b"", b"\xfe\x53\xa8\x05", rng.randbytes(17)):
            packet = rng.randbytes(size)
            pad = (size + len(tail)) % 16
            counter = rng.randrange(2**64)
            msg = tk.seal(HEADER, counter, packet, pad, tail)
            assert msg == tk.seal(HEADER, counter, packet + tail, pad), (size, tail)
            assert msg == _reference(key, counter, packet + tail, pad)
            assert tk.open(msg) == packet + tail + bytes(pad)
            assert tk.seal(HEADER, counter, memoryview(packet), pad, bytearray(tail)) == msg
            assert tk.seal(HEADER, counter, bytearray(packet), pad, memoryview(tail)) == msg
    # Refused alike by the C seal and the pure one, which took a falsy non-buffer as no tail.
    for bad in ("text", None, 0, ""):
        with pytest.raises(TypeError):
            tk.seal(HEADER, 0, b"x", 0, bad)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__module__)
def test_open_refuses_what_does_not_authenticate(impl):
    key = os.urandom(32)
    tk = impl(key)
    for size in (0, 100, 20000):
        msg = tk.seal(HEADER, 7, os.urandom(size), 0)
        for pos in (8, 15, 16, len(msg) // 2 + 8, len(msg) - 1):  # counter, data, tag
            if pos >= len(msg):
                continue
            bad = bytearray(msg)
            bad[pos] ^= 0x01
            assert tk.open(bad) is None, (size, pos)
            # A failure leaves nothing behind: the next message opens.
            assert tk.open(msg) is not None
        assert impl(os.urandom(32)).open(msg) is None  # another key
        assert tk.open(msg[:-1]) is None  # truncated
    for short in (b"", HEADER, bytes(31)):
        assert tk.open(short) is None
    # The smallest message, a keepalive, opens to nothing.
    assert tk.open(tk.seal(HEADER, 0, b"", 0)) == b""


@pytest.mark.parametrize("impl", IMPLS, ids=lambda c: c.__module__)
def test_bad_arguments_say_what_was_wrong(impl):
    with pytest.raises(ValueError, match="32 bytes, not 31"):
        impl(bytes(31))
    tk = impl(bytes(32))
    with pytest.raises(ValueError, match="header is 8 bytes, not 7"):
        tk.seal(HEADER[:7], 0, b"x", 0)
    for pad in (-1, 16):
        with pytest.raises(ValueError, match="padding is 0-15 bytes"):
            tk.seal(HEADER, 0, b"x", pad)
    for counter in (-1, 2**64):
        with pytest.raises(OverflowError):
            tk.seal(HEADER, counter, b"x", 0)
    with pytest.raises(TypeError):
        tk.seal(HEADER, 0, "text", 0)
    with pytest.raises(TypeError):
        tk.open("text")


@pytest.mark.skipif(_native() is None, reason="pure build: no C extension to test "
                    "(make compile builds it)")
def test_extension_is_safe_to_share_between_threads():
    """Small messages use the key's own context under the GIL; large ones a copy of it with the
    GIL released. Threads sealing and opening at once with one key get the right answers."""
    native = _native()
    key = os.urandom(32)
    tk = native(key)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for n in range(300):
            size = rng.choice((64, 1420, 2048, 8920, 65000))
            packet = rng.randbytes(size)
            msg = tk.seal(HEADER, seed * 1000 + n, packet, 0)
            if msg != _reference(key, seed * 1000 + n, packet, 0) or tk.open(msg) != packet:
                errors.append(f"thread {seed}, message {n}, {size} bytes")

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.skipif(_native() is None, reason="pure build: no C extension to test "
                    "(make compile builds it)")
def test_a_long_tail_is_sealed_with_the_gil_released():
    """Whether seal() lets other threads run goes by all it seals, the tail included: a short
    packet with a long tail takes as long as a long packet. A bytearray cannot be resized
    while a buffer of it is held, so a thread that finds it cannot ran while seal() held the
    tail, which with the GIL kept it never can."""
    tk = _native()(os.urandom(32))
    tail = bytearray(16 << 20)
    ran_inside = threading.Event()
    stop = threading.Event()

    def resize() -> None:
        while not stop.is_set():
            try:
                tail.append(0)
                tail.pop()
            except BufferError:
                ran_inside.set()
                return

    resizer = threading.Thread(target=resize)
    resizer.start()
    try:
        for counter in range(200):
            tk.seal(HEADER, counter, b"x" * 16, 0, tail)
            if ran_inside.is_set():
                break
    finally:
        stop.set()
        resizer.join()
    assert ran_inside.is_set(), "seal() held the GIL through 16 MiB of tail, 200 times"


def test_without_the_extension_the_pure_key_is_used():
    # As in a pure build (WGVSOCK_PURE=1), where make compile removes the extension.
    code = ("import sys; sys.modules['wgvsock.core._transport_aead'] = None\n"
            "from wgvsock.core import transport_aead as t\n"
            "assert t.TransportKey is t.PureTransportKey, t.TransportKey\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
