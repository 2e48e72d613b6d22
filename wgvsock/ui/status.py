"""`wgvsock status`: a live dashboard of WireGuard interfaces, read from their UAPI sockets.

It speaks only the cross-platform UAPI (``get=1``), so it shows any userspace WireGuard: our
daemon, Debian's wireguard-go, wireguard-go-vsock. It never sends ``set``: read access to the
sockets is all it needs. Our daemon adds read-only keys that `wg` ignores and this reads:
``wgvsock_network`` / ``wgvsock_port`` (a vsock port may not fit in ``listen_port``),
``wgvsock_link`` (``down``: the interface is down, and with it every session),
``wgvsock_profile`` / ``wgvsock_role`` / ``wgvsock_attested`` (set by the roles), the parent's
packet counters ``wgvsock_egress_allowed`` / ``_denied`` / ``_blocked`` / ``_limited`` (shown
when not 0; older daemons leave it out; one its table lacks is left out and shown as "-"),
or ``wgvsock_egress_error`` when it could not read them, and, once it runs a DNS
forwarder, ``wgvsock_dns_queries`` / ``wgvsock_dns_refused``, what it refused lately
``wgvsock_refused_1`` (newest) ... ``_8`` ("KIND COUNT AGE WHAT[; RULE]"), whom its control
port refused lately ``wgvsock_control_refused_1`` (newest) ... ``_4`` ("KIND COUNT AGE WHO;
REASON", cleared when an enclave is admitted), why the enclave it starts itself is not
running ``wgvsock_enclave_down`` (only while it is not), how many connections its WireGuard
port refused at accept ``wgvsock_transport_refused`` (another CID than the enclave's), and
per peer ``wgvsock_endpoint`` (a readable endpoint), ``wgvsock_conn`` and
``wgvsock_reconnects`` (the stream transport's connection to that peer).

The layout is built line by line for the console's current width on every refresh (rather than
with a rich Table) so that each peer gets one aligned row of numbers plus a wrapped detail line,
which is what fits an 80-column terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import queue
import re
import select
import signal
import stat
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from types import FrameType
from typing import Any, TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

from ..argtypes import seconds
from ..conn.endpoint import Endpoint, display_endpoint, parse_endpoint
from ..core.crypto import key_to_base64, public_key
from ..core.messages import REJECT_AFTER_TIME, REKEY_AFTER_TIME
from ..device.uapi import DEFAULT_RUN_DIR, UAPIError, socket_path, uapi_get
from ..safetext import prose
from ..services.control import UAPI_ATTESTED

__all__ = [
    "HEALTH_STYLES",
    "Collector",
    "Dashboard",
    "InterfaceView",
    "PeerView",
    "Snapshot",
    "health",
    "human_age",
    "human_bytes",
    "human_rate",
    "main",
    "readable_endpoint",
    "refusal_words",
    "render_lines",
]

ENV_RUN_DIR = "WGVSOCK_RUN_DIR"  # the daemon's variable, so both agree on where sockets live
DEFAULT_INTERVAL = 1.0
MAX_INTERVAL = 86400.0
FETCH_TIMEOUT = 2.0
MAX_TIMEOUT = 3600.0
# The largest `get` reply read (a daemon with tens of thousands of peers stays under it): the
# dashboard must not take a misbehaving socket's gigabytes into memory.
REPLY_LIMIT = 16 << 20
# Allowed IPs shown per peer; the rest are counted. (--json has them all.)
ALLOWED_IPS_SHOWN = 8

# Health follows the protocol's own clocks: a session is rekeyed after REKEY_AFTER_TIME and its
# keys are useless after REJECT_AFTER_TIME, so a handshake older than that means no live session.
HEALTH_STYLES = {"fresh": "green", "rekey": "yellow", "stale": "red", "never": "dim",
                 "future": "bold yellow"}
# A handshake dated this far after now is not our and the daemon's readings differing (our
# daemon renews its wall-clock offset past 1 s) but a clock stepped back, or a daemon's ahead.
FUTURE_SLACK = 2.0
CONN_STYLES = {"connected": "green", "stalled": "red", "dialing": "yellow", "backoff": "red",
               "none": "dim"}
# wgvsock_conn's words as the dashboard shows them; a bare "none" among the peer's details
# said nothing of what there is none of, "backoff" was jargon for waiting to try again after
# connects failed (or a connection that died young), and "stalled" did not say whose fault.
# (--json keeps the daemon's word.)
_CONN_SHOWN = {"none": "not connected", "backoff": "connection failed, retrying",
               "stalled": "stalled: the peer stopped reading"}

EMPTY_HINT = (
    "start one with `wgvsock parent up --profile FILE` or `wireguard-go-vsock wg0`, "
    "or name an interface: `wgvsock status wg0`"
)

_IPV4_ENDPOINT = re.compile(r"(\d{1,3}(?:\.\d{1,3}){3}):(\d{1,10})")
_VSOCK_ENDPOINT = re.compile(r"vsock://(\d{1,10}):(\d{1,10})")
_COUNT = re.compile(r"[0-9]{1,20}")  # ASCII digits only: str.isdigit takes "²" as well


# ---------------------------------------------------------------------------------------------
# Formatting


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def human_bytes(n: float) -> str:
    """Binary units with three significant digits, at most 8 characters: ``1.23 MiB``."""
    if n < 1024:
        return f"{int(n)} B"
    value = float(n)
    unit = 0
    # 1023.7 KiB would print as "1024 KiB"; carry it into the next unit instead.
    while value >= 1023.5 and unit < len(_UNITS) - 1:
        value /= 1024
        unit += 1
    # Decide the decimals on the rounded value, so 9.999 becomes "10.0", not "10.00".
    if round(value, 2) < 10:
        num = f"{value:.2f}"
    elif round(value, 1) < 100:
        num = f"{value:.1f}"
    else:
        num = f"{value:.0f}"
    return f"{num} {_UNITS[unit]}"


def human_rate(bytes_per_second: float | None) -> str:
    """Bytes (not bits) per second, as the byte totals beside it; ``-`` until two samples."""
    if bytes_per_second is None:
        return "-"
    return human_bytes(max(0.0, bytes_per_second)) + "/s"


def human_age(seconds: float | None) -> str:
    """``12 s ago``, ``3 min ago``, ``5 h ago``, ``2 d ago``; ``never`` for no handshake;
    ``in future`` past FUTURE_SLACK before now (it fits the handshake column)."""
    if seconds is None:
        return "never"
    if seconds < -FUTURE_SLACK:
        return "in future"
    return _span(max(0, int(seconds))) + " ago"


def _span(s: int) -> str:
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def health(age: float | None) -> str:
    """``fresh`` (< 120 s), ``rekey`` (due for rekey, 120-180 s), ``stale`` (> 180 s), ``never``;
    ``future``: dated after now (see FUTURE_SLACK), so its age says nothing."""
    if age is None:
        return "never"
    if age < -FUTURE_SLACK:
        return "future"
    if age < REKEY_AFTER_TIME:
        return "fresh"
    if age <= REJECT_AFTER_TIME:
        return "rekey"
    return "stale"


def short_key(b64: str | None) -> str:
    return "(no key)" if not b64 else b64[:8] + "…"


def readable_endpoint(raw: str | None, extra: dict[str, str], network: str | None) -> str | None:
    """The endpoint as a person reads it.

    Our daemon says it in ``wgvsock_endpoint``. Other daemons print vsock endpoints in the
    IPv4-CID form `wg` can parse (``0.0.0.16:5000``); that form is turned back into
    ``vsock://16:5000`` only when the interface is known to be vsock, because for UDP it is a
    real (if odd) IPv4 address. wireguard-go-vsock prints an accepted connection's peer in the
    Go release's named forms (``local(1):2323982615``, ``vm(16):PORT``), which can only be
    vsock and which `wg` cannot read at all.
    """
    if extra.get("wgvsock_endpoint"):
        return extra["wgvsock_endpoint"]
    if raw and (named := _named_vsock(raw)) is not None:
        return display_endpoint(named)
    if raw and network == "vsock":
        m = _IPV4_ENDPOINT.fullmatch(raw)
        if m:
            with contextlib.suppress(ValueError):
                return f"vsock://{int(ipaddress.IPv4Address(m.group(1)))}:{m.group(2)}"
    return raw


def _named_vsock(raw: str) -> Endpoint | None:
    """The endpoint `raw` names in one of the Go release's named vsock forms (`local(1):P`,
    `vm(N):P`, ...), which only vsock has; None for any other text."""
    if "(" not in raw:
        return None
    try:
        return parse_endpoint(raw, "vsock")
    except ValueError:
        return None


def _endpoint_cid(endpoint: str | None) -> int | None:
    m = _VSOCK_ENDPOINT.fullmatch(endpoint or "")
    return int(m.group(1)) if m else None


def _truncate_left(text: str, width: int) -> str:
    # Endpoints differ at their end (port, socket file name), so keep the tail.
    if width <= 0:
        return ""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1) :] if width > 1 else "…"


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class PeerView:
    public_key: str
    label: str | None = None  # "parent" / "enclave" when a wgvsock role says so
    endpoint: str | None = None  # readable
    endpoint_uapi: str | None = None  # as the UAPI (and so `wg`) gives it
    cid: int | None = None
    latest_handshake: int = 0  # Unix seconds, 0 = never, as `wg show dump` prints it
    latest_handshake_nsec: int = 0
    handshake_age: float | None = None
    health: str = "never"
    rx_bytes: int = 0
    tx_bytes: int = 0
    rx_rate: float | None = None  # bytes per second since the previous sample
    tx_rate: float | None = None
    persistent_keepalive: int = 0
    allowed_ips: list[str] = field(default_factory=list)
    preshared_key: bool = False
    connection: str | None = None  # wgvsock_conn
    reconnects: int | None = None  # wgvsock_reconnects
    attested: bool | None = None  # True only for the pinned image ("attested" below)
    debug: bool = False  # a debug-mode enclave let in by allow_debug: genuine, image unmeasured
    attestation: str | None = None  # one of ATTESTATION_STATES; None: nobody said
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class RefusalView:
    """One destination or name the parent refused the enclave lately."""

    kind: str  # denied, blocked, to-parent, limited, spoofed, forged, dns
    what: str  # "tcp 203.0.113.5:5432", "from 10.9.9.9", a DNS name
    rule: str  # the deny rule, the DNS reason, or ""
    count: int
    age: int  # seconds since the last one, as the daemon counted when asked


@dataclass
class ControlRefusalView:
    """One refusal of the parent's control port: an enclave (or another peer) kept out."""

    kind: str  # registration (the attestation verdict), throttled (too often), connection
    who: str  # "CID 16", "10.0.0.2", "pid 4242"
    reason: str  # as the parent's log says it
    count: int  # the same refusal of the same peer, in a row since the last admission
    age: int  # seconds since the last one, as the daemon counted when asked


