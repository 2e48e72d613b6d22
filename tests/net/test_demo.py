"""`make demo` (python -m wgvsock.ui.demo) end to end, as the README's first command runs it,
without a terminal: every stage reports success and nothing is left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from wgvsock.ui.demo import NAMESPACES

from .netlab import run

pytestmark = [pytest.mark.root]


def test_the_demo_runs_every_stage_and_leaves_nothing() -> None:
    res = subprocess.run([sys.executable, "-m", "wgvsock.ui.demo", "--iperf-seconds", "1"],
                         capture_output=True, text=True, timeout=240,
                         cwd=Path(__file__).resolve().parents[2])
    out = res.stdout
    assert res.returncode == 0, res.stderr + out[-3000:]
    for line in (
        "hello from the internet",  # egress through the parent's NAT
        "hello from the enclave",  # ingress through the parent's port
        "-> BLOCKED (no answer within 2 s)",  # the deny list
        "denied tcp 198.51.100.3:80",  # what the parent recorded it refused
        "dns ads.demo.test",
        "Mbit/s",  # iperf3 both ways
        "wg0@parent  parent (profile demo)",  # the dashboard
        "nothing left behind",
    ):
        assert line in out, line
    assert "WARNING" not in out
    listed = run("ip", "netns", "list").stdout.split()
    assert not [n for n in NAMESPACES if n in listed]
    assert not [n for n in NAMESPACES if (Path("/etc/netns") / n).exists()]
