"""WireGuard cross-platform configuration protocol (UAPI): parser, formatter, client, server.

Protocol: https://www.wireguard.com/xplatform/ . Behaviour follows wireguard-go, because the
stock `wg(8)` tool is the client that matters:

* errno values on the wire are negative: -EINVAL for any bad key or value (unknown keys, keys in
  the wrong section and protocol_version other than 1 included), -EPROTO for a line without
  ``=``, -EIO for device or I/O failures and for a line or request over the size limits (as
  Go's line scanner past 64 KiB; ours are 4 KiB a line, 16 MiB a request), -EBUSY for a
  set past 256 KiB that found no turn within the idle timeout (two such are read at once;
  wireguard-go has no such bound), -EADDRINUSE when the listen port is taken.
  wireguard-go answers -EADDRINUSE for any failure to bind or to set the fwmark; the device
  says what failed: -EIO for another bind failure, -EINVAL for a port the transport cannot
  have, the failure's own errno (-EPERM) for the fwmark.
* An unknown operation gets no transaction: the connection is closed (wireguard-go closes
  without a word; we first write ``errno=-EPROTO`` so that a reading client learns why - `wg`
  reports EPROTO either way).
* A set request is validated completely before the handler sees it, and the device checks
  what only it can before it changes anything, so a bad line leaves the configuration as it
  was (wireguard-go applies line by line and keeps the lines before the bad one). Like
  wireguard-go it is parsed line by line as it arrives, into a pending configuration of about
  the request's size or less, never held as text.
* A set the client ends with EOF instead of a blank line is applied, as by wireguard-go; one
  cut off by us (a client closed to make room, the daemon stopping) is not.
* One connection may carry many transactions, also after a failed set (wireguard-go's reads
  the rest of a failed request as operations and so hangs up). A client idle for 30 s is
  closed (wireguard-go never closes one); `wg` and Go's wgctrl connect once per transaction.
* More lenient: CRLF line ends, also on the operation line (wireguard-go hangs up on
  ``get=1\\r``). Endpoint forms are the transport's (conn/endpoint.py): a name is resolved
  (wireguard-go takes IP literals only), spaces around it are dropped, port 0 is refused.

What `wg` accepts in a get reply (wireguard-tools ipc-uapi.h) constrains the formatter: it
ignores unknown keys (so read-only extras are safe), but one unparsable endpoint, a listen_port
or persistent_keepalive_interval above 65535, or a negative errno makes the whole `wg show` fail.
Go's wgctrl also ignores unknown keys but fails on a line with more than one '=', so a '=' in
an extra's value is written ``\\x3d``.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..acceptwait import AcceptWait
from ..conn.unixsock import remove_stale, socket_dir
from ..threads import NamedThread

__all__ = [
    "ERR_INVALID",
    "ERR_IO",
    "ERR_PORT_IN_USE",
    "ERR_PROTOCOL",
    "ERR_UNKNOWN",
    "DeviceConfig",
    "DeviceStatus",
    "IPNetwork",
    "PeerConfig",
    "PeerStatus",
    "Prefixes",
    "SetParser",
    "SocketInUseError",
    "UAPIError",
    "UAPIHandler",
    "UAPIServer",
    "format_get",
    "format_set",
    "parse_get",
    "parse_set",
    "socket_path",
    "uapi_get",
    "uapi_set",
]

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = "/var/run/wireguard"

ERR_IO = -_errno.EIO  # -5
ERR_PROTOCOL = -_errno.EPROTO  # -71
ERR_INVALID = -_errno.EINVAL  # -22
ERR_PORT_IN_USE = -_errno.EADDRINUSE  # -98
ERR_UNKNOWN = -55  # wireguard-go's catch-all for errors that carry no code

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_KEY_LEN = 32
_ZERO_KEY = bytes(_KEY_LEN)
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
# Go's strconv.ParseUint(base 10) takes digits only: no sign, spaces or underscores.
_DECIMAL = re.compile(r"[0-9]{1,20}")
_EXTRA_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")

_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF

_DEVICE_KEYS = ("private_key", "listen_port", "fwmark")
_PEER_KEYS = (
    "public_key",
    "preshared_key",
    "protocol_version",
    "endpoint",
    "last_handshake_time_sec",
    "last_handshake_time_nsec",
    "tx_bytes",
    "rx_bytes",
    "persistent_keepalive_interval",
    "allowed_ip",
)
_PEER_INT_KEYS = frozenset(
    (
        "last_handshake_time_sec",
        "last_handshake_time_nsec",
        "tx_bytes",
        "rx_bytes",
        "persistent_keepalive_interval",
    )
)


class UAPIError(Exception):
    """A UAPI failure carrying the errno that goes on the wire.

    `.errno` is always negative, as wireguard-go writes it (``errno=-22``); a positive code
    given to the constructor is negated, so ``UAPIError(errno.EINVAL, ...)`` also works.
    """

    def __init__(self, code: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.errno = -abs(code)
        self.message = message
        # The failure's own words, where the message puts what was being done in front (a
        # caller that says that its own way): compiled, `raise ... from e` keeps no __cause__.
        self.reason = reason or message

    def __str__(self) -> str:
        name = _errno.errorcode.get(-self.errno, "?")
        return f"{self.message} (errno {self.errno}, {name})"


class SocketInUseError(OSError):
    """Another live process already serves the UAPI socket of this interface."""


# ---------------------------------------------------------------------------------------------
# Set side


class Prefixes:
    """A peer's allowed_ip lines, in order, as (network, add) pairs, held packed: a set
    request may carry hundreds of thousands, and as ipaddress objects each took some 400
    bytes where its line took 25 (a 15 MiB request made the daemon's peak 460 MiB higher).
    A network object is made only when the pair is read. Compares equal to a list of the
    same pairs."""

    __slots__ = ("_count", "_data")

    # One record: a byte (bit 1: IPv6, bit 0: add), the prefix length, the masked address.
    _V6, _ADD = 2, 1

    def __init__(self, items: Iterable[tuple[IPNetwork, bool]] = ()) -> None:
        self._data: bytes | bytearray = b""  # shared until the first append: a peer with none
        self._count = 0
        for item in items:
            self.append(item)

    def append(self, item: tuple[IPNetwork, bool]) -> None:
        net, add = item
        self._put(net.version, net.prefixlen, int(net.network_address), add)

    def _put(self, version: int, bits: int, masked: int, add: bool) -> None:
        data = self._data
        if not isinstance(data, bytearray):
            data = self._data = bytearray()
        v6 = version == 6
        data.append((self._V6 if v6 else 0) | (self._ADD if add else 0))
        data.append(bits)
        data += masked.to_bytes(16 if v6 else 4, "big")
        self._count += 1

    def clear(self) -> None:
        self._data = b""
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[IPNetwork, bool]]:
        data, i = self._data, 0
        while i < len(data):
            flags, bits = data[i], data[i + 1]
            n = 16 if flags & self._V6 else 4
            addr = int.from_bytes(data[i + 2 : i + 2 + n], "big")
            net = (ipaddress.IPv6Network if n == 16 else ipaddress.IPv4Network)((addr, bits))
            yield net, bool(flags & self._ADD)
            i += 2 + n

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Prefixes | list | tuple):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Prefixes({list(self)!r})"


@dataclass(slots=True)
class PeerConfig:
    public_key: bytes
    remove: bool = False
    update_only: bool = False
    # None: unchanged. 32 zero bytes: clear the preshared key. Left out of the repr, as every
    # secret key here is: a repr is what a traceback's locals, a debugger or a `%r` shows.
    preshared_key: bytes | None = field(default=None, repr=False)
    # Raw text; only the device's transport knows which endpoint forms are valid.
    endpoint: str | None = None
    persistent_keepalive: int | None = None
    replace_allowed_ips: bool = False
    # In order of appearance; add=False means remove this exact prefix (``allowed_ip=-P``).
    # parse_set gives a Prefixes; a list of pairs does as well.
    allowed_ips: Prefixes | list[tuple[IPNetwork, bool]] = field(default_factory=Prefixes)


@dataclass(slots=True)
class DeviceConfig:
    # None: unchanged. 32 zero bytes: remove the private key.
    private_key: bytes | None = field(default=None, repr=False)
    # The full u32 range is accepted so the vsock transport can use 32-bit ports; the device
    # refuses what its transport cannot bind.
    listen_port: int | None = None
    fwmark: int | None = None
    replace_peers: bool = False
    peers: list[PeerConfig] = field(default_factory=list)


# A whole key as wg(8) (base64) or UAPI (hex) writes it.
_WHOLE_KEY = re.compile(r"[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=|[0-9a-fA-F]{64}")


def _shown(value: str) -> str:
    """VALUE as a message quotes it. These messages reach the log, and a value that does not fit
    its field may be a key meant for another (a private key for the peer's public one): one as
    long as a key (44 characters in base64) is not quoted. Every valid value is shorter."""
    return repr(value) if len(value) < 40 else f"({len(value)} characters)"


def _parse_key(key: str, value: str) -> bytes:
    if not _HEX_KEY.fullmatch(value):
        # Secrets are never echoed, not even in part.
        shown = f"({len(value)} characters)" if key != "public_key" else _shown(value)
        raise UAPIError(ERR_INVALID, f"invalid {key} {shown}: expected 64 hex digits")
    return bytes.fromhex(value)


def _parse_uint(key: str, value: str, limit: int) -> int:
    if not _DECIMAL.fullmatch(value) or int(value) > limit:
        raise UAPIError(ERR_INVALID,
                        f"invalid {key} {_shown(value)}: expected an integer 0..{limit}")
    return int(value)


def _parse_true(key: str, value: str) -> bool:
    # wireguard-go accepts only "true"; "false" is an error, not a no-op.
    if value != "true":
        raise UAPIError(ERR_INVALID,
                        f"invalid {key} {_shown(value)}: the only valid value is 'true'")
    return True


def _parse_prefix(value: str) -> tuple[int, int, int]:
    """Parse ADDR/BITS as Go's netip.ParsePrefix does (host bits allowed, then masked):
    (IP version, BITS, the address masked to BITS as an integer)."""
    addr_text, slash, bits_text = value.partition("/")
    # Go takes no leading zero ("/024") and no sign.
    if not slash or not re.fullmatch(r"0|[1-9][0-9]{0,2}", bits_text):
        raise UAPIError(ERR_INVALID, f"invalid allowed_ip {_shown(value)}: expected ADDRESS/BITS")
    try:
        if "%" in addr_text:  # Python takes IPv6 zones; a prefix cannot have one
            raise ValueError(addr_text)
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        raise UAPIError(ERR_INVALID, f"invalid allowed_ip {_shown(value)}: bad address") from None
    bits = int(bits_text)
    if bits > addr.max_prefixlen:
        raise UAPIError(ERR_INVALID, f"invalid allowed_ip {_shown(value)}: prefix length too long")
    width = addr.max_prefixlen
    return addr.version, bits, int(addr) >> (width - bits) << (width - bits)


def _split_line(line: str) -> tuple[str, str]:
    key, eq, value = line.partition("=")
    if not eq:
        # Never the line itself: `private_key <hex>` is a typo away from a valid line.
        raise UAPIError(ERR_PROTOCOL, f"failed to parse a line starting {_lead(line)}: no '='")
    return key, value


def _lead(line: str) -> str:
    """What may be quoted of a line that did not parse: its leading key-like word."""
    m = re.match(r"[a-z_]{1,32}", line)
    return repr(m.group()) if m else "with something else"


def _request_lines(text: str) -> list[str]:
    lines = text.split("\n")
    # A request may be given with or without its operation line and terminating blank line.
    if lines and lines[0].rstrip("\r") == "set=1":
        lines = lines[1:]
    while lines and lines[-1].rstrip("\r") == "":
        lines.pop()
    out = []
    for raw in lines:
        line = raw.removesuffix("\r")  # as Go's bufio.ScanLines does
        if line == "":
            raise UAPIError(ERR_PROTOCOL, "blank line inside a set request")
        out.append(line)
    return out


class SetParser:
    """Takes a set request's lines (after ``set=1``) one at a time into `cfg`, so that a
    request is never held as text: the server feeds it each line as it arrives.

    Raises UAPIError with the errno wireguard-go would reply for the first bad line; `cfg`
    is then incomplete and must be dropped.
    """

    __slots__ = ("_peer", "_prefixes", "cfg")

    def __init__(self) -> None:
        self.cfg = DeviceConfig()
        self._peer: PeerConfig | None = None
        self._prefixes = Prefixes()  # the peer's allowed_ips, as the type it is made with

    def line(self, line: str) -> None:
        key, value = _split_line(line)
        cfg, peer = self.cfg, self._peer
        if key == "public_key":
            self._prefixes = Prefixes()
            peer = self._peer = PeerConfig(public_key=_parse_key(key, value),
                                           allowed_ips=self._prefixes)
            cfg.peers.append(peer)
        elif peer is None:
            if key == "private_key":
                cfg.private_key = _parse_key(key, value)
            elif key == "listen_port":
                cfg.listen_port = _parse_uint(key, value, _U32)
            elif key == "fwmark":
                cfg.fwmark = _parse_uint(key, value, _U32)
            elif key == "replace_peers":
                cfg.replace_peers = _parse_true(key, value)
            else:
                raise UAPIError(ERR_INVALID, f"invalid UAPI device key starting {_lead(key)}")
        elif key == "remove":
            peer.remove = _parse_true(key, value)
        elif key == "update_only":
            peer.update_only = _parse_true(key, value)
        elif key == "preshared_key":
            peer.preshared_key = _parse_key(key, value)
        elif key == "endpoint":
            if not value:
                raise UAPIError(ERR_INVALID, "invalid endpoint '': empty")
            if ":" not in value:
                # Every endpoint has one (HOST:PORT, [ADDR]:PORT, unix:/PATH). A value without
                # is none, and may be a key put in the wrong field: the transport's message
                # would quote it whole.
                raise UAPIError(ERR_INVALID,
                                f"invalid endpoint {_shown(value)}: expected HOST:PORT")
            if not value.startswith("unix:") and _WHOLE_KEY.search(value):
                # A key with a port after it has the colon, and reached the transport, whose
                # message quoted it whole. No host name, address or CID holds a key's text.
                raise UAPIError(ERR_INVALID, f"invalid endpoint ({len(value)} characters, not "
                                "shown: it holds what looks like a key): expected HOST:PORT")
            if "\r" in value or "\0" in value:
                # No endpoint has them, and format_set could not write this one back.
                raise UAPIError(ERR_INVALID, f"invalid endpoint {value!r}: control character")
            peer.endpoint = value
        elif key == "persistent_keepalive_interval":
            peer.persistent_keepalive = _parse_uint(key, value, _U16)
        elif key == "replace_allowed_ips":
            peer.replace_allowed_ips = _parse_true(key, value)
            # Lines apply in order (wireguard-go): what came before the replacement goes too.
            peer.allowed_ips.clear()
        elif key == "allowed_ip":
            add = not value.startswith("-")
            self._prefixes._put(*_parse_prefix(value if add else value[1:]), add)
        elif key == "protocol_version":
            if value != "1":
                raise UAPIError(ERR_INVALID,
                                f"invalid protocol_version {_shown(value)}: only 1 exists")
        else:
            raise UAPIError(ERR_INVALID, f"invalid UAPI peer key starting {_lead(key)}")


def parse_set(text: str) -> DeviceConfig:
    """Validate a set request body (the lines after ``set=1``) into a DeviceConfig.

    Raises UAPIError with the errno wireguard-go would reply for the first bad line.
    """
    parser = SetParser()
    for line in _request_lines(text):
        parser.line(line)
    return parser.cfg


def format_set(cfg: DeviceConfig) -> str:
    """The body of a set request (without ``set=1`` and the blank line) for `cfg`."""
    lines: list[str] = []
    if cfg.private_key is not None:
        lines.append(f"private_key={cfg.private_key.hex()}")
    if cfg.listen_port is not None:
        lines.append(f"listen_port={cfg.listen_port}")
    if cfg.fwmark is not None:
        lines.append(f"fwmark={cfg.fwmark}")
    if cfg.replace_peers:
        lines.append("replace_peers=true")
    for p in cfg.peers:
        lines.append(f"public_key={p.public_key.hex()}")
        if p.remove:
            lines.append("remove=true")
        if p.update_only:
            lines.append("update_only=true")
        if p.preshared_key is not None:
            lines.append(f"preshared_key={p.preshared_key.hex()}")
        if p.endpoint is not None:
            _check_value("endpoint", p.endpoint)
            lines.append(f"endpoint={p.endpoint}")
        if p.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={p.persistent_keepalive}")
        if p.replace_allowed_ips:
            lines.append("replace_allowed_ips=true")
        for net, add in p.allowed_ips:
            lines.append(f"allowed_ip={'' if add else '-'}{net}")
    return "".join(line + "\n" for line in lines)


# ---------------------------------------------------------------------------------------------
# Get side


@dataclass
class PeerStatus:
    public_key: bytes
    preshared_key: bytes | None = field(default=None, repr=False)
    # Already formatted for `wg`; None leaves the line out (wg fails on endpoints it can't parse).
    endpoint: str | None = None
    last_handshake_time_sec: int = 0
    last_handshake_time_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive_interval: int = 0
    allowed_ips: list[str] = field(default_factory=list)
    # Read-only wgvsock keys (lower-case identifiers); `wg` ignores them.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class DeviceStatus:
    private_key: bytes | None = field(default=None, repr=False)
    # Ports above 65535 (vsock) are left out of the reply, since `wg` rejects the whole
    # reply for them; the device can report such a port in `extra`.
    listen_port: int = 0
    fwmark: int = 0
    peers: list[PeerStatus] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


# How an extra's value shows a '=' (and so a backslash, which would make that ambiguous).
_EXTRA_ESCAPES: dict[str, str] = {"\\": "\\x5c", "=": "\\x3d"}
_TO_ESCAPE = re.compile(r"[\\=]")
_EXTRA_ESCAPED = re.compile(r"\\x(?:5c|3d)")


def _unescape_extra(value: str) -> str:
    return _EXTRA_ESCAPED.sub(lambda m: "\\" if m[0] == "\\x5c" else "=", value)


def _check_value(key: str, value: str) -> None:
    if "\n" in value or "\r" in value or "\0" in value:
        raise ValueError(f"UAPI value for {key!r} must be a single line: {value!r}")


def _extra_lines(extra: dict[str, str], reserved: tuple[str, ...]) -> list[str]:
    lines = []
    for k, v in extra.items():
        if not _EXTRA_KEY.fullmatch(k) or k in reserved or k in ("errno", "public_key"):
            raise ValueError(f"invalid extra UAPI key {k!r}")
        _check_value(k, v)
        # Values may come from outside (a DNS name the enclave asked for, a socket path), and
        # wgctrl refuses the whole reply for a line with a second '='.
        lines.append(f"{k}={_TO_ESCAPE.sub(lambda m: _EXTRA_ESCAPES[m[0]], v)}")
    return lines


def format_get(status: DeviceStatus) -> str:
    """The complete reply to ``get=1``, in wireguard-go's key order, ending ``errno=0``."""
    lines: list[str] = []
    if status.private_key is not None and status.private_key != _ZERO_KEY:
        lines.append(f"private_key={status.private_key.hex()}")
    if 0 < status.listen_port <= _U16:
        lines.append(f"listen_port={status.listen_port}")
    if status.fwmark:
        lines.append(f"fwmark={status.fwmark}")
    lines += _extra_lines(status.extra, _DEVICE_KEYS)
    for p in status.peers:
        lines.append(f"public_key={p.public_key.hex()}")
        lines.append(f"preshared_key={(p.preshared_key or _ZERO_KEY).hex()}")
        lines.append("protocol_version=1")
        if p.endpoint is not None:
            _check_value("endpoint", p.endpoint)
            lines.append(f"endpoint={p.endpoint}")
        lines.append(f"last_handshake_time_sec={p.last_handshake_time_sec}")
        lines.append(f"last_handshake_time_nsec={p.last_handshake_time_nsec}")
        lines.append(f"tx_bytes={p.tx_bytes}")
        lines.append(f"rx_bytes={p.rx_bytes}")
        lines.append(f"persistent_keepalive_interval={p.persistent_keepalive_interval}")
        for ip in p.allowed_ips:
            _check_value("allowed_ip", str(ip))
            lines.append(f"allowed_ip={ip}")
        lines += _extra_lines(p.extra, _PEER_KEYS)
    lines.append("errno=0")
    return "".join(line + "\n" for line in lines) + "\n"


def _int(key: str, value: str) -> int:
    if not re.fullmatch(r"-?[0-9]{1,20}", value):
        raise UAPIError(ERR_PROTOCOL, f"bad {key} in get reply: {value!r}")
    return int(value)


def parse_get(text: str) -> dict[str, Any]:
    """Parse a get reply into the shape of DeviceStatus as a dict.

    ``{"private_key": bytes|None, "listen_port": int, "fwmark": int, "peers": [...],
    "extra": {...}}``, each peer with the PeerStatus fields (zero preshared key -> None).
    Unknown keys go to the device's or the current peer's ``extra``. Raises UAPIError if
    the reply carries a nonzero errno or is malformed.
    """
    dev: dict[str, Any] = {
        "private_key": None,
        "listen_port": 0,
        "fwmark": 0,
        "peers": [],
        "extra": {},
    }
    peer: dict[str, Any] | None = None
    err: int | None = None
    for line in text.split("\n"):
        if line == "":
            if err is not None:
                break
            continue
        key, value = _split_line(line)
        if key == "errno":
            err = _int(key, value)
        elif key == "public_key":
            peer = {
                "public_key": _parse_key(key, value),
                "preshared_key": None,
                "endpoint": None,
                "last_handshake_time_sec": 0,
                "last_handshake_time_nsec": 0,
                "rx_bytes": 0,
                "tx_bytes": 0,
                "persistent_keepalive_interval": 0,
                "allowed_ips": [],
                "extra": {},
            }
            dev["peers"].append(peer)
        elif peer is None:
            if key == "private_key":
                dev["private_key"] = _parse_key(key, value)
            elif key in ("listen_port", "fwmark"):
                dev[key] = _int(key, value)
            else:
                dev["extra"][key] = _unescape_extra(value)
        elif key == "preshared_key":
            psk = _parse_key(key, value)
            peer[key] = None if psk == _ZERO_KEY else psk
        elif key == "endpoint":
            peer[key] = value
        elif key == "protocol_version":
            pass
        elif key == "allowed_ip":
            peer["allowed_ips"].append(value)
        elif key in _PEER_INT_KEYS:
            peer[key] = _int(key, value)
        else:
            peer["extra"][key] = _unescape_extra(value)
    if err is None:
        raise UAPIError(ERR_PROTOCOL, "get reply has no errno line")
    if err != 0:
        raise UAPIError(err, "get failed")
    return dev


# ---------------------------------------------------------------------------------------------
# Client


def socket_path(ifname: str, run_dir: str = DEFAULT_RUN_DIR) -> str:
    return os.path.join(run_dir, f"{ifname}.sock")


_LAST_LINE = re.compile(rb"errno=-?[0-9]+")  # (parse_get judges the value)


def _complete(buf: bytearray) -> bool:
    """Whether `buf` is a whole reply: it ends with the line "errno=N" and an empty line.
    Only the last line is looked at, so a reply that arrives in many pieces costs no more
    than one that arrives at once."""
    if not buf.endswith(b"\n\n"):
        return False
    start = buf.rfind(b"\n", 0, len(buf) - 2) + 1
    return _LAST_LINE.fullmatch(buf, start, len(buf) - 2) is not None


def _transact(path: str, request: bytes, timeout: float, limit: int = 64 << 20) -> str:
    """One request and its reply. `timeout` bounds the whole exchange, not each read: a
    daemon that answers a byte at a time cannot hold the caller for longer."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(request)
        buf = bytearray()
        # Every reply ends with "errno=N\n\n"; stop there rather than waiting for EOF,
        # because the server keeps the connection open for more transactions.
        while not _complete(buf):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no whole reply within {timeout:g} s")
            s.settimeout(left)
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if len(buf) > limit:
                raise UAPIError(ERR_PROTOCOL, f"UAPI reply larger than {limit >> 20} MiB")
    return buf.decode("utf-8", "replace")


def uapi_get(path: str, timeout: float = 2.0, limit: int = 64 << 20) -> dict[str, Any]:
    """Ask the daemon at `path` for its state; see parse_get for the result's shape."""
    return parse_get(_transact(path, b"get=1\n\n", timeout, limit))


def uapi_set(path: str, text: str, timeout: float = 2.0) -> int:
    """Send a set request body (as format_set makes it) and return the reply's errno (0 = ok)."""
    body = "".join(line + "\n" for line in _request_lines(text))
    reply = _transact(path, f"set=1\n{body}\n".encode(), timeout)
    m = re.search(r"(?:^|\n)errno=(-?[0-9]+)\n", reply)
    if not m:
        raise UAPIError(ERR_PROTOCOL, f"malformed set reply {reply!r}")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Server


class UAPIHandler(Protocol):
    """Called from several threads at once: an implementation serialises itself."""

    def uapi_get(self) -> DeviceStatus: ...

    def uapi_set(self, cfg: DeviceConfig) -> None: ...


class _RequestTooLarge(Exception):
    """A request refused for its size: -EIO, as wireguard-go answers a line past its
    scanner's limit, unless another code is given."""

    def __init__(self, message: str, code: int = ERR_IO) -> None:
        super().__init__(message)
        self.errno = code


_BLANK_LINE = re.compile(rb"\n\r?\n")  # a request's end (CRLF tolerated, as by readline)


class _RequestOverBudget(_RequestTooLarge):
    """Well-formed lines, too many of them: the request's end can still be found."""


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


class _Turns:
    """Turns that requests past their own allowance (`own` bytes) take: at most `count` at
    once. What a set holds pending is proportional to its bytes (SetParser: at most about
    three times), so what N clients make the daemon hold is bounded by count * max_request
    and N * own, not N * max_request. A request that needs a turn waits for one, and its
    client's writes wait with it: concurrent large sets go one after another, where refusing
    whoever found a shared budget spent refused them all when they came together."""

    def __init__(self, count: int, own: int, wait: float) -> None:
        self.count = count
        self.own = own
        self.wait = wait
        self._free = threading.BoundedSemaphore(count)

    def take(self, abandoned: Callable[[], bool]) -> bool:
        """Whether a turn was had within `wait` seconds; ConnectionAbortedError once
        `abandoned` (the client closed to make room, the server stopping)."""
        deadline = time.monotonic() + self.wait
        while not abandoned():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # In steps: nothing wakes a waiter when its client is closed.
            if self._free.acquire(timeout=min(left, 0.25)):
                return True
        raise ConnectionAbortedError("closed while waiting for a turn")

    def give(self) -> None:
        self._free.release()


class _LineReader:
    """Reads '\\n'-terminated lines from a socket with a per-line and per-request byte cap,
    and a share of a budget all connections draw on."""

    def __init__(
        self,
        sock: socket.socket,
        max_line: int,
        max_request: int,
        turns: _Turns,
        abandoned: Callable[[], bool],
    ) -> None:
        self._sock = sock
        self._buf = bytearray()
        self._max_line = max_line
        self._max_request = max_request
        self._turns = turns
        self._abandoned = abandoned
        self._used = 0  # bytes of the current request so far
        self._turn = False  # whether the current request holds a turn

    def start_request(self) -> None:
        self._used = 0

    def end_request(self) -> None:
        """Gives back the request's turn: once it is answered, what it held (the pending
        configuration) is gone."""
        if self._turn:
            self._turns.give()
            self._turn = False

    def readline(self) -> str | None:
        """The next line without its terminator, or None at EOF (a partial last line is
        returned as a line, like Go's bufio.Scanner)."""
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                raw = bytes(self._buf[:nl])
                del self._buf[: nl + 1]
                self._charge(nl + 1)
                return raw.removesuffix(b"\r").decode("utf-8", "replace")
            if len(self._buf) > self._max_line:
                raise _RequestTooLarge(f"line longer than {self._max_line} bytes")
            chunk = self._sock.recv(65536)
            if not chunk:
                if not self._buf:
                    return None
                raw = bytes(self._buf)
                self._buf.clear()
                self._charge(len(raw))
                return raw.removesuffix(b"\r").decode("utf-8", "replace")
            self._buf += chunk

    def _charge(self, n: int) -> None:
        if n > self._max_line + 1:
            raise _RequestTooLarge(f"line longer than {self._max_line} bytes")
        self._used += n
        if self._used > self._max_request:
            raise _RequestOverBudget(
                f"set request larger than {_size(self._max_request)}, the most one may be; "
                "refused whole (EIO)"
            )
        if self._used > self._turns.own and not self._turn:
            if not self._turns.take(self._abandoned):
                t = self._turns
                raise _RequestOverBudget(
                    f"a set request past {_size(t.own)} waited {t.wait:g} s for one of the "
                    f"{t.count} turns such requests take at once; refused whole (EBUSY): send "
                    "it again once the others are done",
                    -_errno.EBUSY,
                )
            self._turn = True

    def skip_request(self) -> None:
        """Reads and drops the rest of the request, to its blank line or EOF: a client that
        writes all of it before reading (wg(8)) would otherwise die of SIGPIPE with no word,
        where it can be told why."""
        prev = b"\n"  # the last line read ended here
        chunk = bytes(self._buf)
        self._buf.clear()
        while True:
            seen = prev + chunk
            if blank := _BLANK_LINE.search(seen):
                self._buf += seen[blank.end():]
                return
            prev = seen[-2:]  # a blank CRLF line may straddle two reads
            chunk = self._sock.recv(65536)
            if not chunk:
                return


def listening_path(fd: int) -> str:
    """The path of FD, a listening unix stream socket made by the process that started us
    (WG_UAPI_FD, as wireguard-go takes one): '' when it has none, unnamed or abstract. Raises
    ValueError saying what FD is instead, in words that follow "FD"."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        why = {_errno.EBADF: "is not an open file descriptor",
               _errno.ENOTSOCK: "is not a socket"}.get(e.errno or 0, f"is unusable: {e}")
        raise ValueError(why) from e
    try:
        if sock.family != socket.AF_UNIX:
            why = f"is an {getattr(sock.family, 'name', sock.family)} socket, not a unix one"
        elif sock.type != socket.SOCK_STREAM:
            kind = {socket.SOCK_DGRAM: "a datagram", socket.SOCK_SEQPACKET: "a seqpacket"}
            why = f"is {kind.get(sock.type, 'another kind of')} socket, not a stream one"
        elif not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            why = "is a unix stream socket that is not listening: call listen() on it first"
        else:
            name = sock.getsockname()
            return name if isinstance(name, str) else ""
    finally:
        sock.detach()
    raise ValueError(why)


class UAPIServer:
    """Serves the UAPI socket ``<run_dir>/<ifname>.sock`` for one interface, or the listening
    socket FD that the process which started us made (listening_path), where that one is.

    An accept thread plus one thread per client. The handler is called from the clients'
    threads at once and serialises its transactions itself (Device does, as wireguard-go's
    ipcMutex), so that work it can do before taking its lock (resolving a name) holds no other
    client up, and in-process callers queue with the clients. The server starts serving when
    constructed.
    """

    def __init__(
        self,
        ifname: str,
        handler: UAPIHandler,
        run_dir: str = DEFAULT_RUN_DIR,
        *,
        max_request: int = 16 << 20,
        max_line: int = 4096,
        idle_timeout: float = 30.0,
        max_clients: int = 32,
        max_large: int = 2,
        fd: int = -1,
    ) -> None:
        if not ifname or "/" in ifname or "\0" in ifname or ifname in (".", ".."):
            raise ValueError(f"invalid interface name {ifname!r}")
        self.ifname = ifname
        self.path = socket_path(ifname, run_dir) if fd < 0 else listening_path(fd)
        if fd < 0 and len(os.fsencode(self.path)) >= 108:
            raise ValueError(f"UAPI socket path too long for AF_UNIX: {self.path}")
        self._handler = handler
        self._max_request = max_request
        self._max_line = max_line
        self._idle_timeout = idle_timeout
        self._max_clients = max_clients
        # A `wg set`, and a `wg setconf` of up to some 800 peers, never waits for a turn.
        self._turns = _Turns(max_large, min(256 << 10, max_request), idle_timeout)
        self._state_lock = threading.Lock()
        # Each client: whether it is amid a transaction, and since when (monotonic).
        self._clients: dict[socket.socket, tuple[bool, float]] = {}
        # Clients whose answer to a get is being sent; and those of them closed to make room,
        # which still get the rest of their answer.
        self._sending: set[socket.socket] = set()
        self._leaving: set[socket.socket] = set()
        self._closed = False
        self._stop = threading.Event()

        # The file we made, to remove at close (and, like one handed to us, to stop when it is
        # removed or replaced).
        self._owned = fd < 0
        self._identity: tuple[int, int] | None = None
        if fd < 0:
            self._sock = self._bind(run_dir)
            self._sock.listen(16)
        else:
            self._sock = socket.socket(fileno=fd)
            self._sock.set_inheritable(False)
            self._sock.setblocking(True)  # (the launcher's may be non-blocking)
        self._waiting = AcceptWait(self._sock)
        with contextlib.suppress(OSError):  # a handed-over socket's file may be gone
            st = os.stat(self.path) if self.path else None
            if st is not None:
                self._identity = (st.st_dev, st.st_ino)
        self._accept_thread = NamedThread(
            target=self._accept_loop, name=f"uapi-{ifname}", daemon=True
        )
        self._waiting.begin()
        try:
            self._accept_thread.start()
        except BaseException:  # no thread to be had: nothing is left open
            self._waiting.ended()
            self._waiting.close()
            raise

    # -- setup ----------------------------------------------------------------------------

    def _bind(self, run_dir: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # umask is process-wide, but this keeps the socket from ever existing with wider
        # permissions than 0600 (chmod after bind would leave a window).
        old_umask = os.umask(0o077)
        try:
            # Shared with wireguard-go and wg(8): 0755 as wireguard-go makes it passes.
            socket_dir(run_dir, listable=True)
            os.umask(0o177)
            try:
                sock.bind(self.path)
            except OSError as e:
                if e.errno != _errno.EADDRINUSE:
                    raise
                self._remove_stale()
                sock.bind(self.path)
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        return sock

    def _remove_stale(self) -> None:
        """Remove a socket file left by a dead daemon; refuse if someone still answers."""
        if not remove_stale(self.path):
            raise SocketInUseError(
                _errno.EADDRINUSE,
                f"another daemon already serves interface {self.ifname!r}",
                self.path,
            )
        log.info("removed stale UAPI socket %s", self.path)

    # -- serving --------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        try:
            self._accept_until_stopped()
        finally:
            self._waiting.ended()

    def _accept_until_stopped(self) -> None:
        while not self._stop.is_set():
            try:
                if not self._waiting.wait():
                    continue  # woken: the loop's test ends it
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("UAPI accept failed on %s", self.path)
                self._stop.wait(0.1)
                continue
            with self._state_lock:
                if self._closed:
                    conn.close()
                    continue
                if len(self._clients) >= self._max_clients:
                    # The client that has waited longest for its next request makes room (one
                    # amid a transaction only if all are): a tool that leaks connections must
                    # not lock wg(8) out, as refusing the newcomer did.
                    idle = min(self._clients, key=self._clients.__getitem__)
                    del self._clients[idle]
                    how = socket.SHUT_RDWR  # its thread closes it
                    if idle in self._sending and len(self._leaving) < self._max_clients:
                        # Its answer was being sent: cut off, `wg show` failed. Its thread
                        # sends the rest (within the idle timeout), then finds it closed.
                        self._leaving.add(idle)
                        how = socket.SHUT_RD
                    with contextlib.suppress(OSError):
                        idle.shutdown(how)
                    log.warning("UAPI %s: %d clients; closed the one idle longest",
                                self.ifname, self._max_clients)
                self._clients[conn] = (False, time.monotonic())
            try:
                NamedThread(
                    target=self._serve_client, args=(conn,), name=f"uapi-{self.ifname}-c",
                    daemon=True,
                ).start()
            except RuntimeError as e:  # out of threads: refuse this client, keep accepting
                with self._state_lock:
                    self._clients.pop(conn, None)
                conn.close()
                log.warning("UAPI %s: cannot serve a client: %s", self.ifname, e)

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(self._idle_timeout)
            reader = _LineReader(
                conn,
                self._max_line,
                self._max_request,
                self._turns,
                lambda: self._stop.is_set() or not self._served(conn),
            )
            # Not served any more once closed to make room (its answer may still have been
            # going out): a request it sent before must not be taken.
            while not self._stop.is_set() and self._served(conn):
                reader.start_request()
                try:
                    if not self._transaction(conn, reader):
                        return
                except _RequestTooLarge as e:
                    # Answered as wireguard-go does for an oversized line (-EIO), then hung
                    # up: after a line too long the next request cannot be found.
                    log.warning("UAPI %s: %s", self.ifname, e)
                    if isinstance(e, _RequestOverBudget):
                        reader.skip_request()
                    self._reply(conn, e.errno)
                    return
                finally:
                    reader.end_request()
        except (TimeoutError, ConnectionError, BrokenPipeError):
            pass
        except OSError as e:
            if not self._stop.is_set():
                log.debug("UAPI %s client error: %s", self.ifname, e)
        except Exception:
            log.exception("UAPI %s: unexpected error serving a client", self.ifname)
        finally:
            with self._state_lock:
                self._clients.pop(conn, None)
                self._sending.discard(conn)
                self._leaving.discard(conn)
            conn.close()

    def _served(self, conn: socket.socket) -> bool:
        """Whether CONN is still a client of ours (not closed by us to make room, nor by
        close())."""
        with self._state_lock:
            return conn in self._clients and not self._closed

    def _mark(self, conn: socket.socket, *, busy: bool, sending: bool = False) -> None:
        with self._state_lock:
            if conn in self._clients:
                self._clients[conn] = (busy, time.monotonic())
            if sending:
                self._sending.add(conn)
            else:
                self._sending.discard(conn)

    def _sent(self, conn: socket.socket) -> None:
        """CONN's answer is out. Its idle time still counts from before the answer (as the
        client sees it): marked again, it made a client that got its answer first look idle
        for less time than one answered after it, and a newcomer closed the wrong one."""
        with self._state_lock:
            self._sending.discard(conn)

    def _transaction(self, conn: socket.socket, reader: _LineReader) -> bool:
        """Serve one transaction; False when the connection should be closed."""
        op = reader.readline()
        if op is None:
            return False
        self._mark(conn, busy=True)
        if op == "get=1":
            if reader.readline() != "":
                self._reply(conn, ERR_INVALID)
                return False
            try:
                text = format_get(self._handler.uapi_get())
            except UAPIError as e:
                log.warning("UAPI %s get: %s", self.ifname, e)
                self._reply(conn, e.errno)
            except Exception:
                log.exception("UAPI %s get failed", self.ifname)
                self._reply(conn, ERR_IO)
            else:
                self._mark(conn, busy=False, sending=True)  # before the answer: see _reply
                conn.sendall(text.encode())
                self._sent(conn)
            return True
        if op == "set=1":
            # Parsed as it arrives, so the request is never held as text; checked whole
            # before the handler sees any of it, so a request is applied whole or not at all.
            # After a bad line the rest is read to the request's end (and dropped).
            parser: SetParser | None = SetParser()
            result: DeviceConfig | UAPIError
            eof = False
            while True:
                line = reader.readline()
                if line is None:
                    eof = True  # wireguard-go applies what it got when the stream ends
                    break
                if line == "":
                    break
                if parser is not None:
                    try:
                        parser.line(line)
                    except UAPIError as e:
                        result, parser = e, None
            if parser is not None:
                result = parser.cfg
            if eof and not self._served(conn):
                # The end came from our side (the client was closed to make room, or the
                # daemon stops), not the client's: what it sent is part of a request still
                # being written, half a `wg setconf` perhaps, and applying it is no choice of
                # the client's.
                return False
            self._reply(conn, self._apply(result))
            return not eof
        # Only the key: a set body sent without `set=1` starts `private_key=<hex>`.
        log.warning("UAPI %s: invalid operation starting %s", self.ifname, _lead(op))
        self._reply(conn, ERR_PROTOCOL)
        return False

    def _apply(self, cfg: DeviceConfig | UAPIError) -> int:
        try:
            if isinstance(cfg, UAPIError):
                raise cfg
            self._handler.uapi_set(cfg)
        except UAPIError as e:
            log.warning("UAPI %s set: %s", self.ifname, e)
            return e.errno
        except Exception:
            log.exception("UAPI %s set failed", self.ifname)
            return ERR_IO
        return 0

    def _reply(self, conn: socket.socket, code: int) -> None:
        # Idle from before the answer goes: a client that has it may send nothing more, and a
        # newcomer that finds every place taken must find it the one idle longest.
        self._mark(conn, busy=False)
        with contextlib.suppress(OSError):
            conn.sendall(f"errno={code}\n\n".encode())

    # -- socket file watching ---------------------------------------------------------------

    def socket_removed(self) -> bool:
        """Whether the socket file was deleted or replaced by another file while we serve,
        which is how wireguard-go is told to shut down. The device asks on its timer thread's
        regular look at the interface, so no thread of its own wakes to poll the file."""
        if self._closed or self._identity is None:
            return False  # close() removed it, or it has no file to watch
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        except OSError:
            return False  # cannot tell now; asked again soon
        return (st.st_dev, st.st_ino) != self._identity

    # -- shutdown ---------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop serving, disconnect clients and remove the socket file if it is still ours
        (one handed to us is its maker's to remove)."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients)
        self._stop.set()
        # Only our own file is looked at: a handed-over socket's path may be where we cannot
        # look (EACCES, ENOTDIR), and an error here left the socket and clients open.
        if self._owned:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    os.unlink(self.path)
            except OSError:
                pass  # gone already (or unlookable): the socket and clients still close
        self._waiting.wake()
        # shutdown() wakes the client threads blocked in recv(); close() alone does not.
        for c in clients:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        # (Released by the thread as it ends if it outlasts the join, or if this is that thread.)
        self._waiting.join_and_close(self._accept_thread)

    def __enter__(self) -> UAPIServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
