"""The nitro-cli wrapper and the enclave supervisor, against tests/fakes/nitro-cli (no root)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wgvsock.services import nitro
from wgvsock.services.nitro import (
    EnclaveInfo,
    EnclaveSupervisor,
    NitroCli,
    NitroError,
    enclave_name,
    is_named,
    launch_checks,
    parse_error,
    terminate_leftovers,
)
from wgvsock.services.profile import EnclaveLaunch, parse_profile

FAKES = Path(__file__).resolve().parent / "fakes"
FAKE = str(FAKES / "nitro-cli")

E26 = """\
Start allocating memory...
[ E26 ] Insufficient memory requested. User provided `memory` is 512 MB, but based on the EIF \
file size, the minimum memory should be 2148 MB

For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E26

If you open a support ticket, please provide the error log found at \
"/var/log/nitro_enclaves/err2021-06-18T21:46:43.249503129+00:00.log"
Failed connections: 1
[ E39 ] Enclave process connection failure. Such error appears when the enclave manager fails \
to connect to at least one enclave process for retrieving the description information.

For more details, please visit https://docs.aws.amazon.com/enclaves/latest/user/cli-errors.html#E39

If you open a support ticket, please provide the error log found at \
"/var/log/nitro_enclaves/err2021-06-18T21:46:43.249656960+00:00.log"
"""

RUN_OUTPUT = """\
Start allocating memory...
Started enclave with enclave-cid: 19, memory: 2048 MiB, cpu-ids: [1, 5]
{
  "EnclaveName": "vsock_poc",
  "EnclaveID": "i-0c3d696ac3c1f00dc-enc1802f51427d0db9",
  "ProcessID": 18647,
  "EnclaveCID": 19,
  "NumberOfCPUs": 2,
  "CPUIDs": [
    1,
    5
  ],
  "MemoryMiB": 2048
}
"""


class Fake:
    """The fake nitro-cli with its own state file."""

    def __init__(self, tmp: Path) -> None:
        self.state = tmp / "nitro-state.json"
        self.env = {**os.environ, "FAKE_NITRO_STATE": str(self.state)}
        self.cli = NitroCli(FAKE, env=self.env)
        self.eif = tmp / "app.eif"
        self.eif.write_bytes(b"EIF" * 1000)

    def hook(self, *args: str) -> str:
        return subprocess.run([FAKE, *args], env=self.env, capture_output=True, text=True,
                              check=True).stdout

    def enclaves(self) -> list[dict]:
        return json.loads(self.hook("describe-enclaves"))

    def calls(self) -> list[list[str]]:
        return json.loads(self.hook("fake-state"))["calls"]

    def launch(self, **kw) -> EnclaveLaunch:
        kw.setdefault("memory_mib", 256)
        return EnclaveLaunch(str(self.eif), **kw)


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "nitro-cli-script"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


# -- parsing ---------------------------------------------------------------------------------


def test_error_keeps_nitro_clis_own_words() -> None:
    err = parse_error(E26, returncode=26)
    assert err.code == "E26" and err.returncode == 26
    assert str(err).startswith("[ E26 ] Insufficient memory requested. User provided `memory` "
                               "is 512 MB")
    assert "minimum memory should be 2148 MB" in str(err)
    assert "; [ E39 ] Enclave process connection failure." in str(err)
    assert "For more details" not in str(err) and "support ticket" not in str(err)
    assert "Failed connections" not in str(err)
    assert err.log_path == "/var/log/nitro_enclaves/err2021-06-18T21:46:43.249503129+00:00.log"


def test_error_block_spans_its_lines() -> None:
    stderr = ("[ E19 ] File operation failure.\nFile: '/x.eif', failing operation: 'Open'.\n\n"
              "For more details, please visit https://x#E19\n")
    assert str(parse_error(stderr)) == ("[ E19 ] File operation failure. "
                                        "File: '/x.eif', failing operation: 'Open'.")


def test_error_without_an_e_code() -> None:
    assert str(parse_error("error: unexpected argument '--bogus' found\n", "", 2)) == \
        "error: unexpected argument '--bogus' found"
    assert str(parse_error("", "", 3)) == "nitro-cli exited with status 3"
    assert parse_error("boom").code is None


# What clap prints for a command line it refuses: clap 2.33 (nitro-cli 1.0, which has no
# --enclave-name), clap 3.2 and clap 4 (nitro-cli 1.4 and later).
CLAP2_UNKNOWN = """\
error: Found argument '--enclave-name' which wasn't expected, or isn't valid in this context

USAGE:
    nitro-cli run-enclave [FLAGS] [OPTIONS] --cpu-count <cpu-count> --eif-path <eif-path> \
--memory <memory>

For more information try --help
"""
CLAP3_MISSING = """\
error: The following required arguments were not provided:
    --memory <memory>

USAGE:
    nitro-cli run-enclave --cpu-count <cpu-count> --eif-path <eif-path> --memory <memory>

