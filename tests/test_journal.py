"""wgvsock.journal: syslog priority prefixes, only when stderr is systemd's journal stream
(tests/net/test_systemd.py reads them back with `journalctl -p err` under systemd itself)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from wgvsock.journal import _JournalFormatter, is_journal

SCRIPT = """
import logging
from wgvsock.daemon import setup_logging
setup_logging("verbose", "wg%d")
log = logging.getLogger("wgvsock.test")
log.info("up")
log.warning("odd")
try:
    1 / 0
except ZeroDivisionError:
    log.exception("failed")
"""


def run_logging(tmp_path: Path, *, journal: bool) -> list[str]:
    out = tmp_path / "stderr"
    with open(out, "wb") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ)
        env.pop("JOURNAL_STREAM", None)
        if journal:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        subprocess.run([sys.executable, "-c", SCRIPT], stderr=f, env=env, check=True,
                       timeout=60)
    return out.read_text().splitlines()


def test_lines_carry_their_priority_when_stderr_is_the_journal(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journal=True)
    assert lines[0].startswith("<6>INFO: (wg%d) ") and lines[0].endswith(" up")
    assert lines[1].startswith("<4>WARNING: ") and lines[1].endswith(" odd")
    assert lines[2].startswith("<3>ERROR: ") and lines[2].endswith(" failed")
    # The traceback's lines are entries of their own, each an error too.
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[2:])
    assert lines[-1] == "<3>ZeroDivisionError: division by zero"


def test_no_prefix_on_anything_else(tmp_path: Path) -> None:
    lines = run_logging(tmp_path, journal=False)
    assert lines[0].startswith("INFO: (wg%d) ")
    assert not any(line.startswith("<") for line in lines)


def test_is_journal_compares_the_stream_itself(tmp_path: Path) -> None:
    with open(tmp_path / "a", "wb") as a, open(tmp_path / "b", "wb") as b:
        st = os.fstat(a.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert is_journal(a.fileno(), env)
        assert not is_journal(b.fileno(), env)  # stdout may be the journal, stderr not
        for bad in ({}, {"JOURNAL_STREAM": ""}, {"JOURNAL_STREAM": "x:y"},
                    {"JOURNAL_STREAM": f"{st.st_dev}"}):
            assert not is_journal(a.fileno(), bad)
        assert not is_journal(9999, env)  # not open


LINE_MAX = 48 * 1024  # journald.conf(5) LineMax= default


def journald_entries(stream: bytes) -> list[tuple[int, bytes]]:
    """(priority, message) as journald's stdout stream takes them: a line ends at a newline,
    at a NUL, or after LineMax bytes without either, and each piece is read for a `<N>`."""
    entries = []
    while stream:
        head = stream[:LINE_MAX]
        ends = [i for i in (head.find(b"\n"), head.find(b"\0")) if i >= 0]
        if ends:
            piece, stream = stream[:min(ends)], stream[min(ends) + 1:]
        else:
            piece, stream = head, stream[LINE_MAX:]
        prio = 6
        if len(piece) >= 3 and piece[:1] == b"<" and piece[2:3] == b">" and piece[1:2].isdigit():
            prio, piece = int(piece[1:2]), piece[3:]
        entries.append((prio, piece))
    return entries


def format_warning(msg: str) -> bytes:
    record = logging.LogRecord("wgvsock.test", logging.WARNING, __file__, 1, msg, None, None)
    out = _JournalFormatter("%(levelname)s: %(message)s").format(record) + "\n"
    return out.encode("utf-8", "backslashreplace")


def test_a_nul_in_a_message_cannot_forge_an_entry_of_another_priority() -> None:
    entries = journald_entries(format_warning("ok\0<0>forged\nnext\0"))
    assert entries == [(4, b"WARNING: ok\\x00<0>forged"), (4, b"next\\x00")]


def test_a_line_over_line_max_is_cut_into_pieces_of_the_same_priority() -> None:
    msg = "é" * (60 * 1024) + "<0>forged" + "x" * (60 * 1024)  # 2 bytes a character
    entries = journald_entries(format_warning(msg))
    assert len(entries) > 2
    assert all(prio == 4 for prio, _ in entries)
    assert b"".join(piece for _, piece in entries).decode() == "WARNING: " + msg