@dataclass
class InterfaceView:
    name: str
    socket: str
    error: str | None = None
    public_key: str | None = None
    listen_port: int = 0
    fwmark: int = 0
    network: str | None = None
    link: str | None = None  # "up" or "down"; None: the daemon does not say
    profile: str | None = None
    role: str | None = None
    attested: bool | None = None
    debug: bool = False
    attestation: str | None = None
    # The parent's packets per egress verdict (allowed, denied, blocked); None when not given,
    # and within it None for one the parent did not give (its table lacks the counter).
    egress: dict[str, int | None] | None = None
    egress_error: str | None = None  # why the parent could not read its counters
    dns: dict[str, int | None] | None = None  # queries, refused: only with a DNS forwarder
    refusals: list[RefusalView] = field(default_factory=list)  # newest first
    control_refusals: list[ControlRefusalView] = field(default_factory=list)  # newest first
    # Why the enclave the parent starts itself (parent.enclave) is not running; None: it is,
    # or the parent does not start one.
    enclave_down: str | None = None
    # Connections the WireGuard port closed at accept (Bind.refuse_from: on the parent over
    # vsock, a CID that is not the enclave's); None when the daemon has no such check.
    transport_refused: int | None = None
    peers: list[PeerView] = field(default_factory=list)
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Snapshot:
    time: float  # Unix time the sample was taken
    run_dir: str
    interfaces: list[InterfaceView] = field(default_factory=list)
    listing_error: str | None = None
    named: bool = False  # interfaces were named on the command line, not discovered

    @property
    def readable(self) -> list[InterfaceView]:
        return [i for i in self.interfaces if i.error is None]

    def totals(self) -> dict[str, Any]:
        peers = [p for i in self.readable for p in i.peers]
        rx_rates = [p.rx_rate for p in peers if p.rx_rate is not None]
        tx_rates = [p.tx_rate for p in peers if p.tx_rate is not None]
        return {
            "interfaces": len(self.interfaces),
            "unreadable": len(self.interfaces) - len(self.readable),
            "peers": len(peers),
            "rx_bytes": sum(p.rx_bytes for p in peers),
            "tx_bytes": sum(p.tx_bytes for p in peers),
            "rx_rate": sum(rx_rates) if rx_rates else None,
            "tx_rate": sum(tx_rates) if tx_rates else None,
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "run_dir": self.run_dir,
            "listing_error": self.listing_error,
            "totals": self.totals(),
            "interfaces": [asdict(i) for i in self.interfaces],
        }


def _describe_error(exc: BaseException, path: str, timeout: float = FETCH_TIMEOUT) -> str:
    """One line an operator can act on (escaped: a reply's words may be in it)."""
    return prose(_error_words(exc, path, timeout), 500)