For more information try --help
"""
CLAP4_UNKNOWN = """\
\x1b[1m\x1b[31merror:\x1b[0m unexpected argument '\x1b[33m--bogus\x1b[0m' found

  \x1b[32mtip:\x1b[0m to pass '--bogus' as a value, use '-- --bogus'

Usage: nitro-cli run-enclave [OPTIONS] --eif-path <EIF_PATH>

For more information, try '--help'.
"""


def test_clap_errors_keep_the_error_line_not_the_usage() -> None:
    err = parse_error(CLAP2_UNKNOWN, "", 1)
    assert str(err) == ("error: Found argument '--enclave-name' which wasn't expected, or isn't "
                        "valid in this context; nitro-cli before 1.1 has no --enclave-name: "
                        "upgrade aws-nitro-enclaves-cli")
    assert err.code is None and err.returncode == 1
    assert str(parse_error(CLAP3_MISSING, "", 2)) == \
        "error: The following required arguments were not provided: --memory <memory>"
    assert str(parse_error(CLAP4_UNKNOWN, "", 2)) == "error: unexpected argument '--bogus' found"
    # Without an "error:" line, the last lines as before.
    assert str(parse_error("a\nb\nc\nd\n", "", 1)) == "b c d"


def test_run_output_parses_with_progress_lines_around_it() -> None:
    info = EnclaveInfo.from_json(nitro._json_from(RUN_OUTPUT, dict))
    assert info.enclave_id == "i-0c3d696ac3c1f00dc-enc1802f51427d0db9"
    assert info.cid == 19 and info.name == "vsock_poc" and info.process_id == 18647
    assert info.cpu_ids == (1, 5) and info.cpu_count == 2 and info.memory_mib == 2048
    assert info.state is None and not info.debug


def test_older_output_without_name_or_pid() -> None:
    info = EnclaveInfo.from_json({"EnclaveID": "i-1-enc2", "EnclaveCID": 16,
                                  "NumberOfCPUs": 2, "CPUIDs": [1, 3], "MemoryMiB": 512})
    assert info.name is None and info.process_id is None and info.cid == 16


@pytest.mark.parametrize("obj", [
    {"EnclaveCID": 16},
    {"EnclaveID": "", "EnclaveCID": 16},
    {"EnclaveID": "i-1-enc2"},
    {"EnclaveID": "i-1-enc2", "EnclaveCID": "16"},
    {"EnclaveID": "i-1-enc2", "EnclaveCID": True},
    ["EnclaveID"],
])
def test_malformed_enclave_json_is_refused(obj) -> None:
    with pytest.raises(NitroError):
        EnclaveInfo.from_json(obj)


@pytest.mark.parametrize("stdout", ["", "not json", "[1, 2]", '"text"', "{ broken"])
def test_no_json_object_is_an_error(stdout: str) -> None:
    with pytest.raises(NitroError, match="no JSON dict"):
        nitro._json_from(stdout, dict)


def test_names() -> None:
    assert enclave_name("payments") == "wgvsock-payments"
    assert is_named("wgvsock-payments", "wgvsock-payments")
    assert is_named("wgvsock-payments_2", "wgvsock-payments")
    assert not is_named("wgvsock-payments-2", "wgvsock-payments")
    assert not is_named("wgvsock-pay", "wgvsock-payments")
    assert not is_named(None, "wgvsock-payments")


def test_run_args() -> None:
    args = NitroCli.run_args(EnclaveLaunch("/opt/app.eif", 4, 2048, 16, True), "wgvsock-a")
    assert args == ["run-enclave", "--eif-path", "/opt/app.eif", "--cpu-count", "4",
                    "--memory", "2048", "--enclave-cid", "16", "--debug-mode",
                    "--enclave-name", "wgvsock-a"]
    assert "--enclave-cid" not in NitroCli.run_args(EnclaveLaunch("/a.eif"))
    assert "--debug-mode" not in NitroCli.run_args(EnclaveLaunch("/a.eif"))


# -- the wrapper against the fake ------------------------------------------------------------


def test_run_describe_terminate(fake: Fake) -> None:
    info = fake.cli.run_enclave(fake.launch(), "wgvsock-t")
    assert info.cid == 16 and info.name == "wgvsock-t" and info.memory_mib == 256
    assert info.cpu_count == 2 and len(info.cpu_ids) == 2
    second = fake.cli.run_enclave(fake.launch(cid=42, debug=True, cpu_count=2), "wgvsock-t")
    assert second.cid == 42 and second.name == "wgvsock-t_1"
    listed = fake.cli.describe_enclaves()
    assert [e["EnclaveID"] for e in listed] == [info.enclave_id, second.enclave_id]
    assert [e["State"] for e in listed] == ["RUNNING", "RUNNING"]
    assert [e["Flags"] for e in listed] == ["NONE", "DEBUG_MODE"]
    assert fake.cli.enclaves()[1].debug
    out = fake.cli.terminate_enclave(info.enclave_id)
    assert out["EnclaveID"] == info.enclave_id and out["Terminated"] is True
    assert [e.enclave_id for e in fake.cli.enclaves()] == [second.enclave_id]
    run_call = fake.calls()[1]
    assert run_call[:2] == ["run-enclave", "--eif-path"]
    assert "--debug-mode" in run_call and run_call[run_call.index("--enclave-cid") + 1] == "42"


def test_run_errors_carry_the_e_code(fake: Fake, tmp_path: Path) -> None:
    with pytest.raises(NitroError) as exc:
        fake.cli.run_enclave(EnclaveLaunch(str(tmp_path / "missing.eif")))
    # run-enclave's enclave process fails and tells the client, which then finds no answer
    # and fails with E39: the cause's block comes first (main.rs, enclave_proc_comm.rs).
    assert exc.value.code == "E19" and exc.value.returncode == 39
    assert "missing.eif" in str(exc.value)
    big = tmp_path / "big.eif"
    with open(big, "wb") as f:
        f.truncate(512 << 20)  # sparse: 4x is 2048 MiB
    with pytest.raises(NitroError, match=r"^\[ E26 \] Insufficient memory requested") as exc:
        fake.cli.run_enclave(EnclaveLaunch(str(big), memory_mib=1024))
    assert "the minimum memory should be 2048 MB" in str(exc.value)
    assert exc.value.returncode == 39
    fake.cli.run_enclave(fake.launch(cid=20))
    with pytest.raises(NitroError, match=r"^\[ E29 \]"):
        fake.cli.run_enclave(fake.launch(cid=20))
    # An ID with no enclave has no socket to connect to: the real nitro-cli answers E11.
    with pytest.raises(NitroError, match=r"^\[ E11 \] Socket error") as exc:
        fake.cli.terminate_enclave("i-0000000000000000-enc99")
    assert exc.value.code == "E11" and exc.value.returncode == 11
    # A bad command line is clap's: "error: ..." and status 2.
    res = subprocess.run([FAKE, "terminate-enclave", "--enclave-id"], env=fake.env,
                         capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.startswith("error: a value is required")
    res = subprocess.run([FAKE, "run-enclave", "--eif-path", str(fake.eif), "--cpu-count", "2"],
                         env=fake.env, capture_output=True, text=True)
    assert res.returncode == 2 and "required arguments were not provided" in res.stderr
    assert "--memory" in res.stderr
    # The client itself refuses a well-known CID (commands_parser.rs): E03, its own status.
    with pytest.raises(NitroError, match=r"^\[ E03 \]") as exc:
        fake.cli.run_enclave(fake.launch(cid=3))
    assert exc.value.returncode == 3


def test_a_failed_run_enclave_prints_what_the_real_one_does(fake: Fake, tmp_path: Path
                                                             ) -> None:
    """The fake exited with the cause's own number (26, 36, ...) and printed its block alone;
    the real client prints the enclave process's block, "Failed connections: 1" and E39's,
    and exits 39 (aws-nitro-enclaves-cli issues 232, 516, 644 show such output)."""
    res = subprocess.run([FAKE, *NitroCli.run_args(EnclaveLaunch(str(tmp_path / "no.eif")))],
                         env=fake.env, capture_output=True, text=True)
    assert res.returncode == 39 and res.stdout == ""
    cause, _, rest = res.stderr.partition("Failed connections: 1\n")
    assert cause.startswith("[ E19 ] File operation failure.") and "#E19" in cause
    assert rest.startswith("[ E39 ] Enclave process connection failure.") and "#E39" in rest
    assert parse_error(res.stderr, "", res.returncode).code == "E19"


def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(NitroError, match="not found: install aws-nitro-enclaves-cli"):
        NitroCli(str(tmp_path / "nitro-cli")).describe_enclaves()
    with pytest.raises(NitroError, match="not found"):
        NitroCli("wgvsock-no-such-nitro-cli").describe_enclaves()


def test_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "nitro-cli"
    path.write_text("#!/bin/sh\n")
    with pytest.raises(NitroError, match="cannot run"):
        NitroCli(str(path)).describe_enclaves()


def test_bad_json_and_failures_without_codes(tmp_path: Path) -> None:
    with pytest.raises(NitroError, match="printed no JSON list"):
        NitroCli(script(tmp_path, "echo '{\"a\": 1}'")).describe_enclaves()
    with pytest.raises(NitroError, match="a list of something else"):
        NitroCli(script(tmp_path, "echo '[1]'")).describe_enclaves()
    with pytest.raises(NitroError, match="did not terminate"):
        NitroCli(script(tmp_path, "echo '{\"EnclaveID\": \"x\", \"Terminated\": false}'")
                 ).terminate_enclave("x")
    with pytest.raises(NitroError, match=r"^Could not open /dev/nitro_enclaves$") as exc:
        NitroCli(script(tmp_path, "echo 'Could not open /dev/nitro_enclaves' >&2; exit 1")
                 ).describe_enclaves()
    assert exc.value.returncode == 1 and exc.value.code is None


def test_timeout(tmp_path: Path) -> None:
    cli = NitroCli(script(tmp_path, "exec sleep 5"), timeout=0.3)
    with pytest.raises(NitroError, match=r"`nitro-cli describe-enclaves` did not finish"):
        cli.describe_enclaves()


def test_terminate_leftovers(fake: Fake) -> None:
    a = fake.cli.run_enclave(fake.launch(cpu_count=1), "wgvsock-x")
    b = fake.cli.run_enclave(fake.launch(cpu_count=1), "wgvsock-x")  # becomes wgvsock-x_1
    other = fake.cli.run_enclave(fake.launch(cpu_count=1), "someone-else")
    recorded = fake.cli.run_enclave(fake.launch(cpu_count=1), "renamed-by-hand")
    done, failed = terminate_leftovers(fake.cli, "wgvsock-x",
                                       [recorded.enclave_id, "i-gone-enc1"])
    assert sorted(done) == sorted(f"terminated enclave {e.enclave_id}"
                                  for e in (a, b, recorded))
    assert failed == []  # the gone one's E11 is no failure: nothing is left of it
    assert [e["EnclaveID"] for e in fake.enclaves()] == [other.enclave_id]
    assert terminate_leftovers(fake.cli, "wgvsock-x") == ([], [])


def test_terminate_leftovers_when_describe_lists_only_some(fake: Fake) -> None:
    """describe-enclaves prints the enclaves that answered, then fails with E39: those named
    ours still go, and the recorded one is tried though it is not listed."""
    a = fake.cli.run_enclave(fake.launch(cpu_count=1), "wgvsock-x")
    other = fake.cli.run_enclave(fake.launch(cpu_count=1), "someone-else")
    recorded = fake.cli.run_enclave(fake.launch(cpu_count=1), "wgvsock-x")
    cli = NitroCli(FAKE, env={**fake.env, "FAKE_NITRO_NO_ANSWER": recorded.enclave_id})
    with pytest.raises(NitroError, match=r"^\[ E39 \]") as exc:
        cli.describe_enclaves()
    assert exc.value.returncode == 39
    assert [e.enclave_id for e in nitro.listed_before_failing(exc.value) or []] == \
        [a.enclave_id, other.enclave_id]
    done, failed = terminate_leftovers(cli, "wgvsock-x", [recorded.enclave_id])
    assert done == [f"terminated enclave {recorded.enclave_id}",
                    f"terminated enclave {a.enclave_id}"]
    assert len(failed) == 1 and "listed only the enclaves that answered ([ E39 ]" in failed[0]
    assert [e["EnclaveID"] for e in fake.enclaves()] == [other.enclave_id]


def test_terminate_leftovers_tries_the_recorded_one_when_describe_fails(fake: Fake,
                                                                         tmp_path: Path) -> None:
    recorded = fake.cli.run_enclave(fake.launch(cpu_count=1), "wgvsock-x")
    cli = NitroCli(script(tmp_path, 'if [ "$1" = describe-enclaves ]; then echo "[ E39 ] '
                          'Enclave process connection failure." >&2; exit 39; fi\n'
                          f'exec {FAKE} "$@"'), env=fake.env)
    done, failed = terminate_leftovers(cli, "wgvsock-x", [recorded.enclave_id, "i-gone-enc1"])
    assert done == [f"terminated enclave {recorded.enclave_id}"]
    assert failed == ["could not list the enclaves to look for leftovers named wgvsock-x: "
                      "[ E39 ] Enclave process connection failure."]
    assert fake.enclaves() == []


# -- the supervisor --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def supervisor(fake: Fake, caplog, **kw) -> EnclaveSupervisor:
    kw.setdefault("poll_interval", 0.1)
    kw.setdefault("backoff_min", 0.01)
    kw.setdefault("backoff_max", 0.04)
    kw.setdefault("stable_after", 60.0)
    caplog.set_level(logging.INFO, logger="wgvsock.test")
    return EnclaveSupervisor(fake.cli, kw.pop("launch", None) or fake.launch(cid=21),
                             "wgvsock-sup", kw.pop("on_started", None),
                             logging.getLogger("wgvsock.test"), **kw)


def wait(predicate, timeout: float = 10.0) -> None:
    done = threading.Event()
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return
        done.wait(0.02)
    raise AssertionError("timed out")


def test_starts_reads_the_cid_and_stops(fake: Fake, caplog) -> None:
    seen: list[EnclaveInfo] = []
    sup = supervisor(fake, caplog, on_started=seen.append)
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None and info.cid == 21 and info.name == "wgvsock-sup"
        wait(lambda: seen)
        assert seen == [info]
        assert [e["EnclaveID"] for e in fake.enclaves()] == [info.enclave_id]
    finally:
        sup.stop(timeout=10)
    assert fake.enclaves() == []
    assert sup.info is None and sup.starts == 1
    assert "started: i-0fa4e0000000f4e5-enc1, CID 21" in caplog.text


def test_restarts_an_enclave_that_exits_and_says_why(fake: Fake, caplog) -> None:
    sup = supervisor(fake, caplog, launch=fake.launch())
    sup.start()
    try:
        first = sup.wait_started()
        assert first is not None
        fake.hook("fake-crash", first.enclave_id)
        second = sup.wait_started(2)
        assert second is not None and second.enclave_id != first.enclave_id
        assert [e["EnclaveID"] for e in fake.enclaves()] == [second.enclave_id]
        assert sup.last_reason == "exited (describe-enclaves no longer lists it)"
        assert f"({first.enclave_id}, CID 16) exited" in caplog.text
        assert "restarting in 10 ms" in caplog.text
    finally:
        sup.stop(timeout=10)
    assert fake.enclaves() == []


def test_run_enclave_failures_back_off_exponentially(fake: Fake, caplog) -> None:
    fake.hook("fake-fail-run", "4", "E26")
    sup = supervisor(fake, caplog)
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None
        assert sup.delays == [0.01, 0.02, 0.04, 0.04]  # capped at backoff_max
        assert sup.last_reason is not None
        assert sup.last_reason.startswith("run-enclave failed: [ E26 ] Insufficient memory")
        assert "retrying in 20 ms" in caplog.text
        # the failures count towards the backoff of the next exit too
        fake.hook("fake-crash", info.enclave_id)
        assert sup.wait_started(2) is not None
        assert sup.delays[-1] == 0.04
    finally:
        sup.stop(timeout=10)


def test_backoff_resets_after_a_stable_run(fake: Fake, caplog) -> None:
    clock = Clock()
    sup = supervisor(fake, caplog, clock=clock, stable_after=60.0, backoff_max=1.0)
    sup.start()
    try:
        for n in range(1, 4):  # three quick exits: 10, 20, 40 ms
            info = sup.wait_started(n)
            assert info is not None
            fake.hook("fake-crash", info.enclave_id)
        info = sup.wait_started(4)
        assert info is not None
        assert sup.delays == [0.01, 0.02, 0.04]
        clock.now += 61  # this one ran "a minute": the next restart is quick again
        fake.hook("fake-crash", info.enclave_id)
        assert sup.wait_started(5) is not None
        assert sup.delays == [0.01, 0.02, 0.04, 0.01]
    finally:
        sup.stop(timeout=10)


def test_stop_during_backoff_is_prompt(fake: Fake, caplog) -> None:
    fake.hook("fake-fail-run", "1", "E27")
    sup = supervisor(fake, caplog, backoff_min=30.0, backoff_max=60.0)
    sup.start()
    wait(lambda: sup.delays)
    stopper = threading.Thread(target=sup.stop, kwargs={"timeout": 5})
    stopper.start()
    stopper.join(2)
    assert not stopper.is_alive()
    assert sup.starts == 0 and fake.enclaves() == []
    assert "run-enclave failed: [ E27 ] Insufficient memory available" in caplog.text


def test_terminates_a_leftover_under_its_name_first(fake: Fake, caplog) -> None:
    old = fake.cli.run_enclave(fake.launch(cid=21), "wgvsock-sup")
    sup = supervisor(fake, caplog)  # wants CID 21 too: only possible once the old one is gone
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None and info.cid == 21 and info.enclave_id != old.enclave_id
        assert f"terminating {old.enclave_id} left running by an earlier parent" in caplog.text
        assert sup.delays == []
    finally:
        sup.stop(timeout=10)


def test_describe_failures_do_not_restart(fake: Fake, caplog, tmp_path: Path) -> None:
    sup = supervisor(fake, caplog)
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None
        sup.nitro = NitroCli(script(tmp_path, "echo '[ E39 ] Enclave process connection "
                                              "failure.' >&2; exit 1"))
        wait(lambda: "describe-enclaves failed (1 in a row): [ E39 ]" in caplog.text)
        assert sup.starts == 1 and sup.info == info
        sup.nitro = fake.cli
    finally:
        sup.stop(timeout=10)
    assert fake.enclaves() == []


def test_an_on_started_error_is_logged_not_fatal(fake: Fake, caplog) -> None:
    def boom(_info: EnclaveInfo) -> None:
        raise RuntimeError("callback broke")

    sup = supervisor(fake, caplog, on_started=boom)
    sup.start()
    try:
        assert sup.wait_started() is not None
        wait(lambda: "on_started failed" in caplog.text)
        assert len(fake.enclaves()) == 1
    finally:
        sup.stop(timeout=10)


def _launching_parent(fake: Fake, monkeypatch, bin_dir: Path, **supervisor: float) -> Any:
    """A Parent whose profile has it launch the enclave, through the nitro-cli found first in
    BIN_DIR (the fake, or a wrapper of it), its supervisor's timings SUPERVISOR."""
    from functools import partial

    from wgvsock.roles.parent import Parent

    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("FAKE_NITRO_STATE", str(fake.state))
    monkeypatch.setattr(nitro, "EnclaveSupervisor", partial(EnclaveSupervisor, **supervisor))
    return Parent(parse_profile(f"name: cidtest\nparent:\n  enclave: {{eif: {fake.eif}, "
                                "memory_mib: 256}\n", "p.yaml"))


def test_the_control_port_forgets_the_cid_of_an_enclave_that_exited(fake: Fake, monkeypatch
                                                                    ) -> None:
    """Without a fixed CID the control port takes the CID nitro-cli reported. Once that enclave
    has exited, the CID is free for another enclave during the restart's backoff: refuse it."""
    p = _launching_parent(fake, monkeypatch, FAKES, poll_interval=0.05, backoff_min=0.05,
                          backoff_max=0.05)
    check = p._enclave_filter()
    assert check is not None
    p._start_enclave()
    try:
        info = p.supervisor.wait_started()
        assert info is not None and check((info.cid, 1)) is None
        fake.hook("fake-fail-run", "100000", "E26")  # keep it from starting again
        fake.hook("fake-crash", info.enclave_id)
        wait(lambda: (p.supervisor.last_reason or "").startswith("run-enclave failed"))
        assert check((info.cid, 1))
    finally:
        p.supervisor.stop()


@pytest.fixture
def processes(fake: Fake, monkeypatch) -> Iterator[Fake]:
    """The fake with a real process for each enclave's nitro-cli enclave process."""
    fake.env["FAKE_NITRO_ENCLAVE_PROCESS"] = "1"
    monkeypatch.setenv("FAKE_NITRO_ENCLAVE_PROCESS", "1")
    yield fake
    # A test that failed before its supervisor terminated them (or a supervisor that died)
    # would leave their stand-in processes sleeping for 10 minutes.
    fake.hook("fake-crash", "all")


def test_the_old_cid_is_refused_as_soon_as_the_enclave_process_ends(processes: Fake,
                                                                     monkeypatch) -> None:
    """Before: the check admitted an exited enclave's CID until the describe-enclaves poll
    (every 2 s) found it gone, while nitro-cli could give that CID to another enclave. Its
    nitro-cli enclave process ends with it, before the CID is free: the check now asks that
    process (a pidfd), so the CID is refused at once; here the poll is an hour away."""
    fake = processes
    p = _launching_parent(fake, monkeypatch, FAKES, poll_interval=3600.0, backoff_min=3600.0)
    check = p._enclave_filter()
    assert check is not None
    p._start_enclave()
    try:
        info = p.supervisor.wait_started()
        assert info is not None and check((info.cid, 1)) is None
        fake.hook("fake-crash", info.enclave_id)  # returns once its process has ended
        assert "expected none" in (check((info.cid, 1)) or "")
    finally:
        p.supervisor.stop()


def test_the_status_says_why_as_soon_as_the_enclave_process_ends(processes: Fake, monkeypatch,
                                                                 tmp_path: Path) -> None:
    """Before: from the enclave process's end until the supervisor's describe-enclaves call
    returned (at most its timeout), `info` was None but last_reason still the one before:
    systemd's status line and `wgvsock status` said "enclave not running: run-enclave failed:
    ... set parent.enclave.memory_mib ..." of a failure long fixed."""
    fake = processes
    hold = tmp_path / "hold-describe"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "nitro-cli"
    # describe-enclaves waits while HOLD exists: the supervisor's call after the exit, held.
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = describe-enclaves ]; then\n'
                       f'  while [ -e "{hold}" ]; do sleep 0.02; done\nfi\n'
                       f'exec "{FAKE}" "$@"\n')
    wrapper.chmod(0o755)
    p = _launching_parent(fake, monkeypatch, bin_dir, poll_interval=3600.0, backoff_min=0.01)
    fake.hook("fake-fail-run", "1", "E27")
    p._start_enclave()
    try:
        info = p.supervisor.wait_started()
        assert info is not None and p.supervisor.last_reason.startswith("run-enclave failed")
        hold.touch()
        fake.hook("fake-crash", info.enclave_id)  # returns once its process has ended
        assert p.supervisor.info is None
        assert p.status_line(0) == ("wg0 up; enclave not running: exited (its enclave process "
                                    f"{info.process_id} ended)")
        assert p._status_keys()["wgvsock_enclave_down"] == \
            f"exited (its enclave process {info.process_id} ended)"
    finally:
        hold.unlink(missing_ok=True)
        p.supervisor.stop()


def test_the_supervisor_learns_of_an_exit_from_the_enclave_process(processes: Fake,
                                                                   caplog) -> None:
    """Before: only the describe-enclaves poll told it, up to poll_interval later."""
    fake = processes
    sup = supervisor(fake, caplog, launch=fake.launch(), poll_interval=3600.0)
    sup.start()
    try:
        first = sup.wait_started()
        assert first is not None and first.process_id
        fake.hook("fake-crash", first.enclave_id)
        assert sup.info is None
        second = sup.wait_started(2)
        assert second is not None and second.enclave_id != first.enclave_id
        assert sup.last_reason == f"exited (its enclave process {first.process_id} ended)"
        assert sup.info == second
    finally:
        sup.stop(timeout=10)
    assert fake.enclaves() == []


def test_a_process_id_that_is_not_the_enclaves_leaves_the_watch_to_the_poll(processes: Fake,
                                                                           caplog) -> None:
    """ProcessID names a process that ends while nitro-cli still lists the enclave (nitro-cli
    run in another PID namespace, say): refused meanwhile, the enclave is kept, and the poll
    alone tells from then on. Before: the warning came before the watch was dropped, so one
    who read it (this test) could still find the enclave refused."""
    fake = processes
    sup = supervisor(fake, caplog, poll_interval=0.2)
    said: list[EnclaveInfo | None] = []

    class AtTheWarning(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "but nitro-cli still lists" in record.getMessage():
                said.append(sup.info)  # what an accept would find as the line is written

    handler = AtTheWarning()
    sup.log.addHandler(handler)
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None and info.process_id
        os.kill(info.process_id, signal.SIGKILL)  # the process alone: the enclave stays listed
        wait(lambda: said)
        assert said == [info]
        assert sup.info == info and sup.starts == 1
        assert f"process {info.process_id} ended, but nitro-cli still lists " \
               f"{info.enclave_id} as running: watching it by describe-enclaves only, " \
               "every 0.2 s" in caplog.text
        fake.hook("fake-crash", info.enclave_id)
        assert sup.wait_started(2) is not None
        assert sup.last_reason == "exited (describe-enclaves no longer lists it)"
    finally:
        sup.log.removeHandler(handler)
        sup.stop(timeout=10)


def test_an_enclave_process_gone_before_the_watch_is_polled_at_once(processes: Fake, caplog,
                                                                    tmp_path: Path) -> None:
    """The enclave ends (its process with it) between run-enclave's JSON and pidfd_open.
    Before: "no such process" read as "cannot be watched": its CID was let in, and the exit
    learnt, only at the next describe-enclaves poll, poll_interval later (here an hour), while
    nitro-cli could give the CID to another enclave. Now, with nothing to watch, the first
    poll is made at once."""
    fake = processes
    once = tmp_path / "crashed"
    # The first enclave ends before run-enclave's JSON is read, its process reaped (where
    # init reaps; here it may stay a zombie, which reads as ended): a ProcessID of no process.
    body = r"""out=$("FAKE" "$@") || exit $?
if [ "$1" = run-enclave ] && [ ! -e "ONCE" ]; then
  touch "ONCE"
  id=$(printf '%s' "$out" | sed -n 's/.*"EnclaveID": "\([^"]*\)".*/\1/p')
  "FAKE" fake-crash "$id" >/dev/null
  out=$(printf '%s' "$out" | sed 's/"ProcessID": [0-9]*/"ProcessID": 4194304/')
fi
printf '%s\n' "$out"
"""
    cli = script(tmp_path, body.replace("FAKE", FAKE).replace("ONCE", str(once)))
    sup = supervisor(fake, caplog, launch=fake.launch(), poll_interval=3600.0)
    sup.nitro = NitroCli(cli, env=fake.env)
    sup.start()
    try:
        first = sup.wait_started()
        assert first is not None and first.process_id == 1 << 22
        second = sup.wait_started(2, timeout=5)
        assert second is not None and second.enclave_id != first.enclave_id
        assert sup.last_reason == "exited (describe-enclaves no longer lists it)"
        assert sup.info == second and sup._process is not None  # watched: it has its process
    finally:
        sup.stop(timeout=10)
    assert fake.enclaves() == []


def test_without_a_process_to_watch_the_poll_tells(fake: Fake, caplog) -> None:
    """nitro-cli before 1.0 prints no ProcessID; a kernel before 5.3 has no pidfd."""
    assert nitro.EnclaveProcess.watch(None) == (
        None, "nitro-cli printed no ProcessID (nitro-cli before 1.0 prints none)")
    assert nitro.EnclaveProcess.watch(1 << 22)[0] is None  # no such process
    sup = supervisor(fake, caplog)
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None and sup._process is None
        assert sup.info == info
    finally:
        sup.stop(timeout=10)


def test_a_process_id_that_names_an_unrelated_process_is_not_watched(processes: Fake,
                                                                     caplog,
                                                                     tmp_path: Path) -> None:
    """ProcessID of another PID namespace (nitro-cli run by a wrapper in a container) names
    some unrelated process here. Before: that process was watched as the enclave's, so when
    it ended the enclave's CID was refused at once and, describe-enclaves failing meanwhile,
    the healthy enclave was restarted. Now a process is watched only if its command line
    carries our run-enclave's arguments (nitro-cli forks its enclave process from run-enclave
    without an exec); this one is not, and the poll alone tells, as a line says."""
    fake = processes
    stranger = subprocess.Popen(["sleep", "600"])
    failures = tmp_path / "describe-failures"
    try:
        cli = script(tmp_path, f'if [ "$1" = run-enclave ]; then "{FAKE}" "$@" | sed '
                     f"'s/\"ProcessID\": [0-9]*/\"ProcessID\": {stranger.pid}/'; "
                     f'else exec "{FAKE}" "$@"; fi')
        failing = tmp_path / "failing"
        failing.write_text(f"#!/bin/sh\necho x >> {failures}\n"
                           "echo '[ E39 ] Enclave process connection failure.' >&2; exit 1\n")
        failing.chmod(0o755)
        sup = supervisor(fake, caplog, launch=fake.launch(), poll_interval=0.05)
        sup.nitro = NitroCli(cli, env=fake.env)
        sup.start()
        try:
            info = sup.wait_started()
            assert info is not None and info.process_id == stranger.pid
            assert sup._process is None
            said = (f"enclave wgvsock-sup: its exit is known by describe-enclaves only, every "
                    f"50 ms: process {stranger.pid} (sleep) is not the enclave process of our "
                    "run-enclave (nitro-cli runs in another PID namespace?)")
            wait(lambda: said in caplog.text)  # (it follows the start's own line)
            sup.nitro = NitroCli(str(failing))
            wait(lambda: failures.exists())
            stranger.kill()
            stranger.wait()
            seen = len(failures.read_text().splitlines())
            # Two polls after the end: the first could have begun before it.
            wait(lambda: len(failures.read_text().splitlines()) >= seen + 2)
            assert sup.info == info and sup.starts == 1 and sup.last_reason is None
            sup.nitro = fake.cli
        finally:
            sup.stop(timeout=10)
    finally:
        stranger.kill()
        stranger.wait()
    assert fake.enclaves() == []


@pytest.mark.root
def test_a_process_whose_command_line_is_hidden_is_said_so(tmp_path: Path) -> None:
    """A running process whose /proc entry is hidden from the watcher (/proc mounted with
    hidepid=invisible, the watcher not root) cannot be checked: it is left to the poll, and
    the line says its command line could not be read. Before: the same, but said as 'process
    N (?) is not the enclave process of our run-enclave (nitro-cli runs in another PID
    namespace?)', blaming a namespace where /proc was the cause."""
    enclave = subprocess.Popen(["sleep", "600"])
    probe = ("import sys; from wgvsock.services.nitro import EnclaveProcess; "
             "p, why = EnclaveProcess.watch(int(sys.argv[1]), ['sleep', '600']); "
             "print(p is None, why)")
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c",
             'mount -t proc -o hidepid=invisible proc /proc && exec setpriv --reuid=65534 '
             '--regid=65534 --clear-groups "$@"', "sh", sys.executable, "-c", probe,
             str(enclave.pid)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(root)})
    finally:
        enclave.kill()
        enclave.wait()
    assert out.returncode == 0, out.stderr
    assert out.stdout == (f"True process {enclave.pid}'s command line cannot be read, so it "
                          "cannot be told to be the enclave process "
                          f"(/proc/{enclave.pid}/cmdline: No such file or directory)\n")


def test_a_run_enclave_without_a_process_id_is_watched_by_the_poll(fake: Fake, caplog,
                                                                   tmp_path: Path) -> None:
    """nitro-cli before 1.0 prints no ProcessID: the enclave runs, its exit is learnt from
    describe-enclaves, and one line says so. Before: the same, but nothing said why the exit
    was known only a poll later."""
    cli = script(tmp_path, f'if [ "$1" = run-enclave ]; then "{FAKE}" "$@" | '
                 "sed '/\"ProcessID\"/d'; "
                 f'else exec "{FAKE}" "$@"; fi')
    sup = supervisor(fake, caplog, launch=fake.launch(), poll_interval=0.05)
    sup.nitro = NitroCli(cli, env=fake.env)
    sup.start()
    try:
        first = sup.wait_started()
        assert first is not None and first.process_id is None and first.cid == 16
        assert sup._process is None and sup.info == first
        fake.hook("fake-crash", first.enclave_id)
        second = sup.wait_started(2)
        assert second is not None and second.enclave_id != first.enclave_id
        assert sup.last_reason == "exited (describe-enclaves no longer lists it)"

        def lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if "ProcessID" in r.getMessage()]

        wait(lambda: len(lines()) == 2)  # one for each enclave started
    finally:
        sup.stop(timeout=10)
    assert lines()[0] == ("enclave wgvsock-sup: its exit is known by describe-enclaves only, "
                          "every 50 ms: nitro-cli printed no ProcessID (nitro-cli before 1.0 "
                          "prints none)")
    assert len(lines()) == 2
    assert fake.enclaves() == []


def test_a_process_id_no_pid_can_have_leaves_the_watch_to_the_poll(fake: Fake, caplog,
                                                                   tmp_path: Path) -> None:
    """Before: a ProcessID above 2**31 - 1 (nitro-cli's is a u32; the kernel's pids stop at
    2**22) made pidfd_open raise OverflowError, which nothing caught: the supervisor's thread
    died before it published the enclave, and with it `parent up` (the thread-death hook)."""
    cli = script(tmp_path, f'if [ "$1" = run-enclave ]; then "{FAKE}" "$@" | sed '
                 "'s/\"ProcessID\": [0-9]*/\"ProcessID\": 4294967295/'; "
                 f'else exec "{FAKE}" "$@"; fi')
    assert nitro.EnclaveProcess.watch(4294967295) == (
        None, "nitro-cli's ProcessID 4294967295 is no process's")
    sup = supervisor(fake, caplog)
    sup.nitro = NitroCli(cli, env=fake.env)
    sup.start()
    try:
        info = sup.wait_started(timeout=5)
        assert info is not None and info.process_id == 4294967295
        assert sup._process is None and sup.info == info
    finally:
        sup.stop(timeout=10)
    assert "supervisor failed" not in caplog.text
    assert fake.enclaves() == []


# -- checks (doctor and `parent up`) ---------------------------------------------------------


def _checks(launch: EnclaveLaunch, path: str = FAKE) -> dict[str, tuple[bool, str]]:
    return {name: (ok, detail) for name, ok, detail in launch_checks(launch, path)}


def test_launch_checks(fake: Fake, tmp_path: Path) -> None:
    ok = _checks(fake.launch())
    assert ok["nitro-cli"] == (True, FAKE)
    assert ok["enclave image"][0] and str(fake.eif) in ok["enclave image"][1]
    assert ok["enclave memory"][0]
    missing = _checks(EnclaveLaunch(str(tmp_path / "gone.eif")), "wgvsock-no-such-nitro-cli")
    assert missing["nitro-cli"][0] is False and "install aws-nitro-enclaves-cli" in \
        missing["nitro-cli"][1]
    assert missing["enclave image"][0] is False and "No such file" in missing["enclave image"][1]
    big = tmp_path / "big.eif"
    with open(big, "wb") as f:
        f.truncate(300 << 20)
    small = _checks(EnclaveLaunch(str(big), memory_mib=256))
    assert small["enclave memory"][0] is False and "at least 1200" in small["enclave memory"][1]
    # Between 1x and 4x the EIF nitro-cli always refuses: the check must say so, not pass.
    tight = _checks(EnclaveLaunch(str(big), memory_mib=512))
    assert tight["enclave memory"] == (False, "memory_mib 512 is less than 4x the EIF (300 MiB): "
                                       "nitro-cli refuses it (E26); set "
                                       "parent.enclave.memory_mib to at least 1200")
    assert _checks(EnclaveLaunch(str(big), memory_mib=1200))["enclave memory"][0] is True


def _sysfs(root: Path, ne_cpus: str | None, hugepages: dict[int, int]) -> str:
    """A /sys as the nitro_enclaves driver and the allocator leave it: the driver's CPU pool
    (ne_cpus, a cpulist; empty before the allocator ran) and the huge pages reserved, by
    size in kB."""
    if ne_cpus is not None:
        params = root / "module/nitro_enclaves/parameters"
        params.mkdir(parents=True)
        (params / "ne_cpus").write_text(ne_cpus + "\n")
    for kb, count in hugepages.items():
        d = root / f"kernel/mm/hugepages/hugepages-{kb}kB"
        d.mkdir(parents=True)
        (d / "nr_hugepages").write_text(f"{count}\n")
    return str(root)


def test_launch_checks_compare_the_profile_with_the_enclave_pool(fake: Fake,
                                                                 tmp_path: Path) -> None:
    """`parent up` started run-enclave whatever the pool held, and a profile asking for more
    CPUs or memory than the allocator reserved failed at every restart (E22, E27) with its
    backoff; `parent doctor` said nothing. Now the pool is read where the driver keeps it."""
    launch = EnclaveLaunch(str(fake.eif), cpu_count=4, memory_mib=3072)

    def pool(ne_cpus: str | None, hugepages: dict[int, int]) -> dict[str, tuple[bool, str]]:
        root = tmp_path / f"sys{len(list(tmp_path.iterdir()))}"
        return {name: (ok, detail) for name, ok, detail in
                launch_checks(launch, FAKE, sys_root=_sysfs(root, ne_cpus, hugepages))}

    fits = pool("1-3,5", {2048: 1024, 1048576: 1})  # 4 CPUs, 2048 + 1024 MiB
    assert fits["enclave CPU pool"] == (True, "4 CPUs (ne_cpus 1-3,5)")
    assert fits["enclave memory pool"] == (True, "3072 MiB of huge pages")
    few = pool("1,3", {2048: 1024})
    assert few["enclave CPU pool"] == (
        False, "parent.enclave.cpu_count 4 is more than the pool's 2 CPUs (ne_cpus 1,3): "
        "raise cpu_count in /etc/nitro_enclaves/allocator.yaml and restart "
        "nitro-enclaves-allocator.service, or lower parent.enclave.cpu_count")
    assert few["enclave memory pool"] == (
        False, "parent.enclave.memory_mib 3072 is more than the 2048 MiB of huge pages "
        "reserved: raise memory_mib in /etc/nitro_enclaves/allocator.yaml and restart "
        "nitro-enclaves-allocator.service, or lower parent.enclave.memory_mib")
    empty = pool("", {})
    assert empty["enclave CPU pool"][0] is False
    assert "no CPU pool: `systemctl enable --now nitro-enclaves-allocator.service`" in \
        empty["enclave CPU pool"][1]
    # Without the driver (nitro-cli says what is missing) neither is checked.
    assert "enclave CPU pool" not in pool(None, {2048: 1024})


def test_an_image_another_user_could_replace_is_refused(fake: Fake, tmp_path: Path) -> None:
    """The EIF decides what runs under the CID the control port admits, yet any user who
    could write it (or a directory above it) got their image started at the next restart;
    the private key's file was checked, the image's was not (review finding)."""
    d = tmp_path / "images"
    d.mkdir()
    eif = d / "app.eif"
    eif.write_bytes(fake.eif.read_bytes())
    launch = EnclaveLaunch(str(eif), memory_mib=fake.launch().memory_mib)
    assert _checks(launch)["enclave image"][0] is True
    eif.chmod(0o666)
    ok, detail = _checks(launch)["enclave image"]
    assert not ok and "chmod go-w" in detail
    assert f"{eif} is writable by group and others (mode 666)" in detail
    eif.chmod(0o644)
    d.chmod(0o777)
    ok, detail = _checks(launch)["enclave image"]
    assert not ok and f"{d} is writable by group and others (mode 777)" in detail
    # A directory above the file, as a rule a home (nitro-cli builds where it runs): the fix
    # first named is moving the file, not `chmod`/`chown` of someone's directory.
    assert "move the file into a directory that is root's all the way up" in detail, detail
    assert f"or, if {d} is meant to be, `chmod go-w {d}`" in detail, detail
    d.chmod(0o755)
    os.chown(d, 1000, 1000)
    ok, detail = _checks(launch)["enclave image"]
    assert not ok and f"{d} is owned by uid 1000" in detail, detail
    assert "such as /var/lib/wgvsock, or, if" in detail and f"`chown root {d}`" in detail
    os.chown(d, 0, 0)
    d.chmod(0o1777)  # sticky, as /tmp: others cannot replace root's file
    assert _checks(launch)["enclave image"][0] is True
    d.chmod(0o755)
    os.chown(eif, 65534, 65534)
    ok, detail = _checks(launch)["enclave image"]
    assert not ok and f"{eif} is owned by uid 65534" in detail
    os.chown(eif, 0, 0)
    link_dir = tmp_path / "links"
    link_dir.mkdir()
    (link_dir / "app.eif").symlink_to(eif)
    os.lchown(link_dir / "app.eif", 65534, 65534)  # the link itself another user's
    ok, detail = _checks(EnclaveLaunch(str(link_dir / "app.eif"),
                                       memory_mib=launch.memory_mib))["enclave image"]
    assert not ok and "owned by uid 65534" in detail


def test_an_image_behind_a_link_others_could_repoint_is_refused(fake: Fake,
                                                                tmp_path: Path) -> None:
    """Review finding: of safe/app.eif -> w/l2 -> real/app.eif only the path as written and
    the end of the chain were checked; whoever may write W could repoint l2 at their image."""
    safe, w, real = (tmp_path / n for n in ("safe", "w", "real"))
    for d in (safe, w, real):
        d.mkdir(mode=0o755)
    (real / "app.eif").write_bytes(fake.eif.read_bytes())
    (w / "l2").symlink_to(real / "app.eif")
    (safe / "app.eif").symlink_to(w / "l2")
    launch = EnclaveLaunch(str(safe / "app.eif"), memory_mib=fake.launch().memory_mib)
    assert _checks(launch)["enclave image"][0] is True
    w.chmod(0o777)
    ok, detail = _checks(launch)["enclave image"]
    assert not ok and f"{w} is writable by group and others (mode 777)" in detail, detail
    assert f"chmod go-w {w}" in detail, detail
    w.chmod(0o1777)  # sticky: the link is ours, so only we may replace it
    assert _checks(launch)["enclave image"][0] is True
    os.lchown(w / "l2", 65534, 65534)
    ok, detail = _checks(launch)["enclave image"]
    assert not ok and f"{w / 'l2'} is a symbolic link owned by uid 65534" in detail, detail
    assert f"chown -h root {w / 'l2'}" in detail, detail


def test_launch_checks_minimum_is_nitro_clis_own(fake: Fake, tmp_path: Path) -> None:
    """nitro-cli compares 4x the EIF's bytes with the memory's: one byte over 300 MiB needs
    1201 MiB, not 4 * 301."""
    eif = tmp_path / "odd.eif"
    with open(eif, "wb") as f:
        f.truncate((300 << 20) + 1)
    assert _checks(EnclaveLaunch(str(eif), memory_mib=1200))["enclave memory"][0] is False
    assert _checks(EnclaveLaunch(str(eif), memory_mib=1201))["enclave memory"][0] is True
    with pytest.raises(NitroError, match=r"^\[ E26 \]"):
        fake.cli.run_enclave(EnclaveLaunch(str(eif), cpu_count=1, memory_mib=1200))
    assert fake.cli.run_enclave(EnclaveLaunch(str(eif), cpu_count=1, memory_mib=1201)).cid


def _profile(tmp_path: Path, eif: Path):
    return parse_profile(
        "version: 1\nname: nitrotest\ntransport: {kind: unix, path: /tmp/wgvsock-nitrotest}\n"
        f"parent:\n  enclave: {{eif: {eif}, memory_mib: 256}}\n", str(tmp_path / "p.yaml"))


def test_parent_checks_include_the_enclave(fake: Fake, tmp_path: Path, monkeypatch) -> None:
    from wgvsock.roles.parent import local_checks

    monkeypatch.setenv("PATH", f"{FAKES}{os.pathsep}{os.environ.get('PATH', '')}")
    checks = {c.name: c for c in local_checks(_profile(tmp_path, fake.eif))}
    assert checks["nitro-cli"].ok is True
    assert checks["enclave image"].ok is True
    monkeypatch.setenv("PATH", str(tmp_path))
    checks = {c.name: c for c in local_checks(_profile(tmp_path, tmp_path / "none.eif"))}
    assert checks["nitro-cli"].ok is False
    assert checks["enclave image"].ok is False
    without = parse_profile("version: 1\nname: plain\n")
    assert "nitro-cli" not in {c.name for c in local_checks(without)}


def test_doctor_reports_the_enclave_checks(fake: Fake, tmp_path: Path, monkeypatch,
                                           capsys) -> None:
    from wgvsock.roles import cli
    from wgvsock.services import aws

    monkeypatch.setattr(aws, "doctor_checks", lambda **_: [])
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "200")
    rc = cli.doctor(_profile(tmp_path, tmp_path / "none.eif"))
    out = capsys.readouterr().out
    assert rc == 1
    assert "nitro-cli not found on PATH" in out
    assert "none.eif: No such file or directory" in out


