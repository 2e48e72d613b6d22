"""Transports ("binds", as in wireguard-go's conn package): one small class per socket kind
behind the :class:`Bind` interface, and the factory that picks one for ``-n NETWORK`` / ``-d``."""

from __future__ import annotations

from .bind import Bind, TransportUnavailable
from .dgram import DatagramBind
from .stream import StreamBind

__all__ = ["Bind", "DatagramBind", "StreamBind", "TransportUnavailable", "make_bind"]


def make_bind(network: str, dgram: bool, unix_dir: str | None = None) -> Bind:
    """The bind for ``-n NETWORK`` and ``-d``: dgram applies to vsock and unix."""
    if network in ("vsock", "unix"):
        if dgram:
            return DatagramBind(network, unix_dir=unix_dir)
        return StreamBind(network, unix_dir=unix_dir)
    if network in ("tcp", "tcp4", "tcp6"):
        if dgram:
            raise ValueError(f"network {network} is a stream transport; datagram mode is for "
                             "vsock and unix (use network udp for UDP)")
        return StreamBind(network, unix_dir=unix_dir)
    if network == "udp":
        return DatagramBind(network, unix_dir=unix_dir)
    raise ValueError(f"unknown network {network!r} (expected vsock, tcp, tcp4, tcp6, udp or unix)")