def _error_words(exc: BaseException, path: str, timeout: float) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"no such interface: {path} does not exist"
    if isinstance(exc, PermissionError):
        return f"permission denied: {path} (run as root, or as the socket's owner)"
    if isinstance(exc, ConnectionRefusedError):
        # connect() answers the same for a file, a directory or a FIFO: not a stale socket.
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFSOCK
        if not stat.S_ISSOCK(mode):
            kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode)
                    else "a regular file" if stat.S_ISREG(mode) else "a device or other file")
            return (f"not a socket: {path} is {kind}, which no daemon serves (remove it: a "
                    "daemon makes its own socket as it starts)")
        return (f"stale socket: connection refused on {path} (no daemon is serving it: "
                "its daemon stopped without removing it, as after a crash; started again, "
                "it replaces the socket)")
    if isinstance(exc, OSError) and exc.errno == errno.EPROTOTYPE:
        # Only a socket that is bound, so held by a process, answers so: not a leftover.
        return (f"not a UAPI socket: {path} is a datagram or seqpacket socket, not the stream "
                "socket a WireGuard daemon serves (another program's, still open)")
    if isinstance(exc, TimeoutError):
        return (f"no answer: {path} did not reply within {timeout:g} s (daemon hung? "
                "--timeout waits longer)")
    if isinstance(exc, UAPIError):
        return f"UAPI error: {path}: {exc}"
    if isinstance(exc, OSError):
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)
        return f"cannot read {path}: {reason}"
    if isinstance(exc, ValueError):
        return f"cannot read {path}: {exc}"
    return f"cannot read {path}: {exc!r}"  # not one we expect: its type says more


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value is not None and _COUNT.fullmatch(value) else None


def _counters(extra: dict[str, str], prefix: str,
              names: tuple[str, ...]) -> dict[str, int | None] | None:
    """The named counters under PREFIX, None for each that is not there or not a number;
    None when none is."""
    values = {n: _int_or_none(extra.get(prefix + n)) for n in names}
    if all(v is None for v in values.values()):
        return None
    return values


def _egress(extra: dict[str, str]) -> dict[str, int | None] | None:
    """The parent's verdict counters; `limited` only from a daemon that sends it."""
    egress = _counters(extra, "wgvsock_egress_", ("allowed", "denied", "blocked"))
    limited = _int_or_none(extra.get("wgvsock_egress_limited"))
    if egress is not None and limited is not None:
        egress["limited"] = limited
    return egress


def _dns(extra: dict[str, str]) -> dict[str, int | None] | None:
    """The DNS forwarder's counts: both or none (the forwarder gives both, from its own
    counters, not the table's)."""
    dns = _counters(extra, "wgvsock_dns_", ("queries", "refused"))
    return None if dns is None or None in dns.values() else dns


_REFUSAL = re.compile(r"([a-z][a-z-]{0,15}) (\d{1,18}) (\d{1,12}) (.+)")
REFUSALS_SHOWN = 5  # lines in the dashboard; --json has all the daemon gives


def refusals_of(extra: dict[str, str]) -> list[RefusalView]:
    """wgvsock_refused_1, _2, ... while they parse; text escaped and cut for the terminal."""
    out = []
    for i in range(1, 17):
        m = _REFUSAL.fullmatch(extra.get(f"wgvsock_refused_{i}", ""))
        if m is None:
            break
        what, _, rule = m.group(4).partition("; ")
        out.append(RefusalView(m.group(1), prose(what, 120), prose(rule, 120),
                               int(m.group(2)), int(m.group(3))))
    return out


_CONTROL_REFUSAL = re.compile(r"([a-z][a-z-]{0,15}) (\d{1,18}) (\d{1,12}) ([^;]{1,100}); (.+)")
CONTROL_REFUSALS_SHOWN = 4  # as many as the parent keeps


def control_refusals_of(extra: dict[str, str]) -> list[ControlRefusalView]:
    """wgvsock_control_refused_1, _2, ... while they parse; text escaped and cut."""
    out = []
    for i in range(1, 17):
        m = _CONTROL_REFUSAL.fullmatch(extra.get(f"wgvsock_control_refused_{i}", ""))
        if m is None:
            break
        out.append(ControlRefusalView(m.group(1), prose(m.group(4), 100), prose(m.group(5), 500),
                                      int(m.group(2)), int(m.group(3))))
    return out


_ATTESTATION_OF_UAPI = {word: state for state, word in UAPI_ATTESTED.items()}


def _attestation(value: str | None) -> tuple[bool | None, bool, str | None]:
    """wgvsock_attested ("true", "genuine", "debug" or "false") as (attested, debug, state):
    attested only for the pinned image; genuine and debug enclaves are not."""
    state = _ATTESTATION_OF_UAPI.get(value or "")
    if state is None:
        return None, False, None
    return state == "attested", state == "debug", state


_LINK_STATES = {"up": "up", "down": "down"}


def _shown(value: str | None) -> str | None:
    return None if value is None else prose(value, 200)


