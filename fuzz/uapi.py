"""Targets `uapi-server`, `uapi-set` and `uapi-get`: the UAPI protocol from both ends.

`uapi-server` runs a real UAPIServer in this process (its socket in a private directory) in
front of a real Device (not started: no TUN) on the Unix stand-in transport, and writes each
input to a fresh connection as a client would, then half-closes. The server must answer with
well-formed replies only, each with an errno the module docstring documents, and close; the
device must only ever be given a configuration that survives format_set/parse_set unchanged;
a set the device refuses, and a connection none of whose replies is errno=0, must leave the
device as it was (its `get` before and after); a request with one known bad line must be
answered with that line's errno alone; and the server must never log an unexpected error
(which is how it reports an exception from the device). `uapi-set` and `uapi-get` call
parse_set and parse_get directly; UAPIError is their documented refusal.

The first byte of a `uapi-set` input says what the oracle may expect of the rest: V, a
well-formed request written here (not by format_set) that parse_set must read as
`reference_set` does; E, a line "E<errno>" and a request with one bad line, which parse_set
must refuse with that errno; M, anything else, checked for the format_set round trip only.
A `uapi-server` input is E as for `uapi-set` (then a whole set=1 request) or R (raw bytes).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import random
import re
import socket
from pathlib import Path

from wgvsock.conn import StreamBind
from wgvsock.device.device import Device
from wgvsock.device.device import log as device_log
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
# The errnos the uapi module docstring documents (EIO, EINVAL, EPROTO, EADDRINUSE), from errno
# rather than from the module under test.
EINVAL, EPROTO = -errno.EINVAL, -errno.EPROTO
_ERRNOS = (0, -errno.EIO, EINVAL, EPROTO, -errno.EADDRINUSE)
_REPLY = re.compile(rb"(?:(?:[a-z_]+=[^\n]*\n)*errno=(?:%s)\n\n)*"
                    % b"|".join(str(e).encode() for e in _ERRNOS))
_SUCCESS = re.compile(rb"(?:^|\n)errno=0\n")
_KEY = "11" * 32
# One bad line each, with the errno the docstring gives for it, and where it goes: among the
# device's lines (before any public_key), among a peer's, or anywhere.
BAD_LINES = (
    ("device", "listen_port=4294967296", EINVAL), ("device", "listen_port=-1", EINVAL),
    ("device", "listen_port= 1", EINVAL), ("device", "listen_port=0x10", EINVAL),
    ("device", "listen_port=1_0", EINVAL), ("device", "fwmark=4294967296", EINVAL),
    ("device", "private_key=" + "1" * 63, EINVAL), ("device", "private_key=" + "g" * 64, EINVAL),
    ("device", "replace_peers=false", EINVAL), ("device", "replace_peers=", EINVAL),
    ("device", "remove=true", EINVAL), ("device", "protocol_version=1", EINVAL),
    ("device", "endpoint=1.2.3.4:1", EINVAL), ("device", "allowed_ip=10.0.0.0/8", EINVAL),
    ("device", "Private_key=" + _KEY, EINVAL), ("device", "=1", EINVAL),
    ("peer", "protocol_version=2", EINVAL), ("peer", "protocol_version=", EINVAL),
    ("peer", "private_key=" + _KEY, EINVAL), ("peer", "listen_port=1", EINVAL),
    ("peer", "fwmark=0", EINVAL), ("peer", "replace_peers=true", EINVAL),
    ("peer", "persistent_keepalive_interval=65536", EINVAL),
    ("peer", "persistent_keepalive_interval=-1", EINVAL),
    ("peer", "allowed_ip=1.2.3.4", EINVAL), ("peer", "allowed_ip=1.2.3.4/33", EINVAL),
    ("peer", "allowed_ip=::/129", EINVAL), ("peer", "allowed_ip=--1.2.3.4/32", EINVAL),
    ("peer", "allowed_ip=-", EINVAL), ("peer", "allowed_ip=fe80::1%eth0/64", EINVAL),
    ("peer", "allowed_ip=1.2.3.4/+8", EINVAL), ("peer", "endpoint=", EINVAL),
    ("peer", "remove=false", EINVAL), ("peer", "update_only=1", EINVAL),
    ("peer", "replace_allowed_ips=yes", EINVAL), ("peer", "preshared_key=" + "1" * 65, EINVAL),
    ("peer", "x=1", EINVAL),
    ("any", "public_key=" + "zz" * 32, EINVAL), ("any", "public_key=", EINVAL),
    ("any", "no equals sign", EPROTO), ("any", "listen_port", EPROTO),
    ("any", "allowed_ip 10.0.0.0/8", EPROTO),
)


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


def _allowed_ip(rng: random.Random, net: ipaddress.IPv4Network | ipaddress.IPv6Network,
                add: bool) -> str:
    text = str(net)
    if rng.random() < 0.2:  # host bits set, which the parser masks off as Go's does
        text = f"{net.network_address + rng.randrange(net.num_addresses)}/{net.prefixlen}"
    return f"allowed_ip={'' if add else '-'}{text}"


def request_lines(rng: random.Random, cfg: DeviceConfig) -> list[str]:
    """The lines of a set request for CFG, written here rather than by format_set and in an
    order of their own: the device's lines in any order, then each peer's public_key line
    followed by its other lines in any order (its allowed_ip lines keep theirs)."""
    def hexkey(key: bytes) -> str:
        return key.hex().upper() if rng.random() < 0.2 else key.hex()

    lines = [line for line, on in (
        (f"private_key={hexkey(cfg.private_key or b'')}", cfg.private_key is not None),
        (f"listen_port={cfg.listen_port}", cfg.listen_port is not None),
        (f"fwmark={cfg.fwmark}", cfg.fwmark is not None),
        ("replace_peers=true", cfg.replace_peers)) if on]
    rng.shuffle(lines)
    for p in cfg.peers:
        rest = [line for line, on in (
            ("remove=true", p.remove), ("update_only=true", p.update_only),
            ("replace_allowed_ips=true", p.replace_allowed_ips),
            ("protocol_version=1", rng.random() < 0.3),
            (f"preshared_key={hexkey(p.preshared_key or b'')}", p.preshared_key is not None),
            (f"endpoint={p.endpoint}", p.endpoint is not None),
            (f"persistent_keepalive_interval={p.persistent_keepalive}",
             p.persistent_keepalive is not None)) if on]
        rng.shuffle(rest)
        at = 0
        for net, add in p.allowed_ips:
            at = rng.randint(at, len(rest))
            rest.insert(at, _allowed_ip(rng, net, add))
            at += 1
        lines += [f"public_key={hexkey(p.public_key)}", *rest]
    return lines


def reference_set(text: str) -> DeviceConfig:
    """What a request request_lines wrote asks for, read the plain way (each line is valid)."""
    cfg = DeviceConfig()
    peer: PeerConfig | None = None
    for line in text.removeprefix("set=1\n").replace("\r\n", "\n").split("\n"):
        key, _, value = line.partition("=")
        if key == "public_key":
            peer = PeerConfig(public_key=bytes.fromhex(value))
            cfg.peers.append(peer)
        elif key == "private_key":
            cfg.private_key = bytes.fromhex(value)
        elif key in ("listen_port", "fwmark"):
            setattr(cfg, key, int(value))
        elif key == "replace_peers":
            cfg.replace_peers = True
        elif peer is None:
            assert not line, f"reference_set: {line!r} before any peer"
        elif key in ("remove", "update_only"):
            setattr(peer, key, True)
        elif key == "replace_allowed_ips":  # lines apply in order: it drops those before it
            peer.replace_allowed_ips = True
            peer.allowed_ips = []
        elif key == "preshared_key":
            peer.preshared_key = bytes.fromhex(value)
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = int(value)
        elif key == "allowed_ip":
            net = ipaddress.ip_network(value.removeprefix("-"), strict=False)
            peer.allowed_ips.append((net, not value.startswith("-")))
    return cfg


def _lines(lines: list[str], eol: str = "\n") -> str:
    return "".join(line + eol for line in lines)


def _join(rng: random.Random, lines: list[str]) -> str:
    """LINES as a request body, with or without its set=1 line and blank line, LF or CRLF."""
    body = _lines(lines, "\r\n" if rng.random() < 0.1 else "\n")
    if rng.random() < 0.2:
        body = "set=1\n" + body
    return body + ("\n" if rng.random() < 0.2 else "")


def valid_body(rng: random.Random) -> str:
    return _join(rng, request_lines(rng, random_config(rng)))


def bad_request(rng: random.Random) -> tuple[int, list[str]]:
    """(errno, lines): a well-formed request with one line from BAD_LINES put where it is bad."""
    lines = request_lines(rng, random_config(rng))
    where, bad, code = rng.choice(BAD_LINES)
    peers = [i for i, line in enumerate(lines) if line.startswith("public_key=")]
    if where == "device":
        at = rng.randint(0, peers[0] if peers else len(lines))
    elif where == "peer":
        if not peers:
            peers = [len(lines)]
            lines.append(f"public_key={_KEY}")
        at = rng.randint(peers[0] + 1, len(lines))
    else:
        at = rng.randint(0, len(lines))
    lines.insert(at, bad)
    return code, lines


def set_request_body(rng: random.Random) -> str:
    """A set request body, mutated most of the time."""
    body = format_set(random_config(rng))
    if rng.random() < 0.8:
        body = mutate_text(rng, body, values=UAPI_VALUES, max_len=8192)
    return body


def check_set(text: str, valid: bool = False) -> None:
    """parse_set, and a configuration it returns must format and parse back equal. A VALID
    text (made by request_lines) must also be read as reference_set reads it: a parser that
    agrees with its own formatter can still misread a key."""
    cfg = parse_set(text)
    if valid:
        assert cfg == reference_set(text), "parse_set misread a valid request"
    again = parse_set(format_set(cfg))
    assert again == cfg, "parse_set(format_set(cfg)) differs from cfg"


def check_refused(text: str, code: int) -> None:
    """parse_set must refuse TEXT with errno CODE (re-raising its UAPIError)."""
    try:
        parse_set(text)
    except UAPIError as e:
        assert e.errno == code, f"errno {e.errno} for a request whose bad line means {code}: {e}"
        raise
    raise AssertionError(f"parse_set accepted a request with a bad line (errno {code} expected)")


class UAPISetTarget(Target):
    name = "uapi-set"
    count = 50_000
    shard_size = 25_000
    allowed = (UAPIError,)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.1:
            return "random", b"M" + random_bytes(rng, 600)
        if r < 0.2:
            return "valid", b"V" + valid_body(rng).encode()
        if r < 0.3:
            code, lines = bad_request(rng)
            return "bad-line", f"E{code}\n{_join(rng, lines)}".encode()
        return "mutated", b"M" + set_request_body(rng).encode("utf-8", "surrogatepass")

    def run(self, data: bytes) -> None:
        text = data[1:].decode("utf-8", "replace")
        if data[:1] == b"E":
            head, _, text = text.partition("\n")
            check_refused(text, int(head))
        check_set(text, valid=data[:1] == b"V")


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
    """The device as UAPI handler, with the round-trip oracle in front of its set and the
    nothing-changed oracle behind a set it refuses (device.py: "a bad request leaves the
    device as it was")."""

    def __init__(self, device: Device) -> None:
        self.device = device

    def uapi_get(self) -> DeviceStatus:
        return self.device.uapi_get()

    def uapi_set(self, cfg: DeviceConfig) -> None:
        assert parse_set(format_set(cfg)) == cfg, "the device was given an unformattable config"
        before = self.device.uapi_get()
        try:
            self.device.uapi_set(cfg)
        except UAPIError:
            assert self.device.uapi_get() == before, "a set the device refused changed it"
            raise


class UAPIServerTarget(Target):
    name = "uapi-server"
    count = 20_000
    shard_size = 5_000
    rebuild_every = 1_000  # a fresh device now and then: peers pile up

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        super().__init__(rng, workdir)
        self.bind = StreamBind("unix", unix_dir=str(workdir / "wg"))
        self.device = Device("fz0", self.bind, run_dir=str(workdir / "run"))
        # Listening, as start() leaves a device before UAPI serves it: a never-opened bind has
        # no port to fall back to when a new one is refused.
        self.device.uapi_set(DeviceConfig(listen_port=51820))
        self.errors = _Errors()
        # The server's own logger (it was once "wgvsock.uapi", a name nothing logs to, and
        # both the crash check and the round-trip check in _Checked went unheard).
        self.log = logging.getLogger(UAPIServer.__module__)
        self.log.addHandler(self.errors)
        # The server and device log every bad request and port change; the output is the table.
        # (The server's own log keeps its level: its errors are the findings.)
        self._propagate, self.log.propagate = self.log.propagate, False
        # Its level set here, so that quieting the device's logger (its parent) leaves it be.
        self._level, self.log.level = self.log.level, logging.ERROR
        self._quiet = [quiet(device_log.name), quiet("wgvsock.conn")]
        for q in self._quiet:
            q.__enter__()
        self.server = UAPIServer("fz0", _Checked(self.device), str(workdir / "run"),
                                 max_request=1 << 16, idle_timeout=2.0)

    def close(self) -> None:
        self.server.close()
        self.bind.close()
        self.log.removeHandler(self.errors)
        self.log.propagate, self.log.level = self._propagate, self._level
        for q in self._quiet:
            q.__exit__(None, None, None)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.1:
            return "random", b"R" + random_bytes(rng, 600)
        if r < 0.5:
            if rng.random() < 0.2:
                body = _lines(request_lines(rng, random_config(rng)))
            else:
                body = set_request_body(rng)
            request = f"set=1\n{body}\n"
            if rng.random() < 0.2:
                request += "get=1\n\n"
            return "set", b"R" + request.encode("utf-8", "surrogatepass")
        if r < 0.6:
            code, lines = bad_request(rng)
            return "bad-line", f"E{code}\nset=1\n{_lines(lines)}\n".encode()
        if r < 0.75:
            op = rng.choice(("get=1\n\n", "get=1\n", "get=1\nx=1\n\n", "get=2\n\n", "get=1\r\n\r\n",
                             "set=1\n\n", "set=1\n", "\n", "GET=1\n\n", "get=1\n\nget=1\n\n"))
            return "ops", b"R" + op.encode()
        if r < 0.85:  # a line or a request over the server's limits
            line = rng.choice(("endpoint=", "x", "allowed_ip=1.2.3.4/32\n"))
            n = rng.choice((4095, 4096, 4097, 70_000 // len(line)))
            key = f"public_key={'11' * 32}\n"
            return "oversize", f"Rset=1\n{key}{line * n}\n\n".encode()
        stream = b"".join(f"set=1\n{set_request_body(rng)}\n".encode("utf-8", "surrogatepass")
                          if rng.random() < 0.7 else b"get=1\n\n" for _ in range(3))
        return "multi", b"R" + havoc(rng, stream, max_len=20_000)

    def run(self, data: bytes) -> None:
        self.errors.records.clear()
        expected = None
        if data[:1] == b"E":
            head, _, data = data[1:].partition(b"\n")
            expected = b"errno=%d\n\n" % int(head)
        else:
            data = data[1:]
        before = self.device.uapi_get()
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
            cause = f": {record.exc_info[1]}" if record.exc_info else ""
            raise AssertionError(f"server logged: {record.getMessage()}{cause}\n"
                                 f"{logging.Formatter().format(record)}")
        assert _REPLY.fullmatch(reply), f"malformed reply {bytes(reply[:200])!r}"
        if expected is not None:
            assert reply == expected, f"reply {bytes(reply[:200])!r}, not {expected!r}"
        if not _SUCCESS.search(reply):
            # Nothing succeeded (no reply at all included): nothing may have changed.
            assert self.device.uapi_get() == before, (
                f"the device changed though no reply was errno=0: {bytes(reply[:200])!r}")