def _wrapped(tmp: Path, fake: Fake, flag: Path, output: str) -> NitroCli:
    """The fake nitro-cli, except that describe-enclaves prints OUTPUT while FLAG exists."""
    path = tmp / "nitro-wrap"
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = describe-enclaves ] && [ -e {flag} ]; then "
                    f"cat {output}; exit 0; fi\nexec {FAKE} \"$@\"\n")
    path.chmod(0o755)
    return NitroCli(str(path), env=fake.env)


@pytest.mark.parametrize("garbage", [b"[\xff]\n", b"[" * 100_000 + b"\n"])
def test_unreadable_describe_output_is_a_failed_poll_not_a_dead_supervisor(
        tmp_path: Path, caplog, garbage: bytes) -> None:
    """Bytes that are not UTF-8, or JSON nested past the parser's depth, raised
    UnicodeDecodeError / RecursionError: the supervisor logged "failed", terminated the
    enclave and ended, and the parent stayed up without one (review finding)."""
    fake = Fake(tmp_path)
    flag, output = tmp_path / "garble", tmp_path / "garbage"
    output.write_bytes(garbage)
    sup = EnclaveSupervisor(_wrapped(tmp_path, fake, flag, str(output)), fake.launch(),
                            "wgvsock-x", None, logging.getLogger("t"), poll_interval=0.05,
                            backoff_min=0.01, backoff_max=0.02)
    caplog.set_level(logging.INFO)
    sup.start()
    try:
        first = sup.wait_started()
        assert first is not None
        flag.touch()
        wait(lambda: "describe-enclaves failed" in caplog.text)
        flag.unlink()
        assert sup._thread.is_alive()
        assert [e.enclave_id for e in fake.cli.enclaves()] == [first.enclave_id]
        assert "supervisor failed" not in caplog.text
    finally:
        sup.stop(timeout=5)


