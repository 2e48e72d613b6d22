"""safetext: text from across a trust boundary, fit for a log line or a terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unsayable import Unsayable
from wgvsock.safetext import error, message, prose, quote, shell, without_userinfo


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


def test_error_is_type_and_message_in_one_line_whatever_its_str_does() -> None:
    assert error(RuntimeError("no CID yet")) == "RuntimeError: no CID yet"
    assert error(RuntimeError()) == "RuntimeError"
    assert error(OSError("a\nforged line\x1b[2J")) == "OSError: a\\nforged line\\x1b[2J"
    assert error(ValueError("x" * 1000), 10) == "ValueError: xxxxxxxxxx... (1000 chars)"
    assert error(Unsayable()) == "Unsayable (its message cannot be shown: ValueError)"
    assert error(type("bad\nname", (Exception,), {})()) == "bad\\nname"


def test_message_is_the_message_alone_as_it_is_whatever_its_str_does() -> None:
    assert message(RuntimeError("could not\ndelete wg0")) == "could not\ndelete wg0"
    assert message(RuntimeError()) == "RuntimeError"
    assert message(Unsayable()) == "Unsayable (its message cannot be shown: ValueError)"


def test_error_cleans_the_message_before_it_is_cut() -> None:
    """A password past the cut would otherwise leave its first half: `without_userinfo` knows
    it only by the @ after it."""
    exc = ValueError("x" * 20 + " https://user:s3cr3t-pw@monitoring.example/")
    said = error(exc, 38, clean=without_userinfo)
    assert said == "ValueError: " + "x" * 20 + " https://***@monit... (52 chars)", said
    # Cleaned once cut, it would keep "user:s3cr", the cut having taken its @.
    assert without_userinfo(error(exc, 38)).endswith("https://user:s3cr... (63 chars)")
    assert error(Unsayable(), clean=without_userinfo) == (
        "Unsayable (its message cannot be shown: ValueError)")


def _bounded(code: str, timeout: float = 30.0) -> str:
    """Runs `code` in a child process (repr() of a big structure holds the GIL in C, so no
    thread could stop it): a regression fails at `timeout` instead of hanging the run."""
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=True,
        cwd=root,
    )
    return done.stdout


def test_quote_and_prose_of_a_shared_structure_do_not_walk_it_all() -> None:
    """Review finding: quote() called repr() and cut afterwards; a DAG of 64 levels (a few
    hundred bytes of CBOR value sharing) has 2^64 paths, so the repr never ended."""
    out = _bounded(
        "from wgvsock.safetext import error, prose, quote\n"
        "a = [0]\n"
        "for _ in range(64):\n"
        "    a = [a, a]\n"
        "loop = [1]\n"
        "loop.append(loop)\n"
        "for v in (a, (a,), {'k': a}, {(1, 2): a}, loop, [b'x' * 1000] * 10**4):\n"
        "    q, p = quote(v), prose(v, 300)\n"
        "    assert len(q) < 100 and len(p) < 400 and p.isprintable(), (q, p)\n"
        "print(quote(a))\n"
        "print(quote(list(range(10**6))))\n"
    )
    deep, wide = out.splitlines()
    assert deep.startswith("[[[[[[..., ...], [..., ...]]")
    assert wide.startswith("[0, 1, 2, ") and wide.endswith("(more than 4096 chars)")


def test_quote_of_small_values_is_their_repr() -> None:
    for v in (
        [1, "a", b"\n"],
        (1,),
        (),
        {"k": [None, True, 1.5]},
        {1, 2} - {2},
        frozenset(),
        set(),
    ):
        assert quote(v, 200) == repr(v)
    assert quote([1] * 100, 10) == "[1, 1, 1, ... (300 chars)"
    assert quote(ValueError("x")) == "<ValueError object>"


@pytest.mark.parametrize("word", [
    "/app/run", "/app/my app", "/app/it's", "/a;touch b", "$(touch b)", "-x", "",
    "/app/run\r", "a\\b\tc\n", "/app/\x01\x7f\u0085", os.fsdecode(b"/app/\xff\xfe"), "/app/é",
])
def test_shell_gives_a_word_bash_takes_as_that_one_word(word: str, tmp_path) -> None:
    """The commands a message gives to copy named paths unquoted (`chmod go-w /run/my dir`
    chmods two others). What cannot be printed is escaped: a raw carriage return in the
    message would hide what comes before it on the terminal."""
    quoted = shell(word)
    assert quoted.isprintable(), quoted
    res = subprocess.run(["bash", "-c", f"printf %s {quoted}"], capture_output=True,
                         cwd=tmp_path, check=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert res.stdout == os.fsencode(word)
    assert list(tmp_path.iterdir()) == []
    assert shell("/app/run") == "/app/run"  # as it was, where nothing needs quoting
