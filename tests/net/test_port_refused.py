"""The parent's control listener, refused by the kernel, says why in one line and what to do
about it (roles/common.port_refused), for each transport and each refusal an operator meets.
Run in a namespace of the test's (TCP) or the lab's directory (Unix); the vsock one only
binds, as the parent does, and never connects."""

from __future__ import annotations

import socket
import sys

import pytest

from .netlab import Lab, Namespace

# One control_listener() in a child process (to run as another user where asked): what it
# raised, or "listening".
LISTEN = """\
import sys
from wgvsock.roles.common import RoleError, control_listener
from wgvsock.services.profile import Transport
kind, host, port, path = sys.argv[1], sys.argv[2] or None, int(sys.argv[3]), sys.argv[4]
try:
    control_listener(Transport(kind=kind, host=host, control_port=port, path=path)).close()
    print("listening")
except RoleError as e:
    print(e)
"""


def listen(ns: Namespace, kind: str, port: int, host: str = "", path: str = "",
           user: int | None = None) -> str:
    who = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups") if user else ()
    res = ns.run(*who, sys.executable, "-c", LISTEN, kind, host, str(port), path,
                 env=ns.lab.env(PYTHONPATH=":".join(sys.path)))
    assert "Traceback" not in res.stderr, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("kind", ["tcp", "vsock"])
def test_a_port_below_1024_without_the_capability_says_so(lab: Lab, kind: str) -> None:
    """The parent may run with CAP_NET_ADMIN alone; vsock reserves the ports below 1024 as TCP
    does. Before, "Permission denied: check transport.control_port and transport.host"."""
    if kind == "vsock":
        try:
            socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        except OSError:
            pytest.skip("no vsock on this machine")
    said = listen(lab.netns("p"), kind, 80, host="127.0.0.1" if kind == "tcp" else "",
                  user=65534)
    assert said == (f"cannot listen on the control port 80 ({kind}): Permission denied: a port "
                    "below 1024 needs root (CAP_NET_BIND_SERVICE): run `parent up` as root, "
                    "or give this profile a transport.control_port of 1024 or above"), said


def test_a_host_that_is_no_address_here_is_named(lab: Lab) -> None:
    """EADDRNOTAVAIL is transport.host's doing, never the port's."""
    said = listen(lab.netns("a"), "tcp", 51821, host="192.0.2.9")
    assert said == ("cannot listen on the control port 51821 (tcp): Cannot assign requested "
                    "address: 192.0.2.9 is no address of this machine's (in this network "
                    "namespace): check transport.host"), said


def test_a_unix_refusal_names_the_path_not_a_host(lab: Lab) -> None:
    """A Unix transport has no host: its other refusals are the path's (here too long for a
    socket's address, which Python refuses without an errno)."""
    path = str(lab.tmp / ("d" * 120))
    said = listen(lab.netns("u"), "unix", 51821, path=path)
    assert said.startswith("cannot listen on the control port 51821 (unix): "), said
    assert said.endswith(": check transport.path and transport.control_port"), said
    assert "transport.host" not in said, said
