"""Small helpers for tests that drive our daemon as a process: its pid, its sockets, raw UAPI.

Kept apart from netlab.py so that module's API stays as it is; everything here builds on it.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

from .netlab import RUN_DIR, Namespace


def sock_path(ifname: str) -> str:
    return f"{RUN_DIR}/{ifname}.sock"


def process_gone(pid: int) -> bool:
    """True once `pid` has exited. A zombie counts as gone: this machine's init may take a
    while to reap orphans, and a zombie holds no sockets, files or interfaces."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # The state letter follows the parenthesised command name, which may contain spaces.
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def only_pid(ns: Namespace) -> int:
    """The single process running in `ns` (a namespace that holds just one daemon)."""
    pids = ns.pids()
    assert len(pids) == 1, f"expected exactly one process in {ns.name}, found {pids}"
    return pids[0]


def link_exists(ns: Namespace, ifname: str) -> bool:
    return ns.ip("link", "show", "dev", ifname, check=False).returncode == 0


def raw_uapi(path: str, request: bytes, timeout: float = 5.0) -> bytes:
    """Sends raw bytes to a UAPI socket and returns what comes back up to the first blank
    line (the end of a reply) or EOF, whichever is first; b"<EOF>" is appended on EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(request)
        out = b""
        while not out.endswith(b"\n\n"):
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return out + b"<EOF>"
            out += chunk
        return out
