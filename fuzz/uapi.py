"""Targets `uapi-server`, `uapi-set` and `uapi-get`: the UAPI protocol from both ends.

`uapi-server` runs a real UAPIServer in this process (its socket in a private directory) in
front of a real Device (not started: no TUN) on the Unix stand-in transport, and writes each
input to a fresh connection as a client would, then half-closes. The server must answer with
well-formed replies only and close; the device must only ever be given a configuration that
survives format_set/parse_set unchanged; and the server must never log an unexpected error
(which is how it reports an exception from the device). `uapi-set` and `uapi-get`
call parse_set and parse_get directly; UAPIError is their documented refusal.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
import re
import socket
from pathlib import Path

from wgvsock.conn import StreamBind
from wgvsock.device.device import Device
from wgvsock.device.uapi import (
    DeviceConfig,
    DeviceStatus,
    PeerConfig,
    PeerStatus,
    UAPIError,
    UAPIServer,
    format_get,
    format_set,
    parse_get,
    parse_set,
)

from .harness import Hang, Target, quiet
from .mutate import TEXT_VALUES, havoc, mutate_text, random_bytes

UAPI_VALUES = (
    *TEXT_VALUES, "11" * 32, "00" * 32, "1" * 63, "1" * 65, "g" * 64, "-10.0.0.0/8", "-",
    "--1.2.3.4/32",
    "1.2.3.4/0", "::/0", "::ffff:1.2.3.4/128", "fe80::1%eth0/64", "1.2.3.4/032", "1.2.3.4/ 8",
    "public_key", "private_key", "allowed_ip", "errno", "set=1", "get=1",
)
ENDPOINTS = ("1.2.3.4:51820", "[::1]:5", "[fe80::1%eth0]:1", "vsock:3:51820", "3:51820",
             "unix:/run/x/wg.sock", "localhost:1")
SERVER_TIMEOUT = 5.0  # the fuzzer's wait for a reply; the server's own idle timeout is 2 s
_REPLY = re.compile(rb"(?:(?:[a-z_]+=[^\n]*\n)*errno=-?[0-9]+\n\n)*")


def _key(rng: random.Random) -> bytes:
    return rng.choice((bytes(32), b"\x11" * 32, rng.randbytes(32)))


def _network(rng: random.Random) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    if rng.random() < 0.6:
        return ipaddress.ip_network((rng.getrandbits(32), rng.randint(0, 32)), strict=False)
    return ipaddress.ip_network((rng.getrandbits(128), rng.randint(0, 128)), strict=False)


def random_config(rng: random.Random) -> DeviceConfig:
    cfg = DeviceConfig()
    if rng.random() < 0.5:
        cfg.private_key = _key(rng)
    if rng.random() < 0.5:
        cfg.listen_port = rng.choice((0, 51820, 65535, 2**32 - 1))
    if rng.random() < 0.2:
        cfg.fwmark = rng.getrandbits(32)
    cfg.replace_peers = rng.random() < 0.3
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        p = PeerConfig(public_key=_key(rng), remove=rng.random() < 0.1,
                       update_only=rng.random() < 0.1)
        if rng.random() < 0.3:
            p.preshared_key = _key(rng)
        if rng.random() < 0.6:
            p.endpoint = rng.choice(ENDPOINTS)
        if rng.random() < 0.3:
            p.persistent_keepalive = rng.choice((0, 25, 65535))
        p.replace_allowed_ips = rng.random() < 0.5
        p.allowed_ips = [(_network(rng), rng.random() < 0.8) for _ in range(rng.randint(0, 4))]
        cfg.peers.append(p)
    return cfg


def random_status(rng: random.Random) -> DeviceStatus:
    status = DeviceStatus(private_key=_key(rng) if rng.random() < 0.8 else None,
                          listen_port=rng.choice((0, 51820, 65535)),
                          fwmark=rng.choice((0, 0, 7)))
    if rng.random() < 0.3:
        status.extra["transport"] = rng.choice(("vsock", "unix", "tcp"))
    for _ in range(rng.choice((0, 1, 2, 3))):
        status.peers.append(PeerStatus(
            public_key=rng.randbytes(32),
            preshared_key=rng.randbytes(32) if rng.random() < 0.3 else None,
            endpoint=rng.choice((None, *ENDPOINTS)),
            last_handshake_time_sec=rng.getrandbits(rng.choice((1, 32, 63))),
            last_handshake_time_nsec=rng.randrange(10**9),
            rx_bytes=rng.getrandbits(rng.choice((1, 32, 64))),
            tx_bytes=rng.getrandbits(rng.choice((1, 32, 64))),
            persistent_keepalive_interval=rng.choice((0, 25, 65535)),
            allowed_ips=[str(_network(rng)) for _ in range(rng.randint(0, 3))],
            extra={"attested": "true"} if rng.random() < 0.2 else {},
        ))
    return status


def set_request_body(rng: random.Random) -> str:
    """A set request body, mutated most of the time."""
    body = format_set(random_config(rng))
    if rng.random() < 0.8:
        body = mutate_text(rng, body, values=UAPI_VALUES, max_len=8192)
    return body


def check_set(text: str) -> None:
    """parse_set, and a configuration it returns must format and parse back equal."""
    cfg = parse_set(text)
    again = parse_set(format_set(cfg))
    assert again == cfg, "parse_set(format_set(cfg)) differs from cfg"


class UAPISetTarget(Target):
    name = "uapi-set"
    count = 50_000
    shard_size = 25_000
    allowed = (UAPIError,)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        if rng.random() < 0.1:
            return "random", random_bytes(rng, 600)
        return "mutated", set_request_body(rng).encode("utf-8", "surrogatepass")

    def run(self, data: bytes) -> None:
        check_set(data.decode("utf-8", "replace"))


def status_from(reply: dict) -> DeviceStatus:
    """The DeviceStatus a parse_get result describes."""
    return DeviceStatus(
        private_key=reply["private_key"], listen_port=reply["listen_port"],
        fwmark=reply["fwmark"], extra=reply["extra"],
        peers=[PeerStatus(**p) for p in reply["peers"]],
    )


class UAPIGetTarget(Target):
    name = "uapi-get"
    count = 50_000
    shard_size = 25_000
    allowed = (UAPIError,)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        # The first byte says whether the reply is unchanged (V), which the oracle needs.
        r = rng.random()
        if r < 0.1:
            return "random", b"M" + random_bytes(rng, 600)
        text = format_get(random_status(rng))
        if r < 0.2:
            return "valid", b"V" + text.encode()
        if r < 0.3:
            text = text.replace("errno=0", f"errno={rng.choice(('-22', '-1', '5', 'x', ''))}")
        return "mutated", b"M" + mutate_text(rng, text, values=UAPI_VALUES, max_len=8192).encode()

    def run(self, data: bytes) -> None:
        text = data[1:].decode("utf-8", "replace")
        reply = parse_get(text)
        status = status_from(reply)
        if data[:1] == b"V":
            assert format_get(status) == text, "format_get(parse_get(reply)) differs from reply"


class _Errors(logging.Handler):
    """Collects the server's ERROR records (log.exception is how it reports a crash)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Checked:
    """The device as UAPI handler, with the round-trip oracle in front of its set."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def uapi_get(self) -> DeviceStatus:
        return self.device.uapi_get()

    def uapi_set(self, cfg: DeviceConfig) -> None:
        assert parse_set(format_set(cfg)) == cfg, "the device was given an unformattable config"
        self.device.uapi_set(cfg)


class UAPIServerTarget(Target):
    name = "uapi-server"
    count = 20_000
    shard_size = 5_000
    rebuild_every = 1_000  # a fresh device now and then: peers pile up

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        super().__init__(rng, workdir)
        self.bind = StreamBind("unix", unix_dir=str(workdir / "wg"))
        self.device = Device("fz0", self.bind, run_dir=str(workdir / "run"))
        self.errors = _Errors()
        # The server's own logger (it was once "wgvsock.uapi", a name nothing logs to, and
        # both the crash check and the round-trip check in _Checked went unheard).
        self.log = logging.getLogger(UAPIServer.__module__)
        self.log.addHandler(self.errors)
        # The server and device log every bad request and port change; the output is the table.
        # (The server's own log keeps its level: its errors are the findings.)
        self._propagate, self.log.propagate = self.log.propagate, False
        self._quiet = [quiet("wgvsock.device.device"), quiet("wgvsock.conn")]
        for q in self._quiet:
            q.__enter__()
        self.server = UAPIServer("fz0", _Checked(self.device), str(workdir / "run"),
                                 max_request=1 << 16, idle_timeout=2.0)

    def close(self) -> None:
        self.server.close()
        self.bind.close()
        self.log.removeHandler(self.errors)
        self.log.propagate = self._propagate
        for q in self._quiet:
            q.__exit__(None, None, None)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.1:
            return "random", random_bytes(rng, 600)
        if r < 0.6:
            request = f"set=1\n{set_request_body(rng)}\n"
            if rng.random() < 0.2:
                request += "get=1\n\n"
            return "set", request.encode("utf-8", "surrogatepass")
        if r < 0.75:
            op = rng.choice(("get=1\n\n", "get=1\n", "get=1\nx=1\n\n", "get=2\n\n", "get=1\r\n\r\n",
                             "set=1\n\n", "set=1\n", "\n", "GET=1\n\n", "get=1\n\nget=1\n\n"))
            return "ops", op.encode()
        if r < 0.85:  # a line or a request over the server's limits
            line = rng.choice(("endpoint=", "x", "allowed_ip=1.2.3.4/32\n"))
            n = rng.choice((4095, 4096, 4097, 70_000 // len(line)))
            key = f"public_key={'11' * 32}\n"
            return "oversize", f"set=1\n{key}{line * n}\n\n".encode()
        stream = b"".join(f"set=1\n{set_request_body(rng)}\n".encode("utf-8", "surrogatepass")
                          if rng.random() < 0.7 else b"get=1\n\n" for _ in range(3))
        return "multi", havoc(rng, stream, max_len=20_000)

    def run(self, data: bytes) -> None:
        self.errors.records.clear()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(SERVER_TIMEOUT)
            s.connect(self.server.path)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                # The server may hang up before reading everything (an oversized request).
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            reply = bytearray()
            while True:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                except TimeoutError:
                    raise Hang(f"server neither answered nor closed in {SERVER_TIMEOUT} s"
                               ) from None
                if not chunk:
                    break
                reply += chunk
        for record in self.errors.records:
            raise AssertionError(f"server logged: {logging.Formatter().format(record)}")
        assert _REPLY.fullmatch(reply), f"malformed reply {bytes(reply[:200])!r}"
