"""A background process's log follows logrotate (daemon.LogFollower): after a rename the next
record goes to the file at $WGVSOCK_LOG_FILE, opened as at start; a file there that the
start's checks refuse is not used. Run in this process, on a descriptor of the test's own, with
a clock of the test's (a real daemon's is in tests/net/test_lifecycle.py)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from wgvsock import daemon


@dataclass
class Log:
    path: Path
    follower: daemon.LogFollower
    now: list[float]

    def write(self, message: str, *, later: bool = True) -> None:
        """A record, LATER: once the next look for a rotation is due."""
        if later:
            self.now[0] += daemon.LOG_CHECK_EVERY
        logging.getLogger("wgvsock").warning("%s", message)


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Log]:
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    path = logs / "wg.log"
    # As spawn_background opens it, and as the background process's stderr writes to it.
    stream = os.fdopen(daemon.open_log(str(path)), "w")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("wgvsock")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    now = [100.0]
    follower = daemon.LogFollower(str(path), (stream.fileno(),), clock=lambda: now[0])
    handler.addFilter(follower)
    try:
        yield Log(path, follower, now)
    finally:
        stream.close()


def _rotate(path: Path, *, create: int | None = 0o640) -> Path:
    """As logrotate does: the file renamed to .1, then, CREATE, a new one of that mode."""
    old = path.with_name(path.name + ".1")
    path.rename(old)
    if create is not None:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, create))
        os.chmod(path, create)
    return old


def test_records_after_a_rotation_with_create_go_to_the_new_file(log: Log) -> None:
    log.write("one")
    old = _rotate(log.path)
    log.write("two")
    log.write("three")
    assert old.read_text() == "WARNING one\n"
    assert log.path.read_text() == "WARNING two\nWARNING three\n"
    assert log.path.stat().st_mode & 0o777 == 0o640  # logrotate's, kept


def test_a_rotation_is_looked_for_only_once_a_second_has_passed(log: Log) -> None:
    """Between two looks a record costs a clock read, no stat: it goes to the file held."""
    log.write("one")
    old = _rotate(log.path)
    log.write("two", later=False)
    assert old.read_text() == "WARNING one\nWARNING two\n"
    log.write("three")
    assert log.path.read_text() == "WARNING three\n"


def test_a_rotation_without_create_makes_the_file_0600(log: Log) -> None:
    log.write("one")
    old = _rotate(log.path, create=None)
    log.write("two")
    assert old.read_text() == "WARNING one\n"
    assert log.path.read_text() == "WARNING two\n"
    assert log.path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("unsafe", ["0666", "link"])
def test_an_unsafe_file_after_a_rotation_is_refused_once_and_the_old_one_kept(
        log: Log, tmp_path: Path, unsafe: str) -> None:
    log.write("one")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("")
    if unsafe == "0666":
        old = _rotate(log.path, create=0o666)
        why = "is writable by others (mode 666)"
    else:
        old = _rotate(log.path, create=None)
        log.path.symlink_to(elsewhere)
        why = f"is a symbolic link (to {elsewhere})"
    for n in range(5):
        log.write(f"more {n}")
    lines = old.read_text().splitlines()
    refusals = [line for line in lines if line.startswith("ERROR ")]
    assert len(refusals) == 1, lines
    assert refusals[0].startswith(f"ERROR {daemon.ENV_LOG_FILE}={log.path} was rotated, but "
                                  "the file now there is not used; this log goes on in the old "
                                  f"one: {daemon.ENV_LOG_FILE}={log.path} {why}"), refusals[0]
    assert [line for line in lines if not line.startswith("ERROR ")] == [
        "WARNING one", *(f"WARNING more {n}" for n in range(5))]
    assert elsewhere.read_text() == ""
    if unsafe == "0666":
        assert log.path.read_text() == ""
        # Made safe, it is taken at the next look.
        os.chmod(log.path, 0o600)
        log.write("fixed")
        assert log.path.read_text() == "WARNING fixed\n"


def test_copytruncate_leaves_no_hole(log: Log) -> None:
    """logrotate's copytruncate copies the file and empties it in place: the next record
    goes to the start of it (appended to), not after a run of NUL bytes where the old end
    was."""
    log.write("one " + "x" * 4000)
    old = log.path.with_name(log.path.name + ".1")
    old.write_bytes(log.path.read_bytes())
    os.truncate(log.path, 0)
    log.write("two")
    log.write("three", later=False)
    assert log.path.read_bytes() == b"WARNING two\nWARNING three\n"


def test_records_after_the_directory_is_renamed_go_to_the_path_again(
        log: Log, tmp_path: Path) -> None:
    """The log's directory moved aside whole (/var/log/wgvsock to /var/log/wgvsock.old) and
    made again: the path names a file in the new directory, where the next record goes
    (made 0600). Before, the name was looked for in the directory held from the start,
    where it still named the file written to: the log went on in the renamed directory."""
    log.write("one")
    old = tmp_path / "logs.old"
    log.path.parent.rename(old)
    log.path.parent.mkdir(mode=0o755)
    log.write("two")
    log.write("three")
    assert (old / "wg.log").read_text() == "WARNING one\n"
    assert log.path.read_text() == "WARNING two\nWARNING three\n"
    assert log.path.stat().st_mode & 0o777 == 0o600


def test_a_renamed_directory_not_made_again_is_said_once_and_the_old_file_kept(
        log: Log, tmp_path: Path) -> None:
    """The path naming nothing (its directory renamed, none made in its place), the log
    stays in the file it was in, with one line saying why; once the directory is there
    again, the next look takes the path. Before, nothing was said and the log stayed in
    the renamed directory for good."""
    log.write("one")
    old = tmp_path / "logs.old"
    log.path.parent.rename(old)
    for n in range(3):
        log.write(f"more {n}")
    lines = (old / "wg.log").read_text().splitlines()
    refusals = [line for line in lines if line.startswith("ERROR ")]
    assert refusals == [
        f"ERROR cannot reopen {daemon.ENV_LOG_FILE}={log.path} after rotation: a directory "
        "on its way no longer exists (renamed or removed); this log goes on in the old file "
        "until it is there again"], lines
    assert [line for line in lines if not line.startswith("ERROR ")] == [
        "WARNING one", *(f"WARNING more {n}" for n in range(3))]
    log.path.parent.mkdir(mode=0o755)
    log.write("back")
    assert log.path.read_text() == "WARNING back\n"


def test_a_refusal_after_the_path_led_back_to_the_file_held_is_said_again(
        log: Log, tmp_path: Path) -> None:
    """The log's directory renamed away (said), then back, so that the path names the file
    written to again; renamed away again later within the hour: a new time it cannot be
    followed, said again. Before, the first refusal was still taken as the one said last,
    the path leading back to the file held not counting as an end to it: the second went
    unsaid, the log staying in a file no one looks for."""
    log.write("one")
    old = tmp_path / "logs.old"
    log.path.parent.rename(old)
    log.write("two")
    old.rename(log.path.parent)  # back: the path names the file held
    log.write("three")
    log.path.parent.rename(old)
    log.write("four")
    lines = (old / "wg.log").read_text().splitlines()
    refusals = [line for line in lines if line.startswith("ERROR ")]
    assert len(refusals) == 2, lines
    assert lines == ["WARNING one", refusals[0], "WARNING two", "WARNING three", refusals[1],
                     "WARNING four"]


def test_following_leaks_no_descriptor(log: Log) -> None:
    """A claim nothing tested: each reopen, taken or refused, closes what it opened (the
    walk's directory, a file refused), however many rotations: the process's descriptors
    are as many after 200 of each as before."""
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    log.write("start")
    before = fds()
    for n in range(200):
        _rotate(log.path, create=0o600)
        log.write(f"taken {n}")
    _rotate(log.path, create=0o666)
    for n in range(200):
        log.write(f"refused {n}")
    assert fds() == before
    assert log.path.with_name("wg.log.1").read_text().count("ERROR ") == 1
