"""safetext: text from across a trust boundary, fit for a log line or a terminal."""

from __future__ import annotations

from wgvsock.safetext import prose, quote


def test_prose_keeps_a_plain_sentence_as_it_reads() -> None:
    reason = "attestation refused: PCR0 is 2b90602f..., expected 7158862b... (ünïcode ok)"
    assert prose(reason) == reason


def test_prose_escapes_line_breaks_terminal_escapes_and_direction_marks() -> None:
    text = "a\nb\r\tc\x1b[2J\x00d\u202ee\u2028f"
    assert prose(text) == "a\\nb\\r\\tc\\x1b[2J\\x00d\\u202ee\\u2028f"
    assert prose(text).isprintable()


def test_prose_cuts_and_says_how_long_it_was() -> None:
    assert prose("x" * 1000, 10) == "xxxxxxxxxx... (1000 chars)"
    assert prose("x" * 10, 10) == "x" * 10


def test_prose_of_a_non_string_is_its_repr() -> None:
    assert prose(b"\n\x1b") == "b'\\n\\x1b'"
    assert prose(None) == "None"


def test_quote_is_a_cut_repr() -> None:
    assert quote("register") == "'register'"
    assert quote(b"x" * 100, 12) == "b'xxxxxxxxxx... (103 chars)"
