"""The lab programs' shared parts (the demo, bench/*.py): the pre-flight check, a clear reason
or None; run_in_lab, a lab that is removed however the program ends."""

from __future__ import annotations

import os
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
