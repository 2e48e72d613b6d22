"""The lab programs' shared parts (the demo, bench/*.py): the pre-flight check, a clear reason
or None; run_in_lab, a lab that is removed however the program ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from wgvsock.ui.nslab import Lab, LabError, preflight, run_in_lab


def test_preflight_says_what_root_is_needed_for() -> None:
    with mock.patch.object(os, "geteuid", return_value=1000):
        assert preflight("network namespaces, TUN", ["ip"]) == \
            "needs root (network namespaces, TUN)"


def test_preflight_names_the_missing_tools_and_how_to_get_them() -> None:
    with mock.patch.object(os, "geteuid", return_value=0):
        why = preflight("x", ["ip", "wgvsock-no-such-tool", "another-missing-tool"])
    assert why == ("missing tools: wgvsock-no-such-tool, another-missing-tool "
                   "(`make apt` installs them)")


def test_preflight_passes_when_all_is_there() -> None:
    with mock.patch.object(os, "geteuid", return_value=0), \
            mock.patch("shutil.which", return_value="/usr/bin/x"), \
            mock.patch("pathlib.Path.exists", return_value=True):
        assert preflight("x", ["ip", "nft"]) is None


def test_run_in_lab_turns_interruptions_and_lab_failures_into_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    labs: list[Lab] = []

    def fails(lab: Lab) -> int:
        labs.append(lab)
        raise LabError("veth vb1a did not come up")

    def interrupted(lab: Lab) -> int:
        labs.append(lab)
        raise KeyboardInterrupt

    assert run_in_lab("tunnel_bench", "wgvsock-test-", fails) == 1
    assert capsys.readouterr().err == "tunnel_bench: veth vb1a did not come up\n"
    assert run_in_lab("soak", "wgvsock-test-", fails, failure=2) == 2
    assert run_in_lab("soak", "wgvsock-test-", interrupted) == 130
    assert "interrupted; cleaning up" in capsys.readouterr().err
    assert run_in_lab("x", "wgvsock-test-", lambda lab: 7) == 7
    # Each lab was removed, however its body ended.
    assert len(labs) == 3 and not any(lab.tmp.exists() for lab in labs)


def test_a_baseline_runs_with_its_own_venvs_interpreter(tmp_path: Path) -> None:
    # The interpreter's build moves the figures by 10 % (bench/README.md, nineteenth round), so
    # a before/after must not quietly run both checkouts on this one.
    from bench.tunnel_bench import CASES, baseline_cases

    with_venv, without = tmp_path / "with-venv", tmp_path / "without"
    python = with_venv / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.symlink_to(sys.executable)
    without.mkdir()
    ours = [c for c in CASES if "ours" in (c.impl_a, c.impl_b)]
    for checkout, expected in ((with_venv, str(python)), (without, sys.executable)):
        cases = baseline_cases(list(CASES), str(checkout))
        assert [c.key for c in cases] == [f"{c.key}@base" for c in ours]
        assert {c.python for c in cases} == {expected}
        assert all(dict(c.env)["PYTHONPATH"] == str(checkout) for c in cases)


def test_split_cores_confines_each_side_and_the_threads_it_starts_later() -> None:
    # `tunnel_bench.py --split-cores`: a daemon's threads spread over every CPU would make the
    # split a fiction, and Go starts threads whenever it likes.
    from bench.tunnel_bench import CASES, Result, Tunnel, pin_sides, split_cores

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: there are no two sides to split (the next test covers the refusal)")
    cpus_a, cpus_b = split_cores()
    assert cpus_a and cpus_b and not cpus_a & cpus_b
    assert cpus_a | cpus_b == os.sched_getaffinity(0)
    code = ("import os, sys, threading\n"
            "t = threading.Thread(target=sys.stdin.readline); t.start()\n"
            "print('ready', flush=True); t.join()\n"
            "later = threading.Thread(target=lambda: print(sorted(os.sched_getaffinity(0)),"
            " flush=True))\n"
            "later.start(); later.join()\n")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as p:
        try:
            assert p.stdout is not None and p.stdin is not None
            assert p.stdout.readline() == "ready\n"
            t = Tunnel(CASES[0], Result("k", "l", 1420), "ifa", "ifb", "10.0.0.2",
                       {"ifa": p.pid, "ifb": None})
            pin_sides(t, cpus_a, cpus_b)
            tids = os.listdir(f"/proc/{p.pid}/task")
            assert len(tids) == 2
            assert all(os.sched_getaffinity(int(tid)) == cpus_a for tid in tids)
            p.stdin.write("\n")
            p.stdin.flush()
            assert p.stdout.readline() == f"{sorted(cpus_a)}\n"
        finally:
            p.kill()
    # A daemon that has died since: nothing to pin, and the bench goes on to report its rounds.
    pin_sides(t, cpus_a, cpus_b)


def test_split_cores_needs_two_cpus() -> None:
    # A process confined to one CPU, as on a one-CPU machine.
    cpu = min(os.sched_getaffinity(0))
    res = subprocess.run(
        ["taskset", "-c", str(cpu), sys.executable, "-c",
         "from bench.tunnel_bench import split_cores; split_cores()"],
        cwd=Path(__file__).parents[1],
        capture_output=True, text=True, check=False)
    assert res.returncode == 1
    assert res.stderr.rstrip().endswith(
        f"LabError: --split-cores needs two CPUs or more; this process may use [{cpu}]")
