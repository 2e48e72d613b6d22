"""The top-level `wgvsock` commands that need no role: genkey and pubkey."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wgvsock import cli, stdout


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


# ---------------------------------------------------------------------------------------------
# Standard output that cannot be written: said once, at the entry points, never a traceback

ROOT = Path(__file__).resolve().parents[1]
KEY = b"YOrfCzvvqgONhTTs2lwW+53ZtrRnlMbFbBuYShw8kUY=\n"
# (argv after `python -m`, the program named in the error): every command that prints, through
# both entry points ([project.scripts]) and status's own __main__.
PRINTING = [
    (["wgvsock.cli", "pubkey"], "wgvsock"),
    (["wgvsock.cli", "genkey"], "wgvsock"),
    (["wgvsock.cli", "version"], "wgvsock"),
    (["wgvsock.cli", "--help"], "wgvsock"),
    (["wgvsock.cli", "profile", "check", str(ROOT / "tests" / "data" / "profile-unix.yaml")],
     "wgvsock"),
    (["wgvsock.cli", "status", "--once", "--json", "--run-dir", "/nonexistent"], "wgvsock"),
    (["wgvsock.cli", "status", "--json", "--interval", "0.1", "--run-dir", "/nonexistent"],
     "wgvsock"),
    (["wgvsock.cli", "daemon", "--help"], "wgvsock"),
    (["wgvsock.cli", "attest", "--help"], "wgvsock"),
    (["wgvsock.daemon", "--help"], "wireguard-go-vsock"),
    (["wgvsock.ui.status", "--once", "--run-dir", "/nonexistent"], "wgvsock status"),
]


def run_with_stdout(argv: list[str], stdout, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], input=KEY.decode(), stdout=stdout,
                          stderr=subprocess.PIPE, text=True, timeout=60, check=False, **kwargs)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize(("argv", "prog"), PRINTING, ids=[" ".join(a) for a, _ in PRINTING])
def test_a_full_stdout_is_one_line_and_status_1(argv, prog):
    """Before: a traceback ending in OSError: [Errno 28], status 1 or 120 ("Exception
    ignored" when the last of it was flushed at exit)."""
    with open("/dev/full", "w") as full:
        res = run_with_stdout(argv, full)
    assert (res.returncode, res.stderr) == (
        1, f"{prog}: cannot write to standard output: No space left on device\n")


@pytest.mark.parametrize(("argv", "prog"), PRINTING, ids=[" ".join(a) for a, _ in PRINTING])
def test_a_stdout_whose_reader_is_gone_ends_quietly_with_141(argv, prog):
    """`| head -c1`: exit 141 (128 + SIGPIPE, as a shell reports cat or grep killed by
    SIGPIPE), nothing said. Before: a BrokenPipeError traceback, or status 0 (profile check,
    status) as if all was printed."""
    r, w = os.pipe()
    os.close(r)  # the reader gone before the first write: no race
    try:
        res = run_with_stdout(argv, w)
    finally:
        os.close(w)
    assert (res.returncode, res.stderr) == (141, "")


@pytest.mark.parametrize(("argv", "prog"), PRINTING[:2], ids=["pubkey", "genkey"])
def test_a_closed_stdout_is_said(argv, prog):
    """Started with `>&-`: print() wrote to None without a word, and status 0."""
    res = run_with_stdout(argv, subprocess.DEVNULL, preexec_fn=lambda: os.close(1))
    assert (res.returncode, res.stderr) == (
        1, f"{prog}: cannot write to standard output: not open (the command was started with "
           "it closed)\n")


def test_an_error_of_another_file_is_not_taken_for_stdout():
    """Only what sys.stdout raises is said as standard output's: an OSError of another file
    stays the command's own, and sys.stdout is given back as it was."""
    before = sys.stdout

    def fails() -> int:
        print("on stdout")
        raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/x")

    with pytest.raises(OSError) as info:
        stdout.guarded("wgvsock", fails)
    assert info.value.filename == "/var/lib/x" and not isinstance(info.value, BrokenPipeError)
    assert sys.stdout is before


# ---------------------------------------------------------------------------------------------
# --help: every command says what it does and what each of its options means


@pytest.mark.parametrize("argv", [
    ["parent", "up"], ["parent", "down"], ["parent", "reload"], ["parent", "doctor"],
    ["enclave", "up"],
])
def test_role_help_explains_every_option(argv, capsys):
    """`--profile` and `-v` had no words in `parent up --help`, and `enclave up --help` showed
    its usage with the enclave parser's own usage glued in front ("[-- CMD [ARGS...]] up")."""
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wgvsock {' '.join(argv)} ")
    options = out[out.index("options:"):].splitlines()[1:]
    for i, line in enumerate(options):
        if line.strip().startswith("-"):
            after = options[i + 1] if i + 1 < len(options) else ""
            described = len(line.strip().split("  ")) > 1 or after.startswith(" " * 10)
            assert described, f"{' '.join(argv)}: {line.strip()} is not explained"


@pytest.mark.parametrize("command", ["genkey", "pubkey"])
def test_key_commands_answer_help_with_their_usage(command, monkeypatch, capsys):
    """`wgvsock genkey --help` printed a new private key, and `wgvsock pubkey --help` sat
    waiting for a key on the terminal."""
    monkeypatch.setattr(sys, "stdin", None)  # reading it would raise
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: wgvsock {command}")


def test_key_commands_refuse_arguments(capsys):
    assert cli.main(["genkey", "wg0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: wgvsock genkey" in err
    # What is wrong, not only the usage.
    assert "wgvsock genkey: takes no arguments, got 'wg0'" in err


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o606, True), (0o640, False),
                                              (0o600, False)])
