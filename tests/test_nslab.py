"""The lab programs' pre-flight check (the demo, bench/*.py): a clear reason, or None."""

from __future__ import annotations

import os
from unittest import mock

from wgvsock.ui.nslab import preflight


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