def interface_view(name: str, path: str, dev: dict[str, Any], now: float) -> InterfaceView:
    """Turn a parsed `get` reply (see uapi.parse_get) into what the dashboard shows."""
    extra: dict[str, str] = dev.get("extra", {})
    # What a daemon says of itself is shown in an operator's terminal: escaped and cut there,
    # so another daemon's socket (wireguard-go-vsock, anything listening in the run directory)
    # cannot write escapes or extra lines into the dashboard. Keys and numbers are parsed.
    network = _shown(extra.get("wgvsock_network"))
    if network is None and any(_named_vsock(p.get("endpoint") or "") is not None
                               for p in dev.get("peers", [])):
        network = "vsock"  # another daemon (wireguard-go-vsock) that does not say its network
    role = _shown(extra.get("wgvsock_role"))
    attested, debug, attestation = _attestation(extra.get("wgvsock_attested"))
    priv = dev.get("private_key")
    port = _int_or_none(extra.get("wgvsock_port"))
    iface = InterfaceView(
        name=name,
        socket=path,
        public_key=key_to_base64(public_key(priv)) if priv else None,
        listen_port=port if port is not None else dev.get("listen_port", 0),
        fwmark=dev.get("fwmark", 0),
        network=network,
        link=_LINK_STATES.get(extra.get("wgvsock_link") or ""),
        profile=_shown(extra.get("wgvsock_profile")),
        role=role,
        attested=attested,
        debug=debug,
        attestation=attestation,
        egress=_egress(extra),
        egress_error=prose(extra["wgvsock_egress_error"], 500)
        if role == "parent" and extra.get("wgvsock_egress_error") else None,
        dns=_dns(extra),
        refusals=refusals_of(extra),
        control_refusals=control_refusals_of(extra),
        # Longer than other words a daemon says: its end is the fix (run_failure_fix).
        enclave_down=prose(extra["wgvsock_enclave_down"], 600)
        if role == "parent" and extra.get("wgvsock_enclave_down") else None,
        transport_refused=_int_or_none(extra.get("wgvsock_transport_refused")),
        extra=dict(extra),
    )
    # The parent's verdict is about the key that registered, which it names: any other peer
    # (one added by hand with `wg set`) is a plain peer, neither the enclave nor attested.
    enclave_hex = extra.get("wgvsock_enclave_key") if role == "parent" else None
    for p in dev.get("peers", []):
        pextra: dict[str, str] = p.get("extra", {})
        sec, nsec = p.get("last_handshake_time_sec", 0), p.get("last_handshake_time_nsec", 0)
        age = now - (sec + nsec / 1e9) if sec else None
        endpoint = _shown(readable_endpoint(p.get("endpoint"), pextra, network))
        is_enclave = enclave_hex is not None and p["public_key"].hex() == enclave_hex
        # An enclave's interface has one peer, its parent.
        other = "enclave" if is_enclave else "parent" if role == "enclave" else None
        label = _shown(pextra.get("wgvsock_role")) or other
        if "wgvsock_attested" in pextra:
            peer_attested, peer_debug, peer_state = _attestation(pextra["wgvsock_attested"])
        elif is_enclave:
            peer_attested, peer_debug, peer_state = attested, debug, attestation
        else:
            peer_attested, peer_debug, peer_state = None, False, None
        iface.peers.append(
            PeerView(
                public_key=key_to_base64(p["public_key"]),
                label=label,
                endpoint=endpoint,
                endpoint_uapi=p.get("endpoint"),
                cid=_endpoint_cid(endpoint),
                latest_handshake=sec,
                latest_handshake_nsec=nsec,
                handshake_age=age,
                health=health(age),
                rx_bytes=p.get("rx_bytes", 0),
                tx_bytes=p.get("tx_bytes", 0),
                persistent_keepalive=p.get("persistent_keepalive_interval", 0),
                allowed_ips=[prose(a, 100) for a in p.get("allowed_ips", [])],
                preshared_key=p.get("preshared_key") is not None,
                connection=_shown(pextra.get("wgvsock_conn")),
                reconnects=_int_or_none(pextra.get("wgvsock_reconnects")),
                attested=peer_attested,
                debug=peer_debug,
                attestation=peer_state,
                extra=dict(pextra),
            )
        )
    return iface


# ---------------------------------------------------------------------------------------------
# Collection


def default_run_dir() -> str:
    return os.environ.get(ENV_RUN_DIR) or DEFAULT_RUN_DIR


def discover(run_dir: str) -> tuple[list[str], str | None]:
    """Interface names with a socket in run_dir, and why the listing failed if it did."""
    try:
        entries = os.listdir(run_dir)
    except FileNotFoundError:
        return [], None
    except PermissionError:
        # Naming the interfaces helps only where the sockets can be reached: a directory that
        # may be searched but not read. One that may not be searched (mode 0700) keeps them
        # all out, and the advice sent a newcomer on to "permission denied" once more.
        named = ", or name the interfaces to read" if os.access(run_dir, os.X_OK) else ""
        return [], f"cannot list {run_dir}: permission denied (run as root{named})"
    except OSError as e:
        return [], f"cannot list {run_dir}: {e.strerror or e}"
    return sorted(e[: -len(".sock")] for e in entries if e.endswith(".sock") and len(e) > 5), None


Fetch = Callable[[str, float], dict[str, Any]]
_FETCH: Fetch = partial(uapi_get, limit=REPLY_LIMIT)


