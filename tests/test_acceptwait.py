"""AcceptWait's release protocol: the listener and the wake pipe are closed once, by whoever
comes last of the owner's close and the accept thread's end, and never touched after."""

from __future__ import annotations

import contextlib
import os
import socket
import threading

import pytest

from wgvsock.acceptwait import AcceptWait

WAIT = 10.0  # a loaded 2-core machine


@pytest.fixture
def listener(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "l.sock"))
    s.listen(4)
    yield s
    s.close()


def wake_pipe(w: AcceptWait) -> list[tuple[int, os.stat_result]]:
    """W's wake pipe's descriptors and what they are now, for pipe_released (the servers'
    tests use them too)."""
    return [(fd, os.fstat(fd)) for fd in (w._r, w._w)]


def pipe_released(pipe: list[tuple[int, os.stat_result]]) -> bool:
    """Whether none of PIPE's descriptors is still the pipe (closed, or another file's now)."""
    for fd, was in pipe:
        try:
            now = os.fstat(fd)
        except OSError:
            continue  # closed
        if (now.st_dev, now.st_ino) == (was.st_dev, was.st_ino):
            return False
    return True


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_thread_never_started_leaves_the_release_to_close(listener):
    w = AcceptWait(listener)
    fds = (w._r, w._w)
    w.close()
    assert listener.fileno() == -1
    assert not any(_open(fd) for fd in fds)


def _accept_thread(w: AcceptWait, woken: threading.Event) -> threading.Thread:
    def accept_loop():
        try:
            if w.wait() is False:  # woken, not a connection
                woken.set()
        finally:
            w.ended()

    w.begin()
    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    return t


def test_a_thread_that_ended_before_close_leaves_the_release_to_close(listener):
    w, woken = AcceptWait(listener), threading.Event()
    t = _accept_thread(w, woken)
    fds = (w._r, w._w)
    w.wake()
    assert woken.wait(WAIT)
    t.join(WAIT)
    assert not t.is_alive()
    assert listener.fileno() != -1  # the thread ended before any close(): it closed nothing
    w.join_and_close(t)
    assert listener.fileno() == -1
    assert not any(_open(fd) for fd in fds)


def test_a_close_while_the_thread_polls_leaves_the_release_to_it(listener):
    w, woken = AcceptWait(listener), threading.Event()
    t = _accept_thread(w, woken)
    fds = (w._r, w._w)
    w.close()  # (as after a join that gave up): the thread still polls both
    assert listener.fileno() != -1 and all(_open(fd) for fd in fds)
    w.wake()
    t.join(WAIT)
    assert not t.is_alive() and woken.is_set()
    assert listener.fileno() == -1
    assert not any(_open(fd) for fd in fds)


def test_wake_and_close_after_the_release_touch_no_reused_number(listener):
    w = AcceptWait(listener)
    old_w = w._w
    w.close()
    r, wr = os.pipe()
    try:
        os.dup2(wr, old_w)  # the number handed out again
        w.wake()
        w.close()
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
        assert _open(old_w)  # not closed a second time either
    finally:
        for fd in (r, wr, old_w):
            with contextlib.suppress(OSError):
                os.close(fd)
