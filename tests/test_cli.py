"""The top-level `wgvsock` commands that need no role: genkey and pubkey."""

from __future__ import annotations

import io
import sys

import pytest

from wgvsock import cli


def run_pubkey(data: bytes, monkeypatch, capsys) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(data)),
                                                       encoding="utf-8", errors="strict"))
    code = cli.main(["pubkey"])
    out, err = capsys.readouterr()
    return code, out, err


def test_pubkey_of_a_key(monkeypatch, capsys):
    private = "YOrfCzvvqgONhTTs2lwW+53ZtrRnlMbFbBuYShw8kUY="
    code, out, _ = run_pubkey(private.encode() + b"\n", monkeypatch, capsys)
    assert code == 0 and len(out.strip()) == 44


@pytest.mark.parametrize(("data", "said"), [
    # Read whole before: /dev/zero or a disk image on stdin ate the memory.
    (b"A" * (1 << 20), "more than a key (over 4096 bytes)"),
    # Decoded strictly under a UTF-8 locale: a UnicodeDecodeError traceback.
    (b"\xff\xfe" + b"A" * 42, "key is not valid base64"),
])
def test_pubkey_refuses_what_is_no_key_without_a_traceback(data, said, monkeypatch, capsys):
    code, out, err = run_pubkey(data, monkeypatch, capsys)
    assert (code, out) == (1, "")
    assert err.startswith("wgvsock pubkey: invalid private key on stdin: ") and said in err