class Collector:
    """Takes snapshots and keeps the previous counters, from which it computes rates."""

    def __init__(
        self,
        names: list[str] | None = None,
        run_dir: str | None = None,
        *,
        fetch: Fetch = _FETCH,
        timeout: float = FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.names = list(names or [])
        self.run_dir = run_dir or default_run_dir()
        self._fetch = fetch
        self._timeout = timeout
        self._clock = clock
        self._wall = wall
        # (socket path, peer public key) -> (monotonic time, rx, tx) of the previous sample
        self._prev: dict[tuple[str, str], tuple[float, int, int]] = {}

    def _read(self, name: str) -> tuple[str, str, dict[str, Any] | BaseException, float]:
        path = socket_path(name, self.run_dir)
        try:
            dev: dict[str, Any] | BaseException = self._fetch(path, self._timeout)
        except Exception as e:
            # OSError, UAPIError and ValueError say what is wrong with the daemon; anything
            # else is a bug, which must cost this interface's row only (in a reader thread
            # it left its slot empty, and sample() failed later on the None).
            dev = e
        return name, path, dev, self._clock()

    def _read_all(
        self, names: list[str]
    ) -> list[tuple[str, str, dict[str, Any] | BaseException, float]]:
        """Every interface read, in parallel, so one hung daemon delays a refresh by at most
        the timeout, not N times. The readers are daemon threads (a ThreadPoolExecutor's are
        joined at exit): a Ctrl-C ends the dashboard at once, not when the reads under way
        give up, which --timeout may make an hour."""
        if len(names) <= 1:
            return [self._read(n) for n in names]
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(names)):
            todo.put(i)
        results: list[Any] = [None] * len(names)

        def reader() -> None:
            with contextlib.suppress(queue.Empty):
                while True:
                    i = todo.get_nowait()
                    results[i] = self._read(names[i])

        threads = [threading.Thread(target=reader, name="status-read", daemon=True)
                   for _ in range(min(16, len(names)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def sample(self) -> Snapshot:
        if self.names:
            names, listing_error = self.names, None
        else:
            names, listing_error = discover(self.run_dir)
        results = self._read_all(names)
        snap = Snapshot(time=self._wall(), run_dir=self.run_dir, listing_error=listing_error,
                        named=bool(self.names))
        seen: dict[tuple[str, str], tuple[float, int, int]] = {}
        for name, path, dev, taken in results:
            if isinstance(dev, BaseException):
                snap.interfaces.append(InterfaceView(
                    name=name, socket=path, error=_describe_error(dev, path, self._timeout)))
                continue
            try:
                iface = interface_view(name, path, dev, snap.time)
            except Exception as e:  # one daemon's odd reply must not take the others away
                snap.interfaces.append(InterfaceView(
                    name=name, socket=path,
                    error=prose(f"cannot show the reply of {path}: {e!r}", 500)))
                continue
            for p in iface.peers:
                key = (path, p.public_key)
                prev = self._prev.get(key)
                if prev is not None and taken > prev[0]:
                    dt = taken - prev[0]
                    # Counters that went down mean the daemon or peer was recreated.
                    if p.rx_bytes >= prev[1] and p.tx_bytes >= prev[2]:
                        p.rx_rate = (p.rx_bytes - prev[1]) / dt
                        p.tx_rate = (p.tx_bytes - prev[2]) / dt
                seen[key] = (taken, p.rx_bytes, p.tx_bytes)
            snap.interfaces.append(iface)
        self._prev = seen
        return snap


# ---------------------------------------------------------------------------------------------
# Rendering

# Fixed widths of the numeric columns; the endpoint column takes what is left.
_W_KEY, _W_AGE, _W_BYTES, _W_RATE = 9, 10, 8, 10
_INDENT = 2
_DETAIL_INDENT = _INDENT + _W_KEY + 1  # details sit under the endpoint column
_MIN_ENDPOINT, _MAX_ENDPOINT = 8, 40
_NARROW_FIXED = _INDENT + _W_KEY + _W_AGE + 2 * _W_BYTES + 4  # 4 single-space gaps
_WIDE_FIXED = _NARROW_FIXED + 2 * _W_RATE + 2
# Below this width the rate columns move into the detail line rather than being cropped.
WIDE_MIN = _WIDE_FIXED + _MIN_ENDPOINT


def _cell(text: str | Text, width: int, justify: str = "left", style: str = "") -> Text:
    t = text.copy() if isinstance(text, Text) else Text(text, style=style)
    t.truncate(width, overflow="ellipsis")
    t.align(justify, width)  # type: ignore[arg-type]
    return t


def _row(cells: list[tuple[str | Text, int, str]], style: str = "") -> Text:
    line = Text(" " * _INDENT)
    for i, (content, width, justify) in enumerate(cells):
        if i:
            line.append(" ")
        line.append_text(_cell(content, width, justify, style))
    return line


def _wrapped(console: Console, text: Text, width: int, indent: int, hang: int = 0) -> list[Text]:
    """`text` wrapped at spaces to `width`, every line indented by `indent`, the lines after
    the first by `hang` more."""
    out = []
    for n, line in enumerate(text.wrap(console, max(10, width - indent - hang),
                                       overflow="fold")):
        line.rstrip()
        out.append(Text(" " * (indent + (hang if n else 0))) + line)
    return out


def _flow(
    console: Console, parts: list[Text], width: int, indent: int = 0, sep: str = " · "
) -> list[Text]:
    """Lay `parts` out left to right, breaking lines only between parts (so ``0 B/s`` is never
    split from its unit); a part wider than a whole line is wrapped at its spaces."""
    def alone(t: Text) -> Text:
        # A part's own style must not become the base style of the parts after it.
        out = Text()
        out.append_text(t)
        return out

    room = max(10, width - indent)
    lines: list[Text] = []
    cur = Text()
    for part in parts:
        cand = cur.copy()
        if cur.plain:
            cand.append(sep, style="dim")
        cand.append_text(part)
        if cand.cell_len <= room:
            cur = cand
            continue
        if cur.plain:
            lines.append(cur)
        if part.cell_len <= room:
            cur = alone(part)
        else:
            pieces = [alone(x) for x in part.wrap(console, room, overflow="fold")]
            lines.extend(pieces[:-1])
            cur = pieces[-1]
    if cur.plain:
        lines.append(cur)
    for line in lines:
        line.rstrip()
    return [Text(" " * indent) + line for line in lines]


def _header_lines(snap: Snapshot, console: Console, width: int, footer: str | None) -> list[Text]:
    t = snap.totals()
    parts = [
        Text("wgvsock status", style="bold"),
        Text(f"{t['interfaces']} interface{'s' if t['interfaces'] != 1 else ''}"),
        Text(f"{t['peers']} peer{'s' if t['peers'] != 1 else ''}"),
    ]
    for way in ("rx", "tx"):
        total = Text(f"{way} {human_bytes(t[way + '_bytes'])}")
        if t[way + "_rate"] is not None:
            total.append(f" ({human_rate(t[way + '_rate'])})")
        parts.append(total)
    if t["unreadable"]:
        parts.append(Text(f"{t['unreadable']} unreadable", style="bold red"))
    lines = _flow(console, parts, width)
    if footer:
        lines += _flow(console, [Text(f, style="dim") for f in footer.split(" · ")], width)
    return lines


def _empty_lines(snap: Snapshot, console: Console, width: int) -> list[Text]:
    if snap.listing_error:
        return _wrapped(console, Text(snap.listing_error, style="bold red"), width, 0)
    missing = "" if os.path.isdir(snap.run_dir) else " (the directory does not exist)"
    return [
        *_wrapped(console, Text(f"no WireGuard interfaces under {snap.run_dir}{missing}",
                                style="bold yellow"), width, 0),
        *_wrapped(console, Text(EMPTY_HINT), width, 2),
    ]


def _interface_lines(iface: InterfaceView, console: Console, width: int,
                     max_lines: int | None = None, peer_rows: list[int] | None = None,
                     rates: bool = True) -> list[Text]:
    """The interface's lines; once past `max_lines` no further peer is laid out. `peer_rows`
    gets the line each peer laid out begins on. Without `rates`, none are shown."""
    if iface.error is not None:
        line = Text.assemble(("✗ ", "bold red"), (prose(iface.name, 100), "bold"), "  ",
                             (iface.error, "red"))
        return _wrapped(console, line, width, 0)
    parts = [Text(prose(iface.name, 100), style="bold cyan")]
    if iface.link == "down":
        parts.append(Text("link down", style="bold red"))
    if iface.role:
        role = Text(iface.role, style="bold magenta")
        if iface.profile:
            role.append(f" (profile {iface.profile})", style="magenta")
        parts.append(role)
    elif iface.profile:
        parts.append(Text(f"profile {iface.profile}", style="magenta"))
    parts.append(Text(f"key {short_key(iface.public_key)}"))
    parts.append(Text(f"port {iface.listen_port}" if iface.listen_port else "port -"))
    parts.append(Text(f"network {iface.network}" if iface.network else "network unknown",
                      style="" if iface.network else "dim"))
    if iface.fwmark:
        parts.append(Text(f"fwmark {iface.fwmark:#x}"))
    n = len(iface.peers)
    parts.append(Text(f"{n} peer{'s' if n != 1 else ''}", style="dim"))
    lines = _flow(console, parts, width, sep="  ")
    counters = _counter_parts(iface)
    if counters:
        lines += _flow(console, counters, width, _INDENT)
    for r in iface.refusals[:REFUSALS_SHOWN]:
        lines += _flow(console, _refusal_parts(r), width, _INDENT + 2)
    if iface.enclave_down:
        line = Text()  # no base style: it would be the reason's too
        line.append("enclave not running: ", style="bold red")
        line.append(iface.enclave_down)
        lines += _wrapped(console, line, width, _INDENT, hang=2)
    # Where the enclave's peer would be: why it is not there (or, beside an earlier one's
    # peer, why its replacement was not let in).
    if not iface.peers and iface.control_refusals:
        lines += _wrapped(console, Text("no enclave admitted; the control port refused:",
                                        style="bold"), width, _INDENT)
    for c in iface.control_refusals[:CONTROL_REFUSALS_SHOWN]:
        lines += _wrapped(console, _control_refusal_line(c), width, _INDENT + 2, hang=2)
    if not iface.peers:
        if not iface.control_refusals and not iface.enclave_down:
            lines += _wrapped(console, _no_peers(iface), width, _INDENT, hang=2)
        return lines

    wide = rates and width >= WIDE_MIN
    ep_width = max(_MIN_ENDPOINT, min(_MAX_ENDPOINT,
                                      width - (_WIDE_FIXED if wide else _NARROW_FIXED)))

    def row(key: str | Text, ep: str | Text, age: str | Text, rx: str, tx: str,
            rx_rate: str, tx_rate: str, style: str = "") -> Text:
        cells: list[tuple[str | Text, int, str]] = [
            (key, _W_KEY, "left"), (ep, ep_width, "left"), (age, _W_AGE, "right"),
            (rx, _W_BYTES, "right"), (tx, _W_BYTES, "right"),
        ]
        if wide:
            cells += [(rx_rate, _W_RATE, "right"), (tx_rate, _W_RATE, "right")]
        return _row(cells, style)

    lines.append(row("peer", "endpoint", "handshake", "rx", "tx", "rx/s", "tx/s", style="dim"))
    for p in iface.peers:
        if max_lines is not None and len(lines) > max_lines:
            break
        endpoint = _truncate_left(p.endpoint, ep_width) if p.endpoint else "(none)"
        if peer_rows is not None:
            peer_rows.append(len(lines))
        lines.append(
            row(
                short_key(p.public_key),
                Text(endpoint, style="" if p.endpoint else "dim"),
                Text(human_age(p.handshake_age), style=HEALTH_STYLES[p.health]),
                human_bytes(p.rx_bytes),
                human_bytes(p.tx_bytes),
                human_rate(p.rx_rate),
                human_rate(p.tx_rate),
            )
        )
        lines += _flow(console, _details(p, rates=rates and not wide), width, _DETAIL_INDENT)
    return lines


def _no_peers(iface: InterfaceView) -> Text:
    """What an interface without peers waits for. A parent's peer is its enclave, added when
    the enclave registers: "no peers configured" read as a mistake in the profile."""
    if iface.role == "parent":
        return Text("no enclave yet: the parent adds it as its peer when `wgvsock enclave "
                    "up` registers on the control port", style="yellow")
    return Text("no peers configured", style="dim")


def _counter_parts(iface: InterfaceView) -> list[Text]:
    """The parent's egress verdicts and DNS forwarder counts, in packets and queries, and the
    connections its WireGuard port refused."""
    parts: list[Text] = []
    if iface.egress is not None:
        e = iface.egress
        parts.append(Text(f"egress allowed {_n(e['allowed'])}",
                          style="green" if e["allowed"] is not None else "dim"))
        parts.append(Text(f"denied {_n(e['denied'])}", style="bold red" if e["denied"] else "dim"))
        parts.append(Text(f"blocked {_n(e['blocked'])}",
                          style="yellow" if e["blocked"] else "dim"))
        if e.get("limited"):  # off by default (parent.egress.max_connections): no "limited 0"
            parts.append(Text(f"limited {e['limited']}", style="yellow"))
    elif iface.egress_error:
        parts.append(Text(f"egress counters unavailable: {iface.egress_error}", style="yellow"))
    if iface.dns is not None:
        d = iface.dns
        parts.append(Text(f"dns {d['queries']} quer{'ies' if d['queries'] != 1 else 'y'}"))
        parts.append(Text(f"refused {d['refused']}", style="bold red" if d["refused"] else "dim"))
    if iface.egress is not None and None in iface.egress.values():
        parts.append(Text("-: not in the parent's nftables table", style="dim"))
    # Only once there is one, as `limited`: the check is on wherever the enclave's CID is
    # known, and "refused 0" on every parent would be noise. Who it was is not kept (anyone
    # on the host can knock): the log says, at DEBUG.
    if n := iface.transport_refused:
        parts.append(Text(f"WireGuard port refused {n} connection{'s' if n != 1 else ''}",
                          style="bold red"))
    return parts


def _n(count: int | None) -> str:
    return "-" if count is None else str(count)


# What each kind of refusal says at the head of its line, and in brackets when the refusal
# names no rule. The kind alone after "refused" stuttered ("refused denied tcp ...") and named
# a category ("refused to-parent") rather than what happened to the packet.
_REFUSAL_SAID: dict[str, tuple[str, str]] = {
    "denied": ("denied", ""),  # always with its rule: the deny entry, or the credential one
    "blocked": ("blocked", "no allow entry"),
    "to-parent": ("blocked", "a port of the parent itself"),
    "limited": ("dropped", "over parent.egress.max_connections"),
    "spoofed": ("spoofed packet", ""),  # its `what` is "from ADDRESS"
    "forged": ("forged", ""),
    "dns": ("DNS refused", ""),
}
_REFUSAL_STYLES = {"denied": "red", "spoofed": "bold red", "forged": "bold red"}


def refusal_words(r: RefusalView) -> tuple[str, str]:
    """What happened, as the line's first words, and what to say in brackets after what it
    names (the rule, or what the kind means): ("denied", "deny 10.0.0.0/8"), ("DNS refused",
    "not allowed"), ("blocked", "no allow entry"). A kind a later parent reports is shown
    as it is: "refused KIND"."""
    verb, note = _REFUSAL_SAID.get(r.kind, (f"refused {r.kind}", ""))
    return verb, r.rule or note


def _refusal_parts(r: RefusalView) -> list[Text]:
    """``denied tcp 203.0.113.5:5432, 3 times (deny 203.0.113.0/24) · 5 s ago``."""
    verb, note = refusal_words(r)
    line = Text()  # no base style: it would be the rest's too
    line.append(verb, style=_REFUSAL_STYLES.get(r.kind, "yellow"))
    line.append(f" {r.what}")
    if r.count > 1:
        line.append(f", {r.count} times")
    if note:
        line.append(f" ({note})", style="dim")
    return [line, Text(human_age(r.age), style="dim")]


def _control_refusal_line(r: ControlRefusalView) -> Text:
    """``enclave refused 3 times (last 12 s ago, CID 16): REASON``: who was kept out, and why."""
    what = "connection refused" if r.kind == "connection" else "enclave refused"
    # Too often is the enclave's retries meeting the limit: the reason that matters is the
    # refusal before them.
    line = Text()  # no base style: it would be the reason's too
    style = "yellow" if r.kind == "throttled" else "bold red"
    line.append(what + (f" {r.count} times" if r.count > 1 else ""), style=style)
    last = "last " if r.count > 1 else ""
    line.append(f" ({last}{human_age(r.age)}, {r.who}): ", style="dim")
    line.append(r.reason)
    return line


_ATTESTATION_SHOWN = {
    "attested": ("attested ✓", "green"),
    # Verified, but nothing pinned says which image: any enclave on Nitro hardware passes.
    "genuine": ("genuine enclave, image not pinned", "bold yellow"),
    "debug": ("debug enclave, not attested", "bold red"),
    "unattested": ("not attested", "bold yellow"),
}


def _details(p: PeerView, rates: bool = False) -> list[Text]:
    parts: list[Text] = []
    if rates:
        parts.append(Text(f"rx/s {human_rate(p.rx_rate)}  tx/s {human_rate(p.tx_rate)}"))
    if p.health == "future" and p.handshake_age is not None:
        parts.append(Text(f"handshake {_span(int(-p.handshake_age))} in the future (clock "
                          "stepped back?)", style=HEALTH_STYLES["future"]))
    if p.label:
        label = Text(p.label, style="bold magenta")
        if p.cid is not None:
            label.append(f" CID {p.cid}", style="magenta")
        parts.append(label)
    if p.attestation in _ATTESTATION_SHOWN:
        parts.append(Text(*_ATTESTATION_SHOWN[p.attestation]))
    if p.connection:
        conn = Text(_CONN_SHOWN.get(p.connection, p.connection),
                    style=CONN_STYLES.get(p.connection, ""))
        if p.reconnects:
            conn.append(f", {p.reconnects} reconnect{'s' if p.reconnects != 1 else ''}",
                        style="yellow")
        parts.append(conn)
    ka = p.persistent_keepalive
    parts.append(Text(f"keepalive {ka} s" if ka else "keepalive off", style="dim"))
    shown = ", ".join(p.allowed_ips[:ALLOWED_IPS_SHOWN]) if p.allowed_ips else "(none)"
    if len(p.allowed_ips) > ALLOWED_IPS_SHOWN:
        shown += f" and {len(p.allowed_ips) - ALLOWED_IPS_SHOWN} more"
    parts.append(Text("allowed " + shown))
    return parts


def render_lines(
    snap: Snapshot, console: Console, width: int, footer: str | None = None,
    max_lines: int | None = None, rows: list[tuple[str, int]] | None = None,
    rates: bool = True,
) -> list[Text]:
    """The whole view as physical lines of at most `width` cells; with `max_lines`, laid out
    only until there are more than that (a window shows no more, and a daemon with thousands
    of peers would otherwise cost a redraw seconds). `rows` gets ("interface", line) and
    ("peer", line) for where each interface and peer laid out begins. Without `rates` (one
    snapshot, which can have none) the rate columns are left out."""
    lines = _header_lines(snap, console, width, footer)
    if not snap.interfaces:
        lines.append(Text(""))
        lines += _empty_lines(snap, console, width)
        return lines
    if snap.listing_error:
        lines += _wrapped(console, Text(snap.listing_error, style="red"), width, 0)
    for iface in snap.interfaces:
        if max_lines is not None and len(lines) > max_lines:
            break
        lines.append(Text(""))
        peers: list[int] = []
        start = len(lines)
        lines += _interface_lines(
            iface, console, width, None if max_lines is None else max_lines - len(lines), peers,
            rates)
        if rows is not None:
            rows.append(("interface", start))
            rows += [("peer", start + n) for n in peers]
    return lines


def _hidden(snap: Snapshot, rows: list[tuple[str, int]], shown: int) -> str:
    """What the first `shown` lines leave out, as "3 more peers, 1 more interface" (a peer
    whose row is shown counts as shown), or "more lines" when only details are."""
    peers = sum(len(i.peers) for i in snap.interfaces) - sum(
        kind == "peer" and at < shown for kind, at in rows)
    interfaces = len(snap.interfaces) - sum(
        kind == "interface" and at < shown for kind, at in rows)
    said = [f"{n} more {what}{'s' if n != 1 else ''}"
            for n, what in ((peers, "peer"), (interfaces, "interface")) if n > 0]
    return ", ".join(said) or "more lines"


class Dashboard:
    """A rich renderable of the latest snapshot; it lays itself out anew for the width and
    height it is given, which is how the live view follows terminal resizes. With `screen` it
    fills the console's window when given no height: rich's Live renders it inside a Group,
    which gives its parts none."""

    def __init__(self, snapshot: Snapshot, footer: Callable[[Snapshot], str] | None = None,
                 *, screen: bool = False, rates: bool = True):
        self.snapshot = snapshot
        self._footer = footer
        self._screen = screen
        self._rates = rates

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        footer = self._footer(self.snapshot) if self._footer else None
        height = options.height
        if height is None and self._screen:
            height = console.size.height
        rows: list[tuple[str, int]] = []
        lines = render_lines(self.snapshot, console, width, footer, height, rows, self._rates)
        if height is not None and len(lines) > height:
            more = f"… {_hidden(self.snapshot, rows, height - 1)} below"
            advice = f"{more}: enlarge the window, or use --json"
            # The count matters more than the advice: a narrow window keeps it whole.
            lines = [*lines[: height - 1],
                     Text(advice if len(advice) <= width else more, style="dim")]
        # Every line is already laid out for `width`; rich must crop, never re-wrap.
        for line in lines:
            line.truncate(width, overflow="crop")
            line.no_wrap = True
            yield line


# ---------------------------------------------------------------------------------------------
# Running


class _Keys:
    """Single key presses from a terminal on stdin (cbreak mode) plus a wake-up pipe that the
    SIGWINCH handler writes to, so that a resize redraws at once rather than at the next tick.
    Ctrl-C still raises KeyboardInterrupt: cbreak leaves ISIG on."""

    def __init__(self, stdin: TextIO | None) -> None:
        self._fd: int | None = None
        self._saved: list[Any] | None = None
        try:
            if stdin is not None and stdin.isatty():  # None: started with stdin closed
                self._fd = stdin.fileno()
        except (OSError, ValueError):
            self._fd = None
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_winch: Any = None

    @property
    def reads_keys(self) -> bool:
        """Whether a key pressed can reach the view (stdin is a terminal we put in cbreak)."""
        return self._fd is not None

    def __enter__(self) -> _Keys:
        if self._fd is not None:
            try:
                self._saved = termios.tcgetattr(self._fd)
                tty.setcbreak(self._fd, termios.TCSANOW)
            except termios.error:
                self._fd = None
        self._old_winch = signal.signal(signal.SIGWINCH, self._on_winch)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGWINCH, self._old_winch or signal.SIG_DFL)
        if self._fd is not None and self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _on_winch(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"w")

    def wait(self, timeout: float) -> str | None:
        """A key pressed within `timeout`, "resize" on SIGWINCH, or None."""
        fds = [self._wake_r] + ([self._fd] if self._fd is not None else [])
        ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 64)
            return "resize"
        if self._fd is not None and self._fd in ready:
            data = os.read(self._fd, 32)
            if not data:  # the terminal went away
                return "q"
            return data.decode("utf-8", "replace")
        return None


def _footer(snap: Snapshot, interval: float | None) -> str:
    at = f"at {time.strftime('%H:%M:%S', time.localtime(snap.time))}"
    return at if interval is None else f"{at} · every {interval:g} s · rates in bytes/s"


def _print_json(snap: Snapshot, out: TextIO, pretty: bool) -> None:
    out.write(json.dumps(snap.to_json(), indent=2 if pretty else None, sort_keys=False) + "\n")
    out.flush()


def _ticks(interval: float, keys: _Keys) -> Iterator[bool]:
    """Yields True when it is time to sample, False when only a redraw is wanted (resize);
    returns when `q` is pressed. The keys are read on every pass, also when sampling takes
    longer than the interval (a hung daemon): `q` is never left waiting."""
    next_at = time.monotonic()
    while True:
        key = keys.wait(next_at - time.monotonic())
        if key is not None and key[:1] in ("q", "Q"):
            return
        if key == "resize":
            yield False
        now = time.monotonic()
        if now >= next_at:
            next_at = max(next_at + interval, now)
            yield True


def live(
    names: list[str] | None = None,
    *,
    interval: float = DEFAULT_INTERVAL,
    run_dir: str | None = None,
    console: Console | None = None,
    stdin: TextIO | None = None,
    duration: float | None = None,
    timeout: float = FETCH_TIMEOUT,
    stopped_by: list[int] | None = None,
) -> int:
    """The full-screen live view until `q`, Ctrl-C, SIGTERM, SIGHUP or `duration` seconds.
    Usable from other code (the demo) as well as from `main`. STOPPED_BY, when given, gets
    the signal (SIGTERM, SIGHUP) that ended the view: the caller was asked to stop, too."""
    if console is None:
        # COLUMNS/LINES, when set (tmux exports them to panes it starts detached), would pin the
        # size; the live view must follow the terminal itself.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        console = Console(_environ=env)
    collector = Collector(names, run_dir, timeout=timeout)
    # SIGHUP as well: the terminal (an ssh session) went away, or `kill -HUP`. Their default
    # kills the view where it stands, leaving the terminal in the alternate screen, in cbreak
    # and without echo. One ignored (nohup) stays ignored.
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopped_by is not None:
            stopped_by.append(signum)
        raise KeyboardInterrupt

    old_handlers = {sig: signal.signal(sig, on_signal)
                    for sig in (signal.SIGTERM, signal.SIGHUP)
                    if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        with _Keys(stdin or sys.stdin) as keys:
            # Stdin not a terminal (`< /dev/null`, a service, a pipe): no key reaches the view,
            # so "q quits" would be a promise it cannot keep.
            stop = "q quits" if keys.reads_keys else f"Ctrl-C or `kill {os.getpid()}` quits"
            # Taken inside the try: a Ctrl-C while a daemon is slow to answer ends the view
            # quietly.
            dash = Dashboard(collector.sample(), lambda s: f"{_footer(s, interval)} · {stop}",
                             screen=True)
            with Live(dash, console=console, screen=True, auto_refresh=False,
                      redirect_stdout=False, redirect_stderr=False) as view:
                first = True
                end = None if duration is None else time.monotonic() + duration
                for sample in _ticks(interval, keys):
                    if end is not None and time.monotonic() >= end:
                        break
                    if sample and not first:
                        dash.snapshot = collector.sample()
                    first = False
                    view.refresh()
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)
    return 0


def _stream(collector: Collector, interval: float, as_json: bool, console: Console) -> int:
    """Not a terminal (or a dumb one) and not --once: one snapshot per interval, for logs and
    pipelines."""
    try:
        with _Keys(sys.stdin) as keys:
            for sample in _ticks(interval, keys):
                if not sample:
                    continue
                snap = collector.sample()
                if as_json:
                    _print_json(snap, sys.stdout, pretty=False)
                else:
                    console.print(Dashboard(snap, lambda s: _footer(s, interval)))
                    console.print()
                    console.file.flush()
    except KeyboardInterrupt:
        pass
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="wgvsock status",
        description="Live view of WireGuard interfaces read from their UAPI sockets (read-only: "
        "only `get` is ever sent). Works with wgvsock, wireguard-go and wireguard-go-vsock.",
        epilog="Exit status with --once: 0 when every interface was read, 1 when one could not "
        "be (or the run directory could not be listed), 130 when Ctrl-C ended it first. "
        "Rates are in bytes per second between two samples.",
    )
    p.add_argument("ifnames", nargs="*", metavar="IFNAME",
                   help="interfaces to show (default: every socket in the run directory)")
    p.add_argument("--interval", type=seconds(MAX_INTERVAL, "a day"), default=DEFAULT_INTERVAL,
                   metavar="S",
                   help="seconds between refreshes (default: %(default)s)")
    p.add_argument("--timeout", type=seconds(MAX_TIMEOUT, "an hour"), default=FETCH_TIMEOUT,
                   metavar="S",
                   help="seconds to wait for each daemon's reply before showing it as not "
                   "answering (default: %(default)s)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--json", action="store_true",
                   help="print JSON (with --once: one document; else one line per interval)")
    p.add_argument("--run-dir", metavar="DIR", default=None,
                   help=f"where the UAPI sockets are (default: ${ENV_RUN_DIR} or "
                   f"{DEFAULT_RUN_DIR})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    for name in args.ifnames:
        if not name or "/" in name or name in (".", ".."):
            print(f"wgvsock status: invalid interface name {name!r}", file=sys.stderr)
            return 2
    collector = Collector(args.ifnames, args.run_dir, timeout=args.timeout)
    console = Console()
    if args.once:
        try:
            snap = collector.sample()
        except KeyboardInterrupt:  # nothing to show yet; 128 + SIGINT, as a shell reports
            return 130
        if args.json:
            _print_json(snap, sys.stdout, pretty=True)
        else:
            # A rate needs two samples: --once would show "-" in every rate cell.
            console.print(Dashboard(snap, lambda s: _footer(s, None), rates=False))
        # A run directory that cannot be listed is an interface not read, too.
        return 1 if snap.listing_error or any(i.error for i in snap.interfaces) else 0
    # is_interactive: a terminal that can move the cursor; on TERM=dumb the live view would
    # draw nothing until it ended.
    if args.json or not console.is_interactive:
        return _stream(collector, args.interval, args.json, console)
    return live(args.ifnames, interval=args.interval, run_dir=args.run_dir,
                timeout=args.timeout)


if __name__ == "__main__":
    from ..stdout import guarded

    sys.exit(guarded("wgvsock status", main))
