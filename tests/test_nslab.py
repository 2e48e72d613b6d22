"""The lab programs' shared parts (the demo, bench/*.py): the pre-flight check, a clear reason
or None; run_in_lab, a lab that is removed however the program ends."""

from __future__ import annotations

import os
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