def test_genkey_into_a_file_others_may_read_warns(tmp_path, mode, warned):
    """`wgvsock genkey > key` under the usual umask 022 wrote a private key everyone could
    read, without a word; wg(8)'s genkey warns (as it does, others' bits only)."""
    path = tmp_path / "key"
    path.touch(mode)
    os.chmod(path, mode)
    with open(path, "w") as out:
        res = run_with_stdout(["wgvsock.cli", "genkey"], out)
    assert res.returncode == 0 and len(path.read_text()) == 45  # the key is written all the same
    if warned:
        assert res.stderr == (f"wgvsock genkey: warning: {path} is open to other users (mode "
                              f"{mode:o}): they can read the private key written to it; set "
                              "`umask 077` and make it again\n")
    else:
        assert res.stderr == ""
    # Not a regular file (a pipe, a terminal): nothing to say.
    assert run_with_stdout(["wgvsock.cli", "genkey"], subprocess.PIPE).stderr == ""


def test_parent_up_help_says_where_a_background_parent_logs(capsys):
    """Without -f the parent's log goes to $WGVSOCK_LOG_FILE or nowhere, which only the
    daemon's environment table in the README said: `parent up --help` offered "-f: stay in
    the foreground", and an operator who left it out found no log of the enclave refused."""
    with pytest.raises(SystemExit):
        cli.main(["parent", "up", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "$WGVSOCK_LOG_FILE, or nowhere when it is unset" in out


def test_python_m_wgvsock_is_the_wgvsock_command():
    """`python -m wgvsock` said "No module named wgvsock.__main__; 'wgvsock' is a package and
    cannot be directly executed": where the `wgvsock` script is not on PATH (a venv not
    activated, sudo's secure_path) the module was no way in."""
    from wgvsock import __version__

    res = run_with_stdout(["wgvsock", "version"], subprocess.PIPE)
    assert (res.returncode, res.stdout, res.stderr) == (0, f"wgvsock {__version__}\n", "")
    res = run_with_stdout(["wgvsock", "--help"], subprocess.PIPE)
    assert res.returncode == 0 and res.stdout.startswith("usage: wgvsock COMMAND")


@pytest.mark.parametrize(("argv", "commands"), [
    (["parent"], "{up,down,reload,doctor}"), (["enclave"], "{up}"), (["attest"], "{verify,pcrs}"),
])
def test_a_missing_subcommand_is_named_by_its_choices(argv, commands, capsys):
    """`wgvsock parent` alone said "the following arguments are required: cmd": the name of
    a variable in the code, not one an operator can type."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # the roles' parsers exit, attest's returns
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert err.endswith(f"error: the following arguments are required: {commands}\n"), err


def test_enclave_usage_names_every_option_of_up(capsys):
    """`wgvsock enclave` printed a usage without -v, which `enclave up --help` lists."""
    with pytest.raises(SystemExit):
        cli.main(["enclave"])
    usage = capsys.readouterr().err.splitlines()[0]
    assert usage == ("usage: wgvsock enclave up --profile FILE [--timeout S] [--outside-enclave] "
                     "[-v] [-- CMD [ARGS...]]")


@pytest.mark.parametrize(("command", "said"), [
    ("down", "nothing was stopped or removed: no parent runs from this file or under the name "
             "it gives, and `down` reads the profile to know what else is its own. Fix it (or "
             "put back the file the parent was started with) and run `down` again"),
    ("reload", "nothing was reloaded: a running parent goes on with the profile it read "
               "before"),
])
def test_an_invalid_profile_says_what_down_and_reload_left_as_it_was(tmp_path, capsys,
                                                                      monkeypatch, command,
                                                                      said):
    """A profile edited with a typo, then `parent down`: "invalid profile: ...: unknown key"
    and exit 1, with the parent still running and nothing saying so (nor, for `reload`, that
    the running parent was untouched)."""
    monkeypatch.setenv("WGVSOCK_STATE_DIR", str(tmp_path / "state"))  # no parent runs
    path = tmp_path / "p.yaml"
    path.write_text("name: x\nparent:\n  egress:\n    alow: [0.0.0.0/0]\n")
    assert cli.main(["parent", command, "--profile", str(path)]) == 1
    assert capsys.readouterr().err == (
        f"invalid profile:\n{path}:4: parent.egress.alow: unknown key 'alow' — did you mean "
        f"'allow'?\n{said}\n")


def test_attest_verify_help_says_what_an_option_left_out_checks(capsys):
    """--pcr, --nonce, --public-key and --max-age said what they expect, not what happens
    without them (nothing compared, no age limit): an operator could take the document as
    checked against pins it never was."""
    assert cli.main(["attest", "verify", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for said in ("--pcr N=HEX expected PCR value (repeatable); default: PCRs are printed, not "
                 "compared",
                 "--nonce HEX expected nonce; default: not compared",
                 "--public-key B64 expected public key; default: not compared",
                 "now); default: no age limit"):
        assert said in out, out