@pytest.mark.parametrize("body", [
    # run-enclave starts the enclave but prints JSON we cannot read
    f'if [ "$1" = run-enclave ]; then {FAKE} "$@" | sed s/EnclaveCID/Cid/; exit 0; fi\n'
    f'exec {FAKE} "$@"',
    # run-enclave starts the enclave but does not return within run_timeout
    f'if [ "$1" = run-enclave ]; then {FAKE} "$@" >/dev/null; exec sleep 3; fi\nexec {FAKE} "$@"',
])
def test_a_failed_run_enclave_leaves_no_enclave_running(tmp_path: Path, caplog,
                                                        body: str) -> None:
    """Before: each retry started another (wgvsock-x_1, _2, ...) until the CPU pool was used
    up, and the ones before ran on unwatched (review finding)."""
    fake = Fake(tmp_path)
    path = tmp_path / "nitro-wrap"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    cli = NitroCli(str(path), env=fake.env, run_timeout=0.5)
    sup = EnclaveSupervisor(cli, fake.launch(), "wgvsock-x", None, logging.getLogger("t"),
                            poll_interval=0.05, backoff_min=0.01, backoff_max=0.02)
    sup.start()
    try:
        wait(lambda: len(sup.delays) >= 3, 30)
        assert len(fake.enclaves()) <= 1  # at most the one of the attempt under way
    finally:
        sup.stop(timeout=10)
    assert fake.enclaves() == []


