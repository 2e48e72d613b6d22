"""Whether a process answers on a Unix socket file: a leftover may go, a live one may not."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from wgvsock.conn.unixsock import answered, remove_stale


def _bound(path: Path, kind: int) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind)
    s.bind(str(path))
    return s


def test_live_sockets_of_either_kind_answer(tmp_path: Path) -> None:
    stream = _bound(tmp_path / "s.sock", socket.SOCK_STREAM)
    dgram = _bound(tmp_path / "d.dgram", socket.SOCK_DGRAM)
    stream.listen()
    try:
        assert answered(str(tmp_path / "s.sock"))
        assert answered(str(tmp_path / "d.dgram"))
    finally:
        stream.close()
        dgram.close()


@pytest.mark.parametrize("listening", [True, False])
def test_a_live_seqpacket_socket_answers_and_stays(tmp_path: Path, listening: bool) -> None:
    """Probed as stream and datagram only, each refused with EPROTOTYPE: taken for a
    leftover, and a daemon starting on that name unlinked it ("removed stale UAPI socket")."""
    path = tmp_path / "q.sock"
    held = _bound(path, socket.SOCK_SEQPACKET)
    try:
        if listening:
            held.listen()
        assert answered(str(path))
        assert not remove_stale(str(path)) and path.exists()
    finally:
        held.close()


def test_leftovers_and_missing_paths_do_not(tmp_path: Path) -> None:
    for name, kind in (("s.sock", socket.SOCK_STREAM), ("d.dgram", socket.SOCK_DGRAM)):
        _bound(tmp_path / name, kind).close()  # the file stays, nobody behind it
        assert (tmp_path / name).exists()
        assert not answered(str(tmp_path / name))
    assert not answered(str(tmp_path / "never.sock"))


def test_a_listener_with_a_full_backlog_answers_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    listener = _bound(tmp_path / "busy.sock", socket.SOCK_STREAM)
    listener.listen(0)
    held = []
    try:
        while True:  # fill the backlog: the next connect would block
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            held.append(c)
            try:
                c.connect(path)
            except BlockingIOError:
                break
        assert answered(path)
    finally:
        for c in held:
            c.close()
        listener.close()


def test_remove_stale_takes_leftovers_only(tmp_path: Path) -> None:
    left = tmp_path / "left.sock"
    _bound(left, socket.SOCK_STREAM).close()
    assert remove_stale(str(left)) and not left.exists()
    assert remove_stale(str(tmp_path / "never.sock"))
    live = _bound(tmp_path / "live.sock", socket.SOCK_STREAM)
    live.listen()
    try:
        assert not remove_stale(str(tmp_path / "live.sock"))
        assert (tmp_path / "live.sock").exists()
    finally:
        live.close()
    (tmp_path / "file").write_text("not a socket")
    with pytest.raises(FileExistsError):
        remove_stale(str(tmp_path / "file"))
    assert (tmp_path / "file").exists()
