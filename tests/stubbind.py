"""A transport for device tests that need no sockets: a stream Bind that is always open and
sends nowhere. Tests subclass it for the one behaviour they look at (what a peer's hello said,
a send that waits)."""

from __future__ import annotations

from typing import Any

from wgvsock.conn.bind import Bind, Receiver
from wgvsock.conn.endpoint import Endpoint


class StubBind(Bind):
    stream = True

    def open(self, port: int, receive: Receiver) -> int:
        return 1

    def is_open(self) -> bool:
        return True

    def change_port(self, port: int) -> int:
        return port

    def check_port(self, port: int) -> None:
        return None

    def send(self, data: bytes, ep: Endpoint) -> int:
        return len(data)  # as if it went

    def close(self) -> None:
        return None

    def format_endpoint(self, ep: Endpoint) -> str | None:
        return str(ep)

    def parse_endpoint(self, text: str) -> Endpoint:
        return Endpoint("unix", text, 0)

    def set_mark(self, mark: int) -> None:
        return None

    def status(self) -> dict[str, Any]:
        return {}