def booting(fake: Fake) -> list[dict]:
    """The fake's enclaves whose run-enclave waits for the boot (FAKE_NITRO_BOOT_GATE)."""
    return [e for e in json.loads(fake.hook("fake-state"))["enclaves"] if "Booting" in e]


def test_a_booting_enclave_is_not_listed_until_it_has_booted(fake: Fake, tmp_path: Path
                                                              ) -> None:
    """The real nitro-cli's enclave process opens the socket that describe-enclaves and
    terminate-enclave connect to only once the boot is over; the fake listed an enclave
    from the start of its run-enclave."""
    gate = tmp_path / "booted"
    env = {**fake.env, "FAKE_NITRO_BOOT_GATE": str(gate)}
    run = subprocess.Popen([FAKE, *NitroCli.run_args(fake.launch(cid=21), "wgvsock-x")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait(lambda: booting(fake))
        assert fake.enclaves() == []
        (pending,) = booting(fake)
        with pytest.raises(NitroError, match=r"^\[ E11 \]"):
            fake.cli.terminate_enclave(pending["EnclaveID"])
        # Its CID (and CPUs, memory) are taken; its name is not, being asked of the sockets.
        with pytest.raises(NitroError, match=r"^\[ E29 \]"):
            fake.cli.run_enclave(fake.launch(cid=21), "wgvsock-x")
        beside = fake.cli.run_enclave(fake.launch(cpu_count=1), "wgvsock-x")
        assert beside.name == "wgvsock-x"
        gate.touch()
        out, err = run.communicate(timeout=10)
        assert run.returncode == 0, err
        assert "Started enclave with enclave-cid: 21" in err
        info = EnclaveInfo.from_json(json.loads(out))
        assert info.enclave_id == pending["EnclaveID"]
        assert [e["EnclaveID"] for e in fake.enclaves()] == [info.enclave_id, beside.enclave_id]
    finally:
        run.kill()
        run.wait()
    # One that exits during its boot fails run-enclave with E36.
    env["FAKE_NITRO_BOOT_GATE"] = str(tmp_path / "never")
    run = subprocess.Popen([FAKE, *NitroCli.run_args(fake.launch(cpu_count=1), "wgvsock-y")],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait(lambda: booting(fake))
        fake.hook("fake-crash", booting(fake)[0]["EnclaveID"])
        _, err = run.communicate(timeout=10)
        assert run.returncode == 39 and parse_error(err).code == "E36", err
        assert "[ E39 ]" in err
    finally:
        run.kill()
        run.wait()


def test_stop_while_an_enclave_boots_returns_at_once_and_leaves_none(tmp_path: Path,
                                                                     caplog) -> None:
    """Before: stop() waited for run-enclave (up to its 300 s timeout), so `parent down` had
    to SIGKILL a parent stopped during a boot and its clean-up never ran (review finding).
    The enclave is not listed while it boots, so no clearing can find it: it goes at the end
    of its boot, its run-enclave being gone (see tests/fakes/nitro-cli). The run-enclave
    stop() kills is no failure to log, nor one to retry (it said "run-enclave failed:
    `nitro-cli run-enclave` was stopped (signal 9); retrying in 1.0 s" on every `down`)."""
    fake = Fake(tmp_path)
    gate = tmp_path / "booted"
    cli = NitroCli(FAKE, env={**fake.env, "FAKE_NITRO_BOOT_GATE": str(gate)}, run_timeout=120)
    caplog.set_level(logging.INFO, logger="t")
    sup = EnclaveSupervisor(cli, fake.launch(), "wgvsock-x", None, logging.getLogger("t"),
                            poll_interval=0.05)
    sup.start()
    wait(lambda: booting(fake))  # run-enclave has not returned
    t0 = time.monotonic()
    sup.stop(timeout=30)
    assert time.monotonic() - t0 < 10
    assert not sup._thread.is_alive()
    gate.touch()
    assert fake.enclaves() == [] and booting(fake) == []
    assert "run-enclave failed" not in caplog.text and "retrying" not in caplog.text
    assert sup.delays == []


def test_an_enclave_that_boots_under_its_name_beside_its_own_is_terminated(
        fake: Fake, tmp_path: Path, caplog) -> None:
    """A run-enclave of an earlier parent (killed meanwhile) was booting when the supervisor
    cleared its leftovers, so describe-enclaves did not list it; once booted it ran on
    unwatched beside the supervisor's own, holding its CPUs and memory."""
    gate = tmp_path / "booted"
    stray = subprocess.Popen(
        [FAKE, *NitroCli.run_args(fake.launch(), "wgvsock-sup")],
        env={**fake.env, "FAKE_NITRO_BOOT_GATE": str(gate)}, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    sup = supervisor(fake, caplog, launch=fake.launch())
    try:
        wait(lambda: booting(fake))
        sup.start()
        info = sup.wait_started()
        assert info is not None and info.name == "wgvsock-sup"  # the name looked free
        gate.touch()
        out, _ = stray.communicate(timeout=10)
        stray_id = json.loads(out)["EnclaveID"]
        wait(lambda: [e["EnclaveID"] for e in fake.enclaves()] == [info.enclave_id])
        assert f"terminating {stray_id}, which booted under our name beside ours" in caplog.text
        assert sup.starts == 1 and sup.info == info
    finally:
        sup.stop(timeout=10)
        stray.kill()
        stray.wait()
    assert fake.enclaves() == []


def test_a_leftover_booting_on_its_cid_is_cleared_once_it_has_booted(
        fake: Fake, tmp_path: Path, caplog) -> None:
    """The same leftover holding the profile's CID: run-enclave fails (E29) until it has
    booted; the clearing after the failure then finds and terminates it."""
    gate = tmp_path / "booted"
    stray = subprocess.Popen(
        [FAKE, *NitroCli.run_args(fake.launch(cid=21), "wgvsock-sup")],
        env={**fake.env, "FAKE_NITRO_BOOT_GATE": str(gate)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    sup = supervisor(fake, caplog)
    try:
        wait(lambda: booting(fake))
        sup.start()
        wait(lambda: len(sup.delays) >= 2)
        assert sup.starts == 0 and "run-enclave failed: [ E29 ]" in caplog.text
        gate.touch()
        info = sup.wait_started()
        assert info is not None and info.cid == 21
        assert "left by the failed run-enclave" in caplog.text
        assert [e["EnclaveID"] for e in fake.enclaves()] == [info.enclave_id]
    finally:
        sup.stop(timeout=10)
        stray.kill()
        stray.wait()
    assert fake.enclaves() == []


def test_leftovers_in_a_partial_listing_are_cleared_at_start(fake: Fake, caplog) -> None:
    """describe-enclaves lists the enclaves that answered, then fails with E39 (one enclave
    process did not answer). The start's clearing ignored that list, so a leftover in it kept
    the profile's CID and run-enclave failed over and over; `parent down` already used it."""
    old = fake.cli.run_enclave(fake.launch(cid=21), "wgvsock-sup")
    other = fake.cli.run_enclave(fake.launch(cpu_count=1), "someone-else")
    sup = supervisor(fake, caplog)
    sup.nitro = NitroCli(FAKE, env={**fake.env, "FAKE_NITRO_NO_ANSWER": other.enclave_id})
    sup.start()
    try:
        info = sup.wait_started()
        assert info is not None and info.cid == 21 and sup.delays == []
        assert f"terminating {old.enclave_id} left running by an earlier parent" in caplog.text
        assert "describe-enclaves listed only the enclaves that answered ([ E39 ]" in \
            caplog.text
    finally:
        sup.stop(timeout=10)
    assert [e["EnclaveID"] for e in fake.enclaves()] == [other.enclave_id]


def test_only_a_running_stray_is_terminated(tmp_path: Path, caplog) -> None:
    """An enclave of ours still TERMINATING (the one before a restart) is going already: the
    watch must not terminate it again, nor log that it booted beside ours."""
    fake = Fake(tmp_path)
    sup = supervisor(fake, caplog)
    terminated: list[str] = []

    class Recording:
        def terminate_enclave(self, enclave_id: str) -> None:
            terminated.append(enclave_id)

    sup.nitro = Recording()  # type: ignore[assignment]
    mine = EnclaveInfo("i-mine", 21, "wgvsock-sup", state="RUNNING")
    listed = [mine, EnclaveInfo("i-old", 22, "wgvsock-sup_1", state="TERMINATING"),
              EnclaveInfo("i-new", 23, "wgvsock-sup_2", state="RUNNING"),
              EnclaveInfo("i-other", 24, "wgvsock-other", state="RUNNING")]
    sup._terminate_strays(listed, mine, set())
    assert terminated == ["i-new"]
    assert "i-old" not in caplog.text


def test_a_cid_someone_else_holds_is_named_with_the_fix(fake: Fake, caplog) -> None:
    """run-enclave on a CID another enclave holds fails with nitro-cli's bare E29 (Ioctl
    failure; the reason is only in its log): the operator learnt neither the cause nor the
    fix. The supervisor now names the holder and what to change."""
    other = fake.cli.run_enclave(fake.launch(cid=21, cpu_count=1), "someone-else")
    sup = supervisor(fake, caplog)
    sup.start()
    try:
        wait(lambda: len(sup.delays) >= 1)
    finally:
        sup.stop(timeout=10)
    assert sup.starts == 0
    assert (f"CID 21 is taken by enclave {other.enclave_id} (someone-else): terminate it "
            f"(nitro-cli terminate-enclave --enclave-id {other.enclave_id}) or set another "
            "parent.enclave.cid") in caplog.text
    assert [e["EnclaveID"] for e in fake.enclaves()] == [other.enclave_id]


@pytest.mark.parametrize(("code", "fix"), [
    ("E22", "raise cpu_count in /etc/nitro_enclaves/allocator.yaml and restart "
            "nitro-enclaves-allocator.service, or lower parent.enclave.cpu_count (2)"),
    ("E27", "raise memory_mib in /etc/nitro_enclaves/allocator.yaml and restart "
            "nitro-enclaves-allocator.service, or lower parent.enclave.memory_mib (256)"),
    ("E36", "the enclave did not boot"),
    ("E35", "not a valid enclave image"),
])
def test_run_enclave_failures_say_how_to_fix_them(fake: Fake, caplog, code: str,
                                                  fix: str) -> None:
    """nitro-cli's messages say what failed, not what to change on this host or in the
    profile; the supervisor's line now ends with that."""
    fake.hook("fake-fail-run", "1", code)
    sup = supervisor(fake, caplog, launch=fake.launch())
    sup.start()
    try:
        assert sup.wait_started() is not None
    finally:
        sup.stop(timeout=10)
    line = next(r.getMessage() for r in caplog.records if "run-enclave failed" in r.getMessage())
    assert f"[ {code} ]" in line and fix in line, line
    assert "[ E39 ]" not in line  # the client's echo of its enclave process's failure
    assert line.endswith("; retrying in 10 ms")


def test_a_missing_eif_says_which_file_and_key(fake: Fake, caplog, tmp_path: Path) -> None:
    gone = tmp_path / "gone.eif"
    sup = supervisor(fake, caplog, launch=EnclaveLaunch(str(gone), memory_mib=256))
    sup.start()
    try:
        wait(lambda: sup.delays)
        reason = sup.last_reason
    finally:
        sup.stop(timeout=10)
    assert f"cannot open {gone}: No such file or directory; set parent.enclave.eif " \
        "to the image `make eif` built" in reason


def test_fixes_for_a_device_or_an_image_nitro_cli_cannot_use(fake: Fake, tmp_path: Path
                                                              ) -> None:
    def fix(stderr: str, launch: EnclaveLaunch) -> str | None:
        return nitro.run_failure_fix(parse_error(stderr), launch, fake.cli.enclaves, "wgvsock-x")

    device = ("[ E19 ] File operation failure.\nFile: '/dev/nitro_enclaves', failing "
              "operation: 'Open'.\n")
    assert "no Nitro Enclaves device: enable enclaves on the instance" in fix(device,
                                                                              fake.launch())
    pool = ("[ E19 ] File operation failure.\nFile: '/sys/module/nitro_enclaves/parameters/"
            "ne_cpus', failing operation: 'Open'.\n")
    assert "systemctl enable --now nitro-enclaves-allocator.service" in fix(pool,
                                                                            fake.launch())
    # The image grew since `up` checked it.
    with open(fake.eif, "wb") as f:
        f.truncate(300 << 20)
    assert fix(E26, fake.launch()) == ("set parent.enclave.memory_mib to at least 1200 (4x the "
                                       "EIF's 300 MiB)")


def test_the_service_status_says_why_no_enclave_runs() -> None:
    """systemd's status line said "waiting for the enclave to register" while every
    run-enclave failed: `systemctl status` hid that the parent could not start it."""
    from types import SimpleNamespace

    from wgvsock.roles.parent import Parent

    parent = Parent(parse_profile("name: a\nparent:\n  enclave: {eif: /x.eif}\n"))
    assert parent.status_line(0) == "wg0 up; waiting for the enclave to register"
    parent.supervisor = SimpleNamespace(info=None, last_reason="run-enclave failed: [ E27 ] x")
    assert parent.status_line(0) == ("wg0 up; enclave not running: run-enclave failed: "
                                     "[ E27 ] x")
    parent.supervisor = SimpleNamespace(info=object(), last_reason="run-enclave failed: old")
    assert parent.status_line(0) == "wg0 up; waiting for the enclave to register"


def test_run_enclave_waits_as_long_as_nitro_cli_waits_for_the_boot(tmp_path: Path) -> None:
    """nitro-cli waits for a booting enclave's heartbeat 90 s for each started 6 GiB of EIF
    plus 90 s for each started 100 GiB of its memory (resource_manager.rs,
    calculate_necessary_timeout). Before: a fixed 300 s, so a 256 GiB enclave (or a 13 GiB
    EIF), which nitro-cli gives 360 s, was killed mid-boot and started again, for ever."""
    eif = tmp_path / "app.eif"
    with eif.open("wb") as f:
        f.truncate(100 << 20)  # sparse: 100 MiB
    cli = NitroCli()
    small = EnclaveLaunch(str(eif), 2, 1024)
    assert cli.run_timeout_for(small) == nitro.RUN_TIMEOUT  # 180 s of boot wait, and margin
    big = EnclaveLaunch(str(eif), 2, 256 << 10)
    assert cli.run_timeout_for(big) >= 90 * (1 + 3) + 60
    with eif.open("r+b") as f:
        f.truncate(13 << 30)
    assert cli.run_timeout_for(small) >= 90 * (3 + 1) + 60
    # Asked for explicitly (tests, a caller that knows better), it stands.
    assert NitroCli(run_timeout=0.5).run_timeout_for(big) == 0.5



def test_a_stop_that_lands_as_run_enclave_starts_still_stops_it(fake: Fake, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """stop() kills the nitro-cli calls in flight. Before: a run-enclave whose process was
    being made when stop() came was not yet among them, and ran on, booting for minutes,
    while `parent down` waited and then SIGKILLed the parent (nitro review)."""
    gate = tmp_path / "never"  # the boot never ends by itself
    cli = NitroCli(FAKE, env={**fake.env, "FAKE_NITRO_BOOT_GATE": str(gate)}, run_timeout=30)
    sup = EnclaveSupervisor(cli, fake.launch(), "wgvsock-x", None, logging.getLogger("t"),
                            poll_interval=0.05)
    real = subprocess.Popen

    def popen(cmd, *args, **kwargs):
        if "run-enclave" in cmd:
            sup.stop()  # lands here: the call is under way, its process not yet known
        return real(cmd, *args, **kwargs)

    monkeypatch.setattr(nitro.subprocess, "Popen", popen)
    started = time.monotonic()
    sup.start()
    sup._thread.join(25)
    assert not sup._thread.is_alive()
    assert time.monotonic() - started < 20
    assert booting(fake) == [] and fake.enclaves() == []
