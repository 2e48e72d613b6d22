"""`wgvsock parent doctor`'s (and `up`'s) checks of the directories the parent's sockets go in."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from wgvsock.roles.parent import local_checks
from wgvsock.services.profile import parse_profile


def _check(monkeypatch: pytest.MonkeyPatch, run_dir: Path, transport: str = ""):
    monkeypatch.setenv("WGVSOCK_RUN_DIR", str(run_dir))
    profile = parse_profile(f"name: x\n{transport}enclave:\n  address: 10.77.0.2/30\n")
    return {c.name: c for c in local_checks(profile)}["socket directories"]


@pytest.fixture
def base() -> Iterator[Path]:
    # Under /tmp (sticky, root's) rather than pytest's tmp_path, whose directories above may
    # be another user's on some machines: what is above the checked directories is known.
    d = Path(tempfile.mkdtemp(prefix="wgvsock-checks-", dir="/tmp"))
    yield d
    shutil.rmtree(d)


def test_a_run_dir_not_made_yet_passes_and_is_not_made(monkeypatch, base) -> None:
    check = _check(monkeypatch, base / "wireguard")
    assert check.ok is True and str(base / "wireguard") in check.detail
    assert not (base / "wireguard").exists()  # a check changes nothing


def test_a_run_dir_others_may_write_fails_naming_the_fix(monkeypatch, base) -> None:
    run = base / "wireguard"
    run.mkdir()
    run.chmod(0o777)
    check = _check(monkeypatch, run)
    assert check.ok is False
    assert str(run) in check.detail and f"chmod go-w {run}" in check.detail


def test_the_unix_stand_ins_directory_is_checked_too(monkeypatch, base) -> None:
    run, sockets = base / "wireguard", base / "sockets"
    sockets.mkdir()
    sockets.chmod(0o755)  # fine for the run directory (wg lists it), not for these sockets
    check = _check(monkeypatch, run,
                   f"transport:\n  kind: unix\n  path: {sockets}\n")
    assert check.ok is False and str(sockets) in check.detail and "chmod 700" in check.detail
    sockets.chmod(0o700)
    check = _check(monkeypatch, run,
                   f"transport:\n  kind: unix\n  path: {sockets}\n")
    assert check.ok is True and str(sockets) in check.detail
