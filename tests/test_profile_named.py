"""Messages name a profile as one ("profile 'demo'"): `make demo`'s profile is called demo,
and `wgvsock parent down` printed "demo: nothing to remove", which read as the demo's own
line rather than as the state of a profile."""

from __future__ import annotations

from pathlib import Path

import pytest

from wgvsock.roles import cli, parent, state

PROFILE = """\
version: 1
name: demo
interface: wg0
transport: {kind: unix, path: /run/wgvsock/demo}
parent:
  address: 10.77.0.1/30
  private_key: /etc/wgvsock/demo.key
enclave:
  address: 10.77.0.2/30
"""


@pytest.fixture
def profile_file(tmp_path: Path) -> str:
    path = tmp_path / "demo.yaml"
    path.write_text(PROFILE)
    return str(path)


def test_down_with_nothing_to_remove_names_the_profile(
        profile_file: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(parent, "down", lambda profile: ([], []))
    assert cli.parent_main(["down", "--profile", profile_file]) == 0
    assert capsys.readouterr().out == "profile 'demo': nothing to remove\n"


def test_up_of_a_running_profile_names_the_profile(
        profile_file: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("WGVSOCK_READY_FD", raising=False)
    monkeypatch.setattr(state, "already_up", lambda profile: 4242)
    monkeypatch.setattr(state, "running_code_note", lambda profile: None)
    assert cli.parent_main(["up", "--profile", profile_file]) == 0
    assert capsys.readouterr().out == "profile 'demo' is already up (pid 4242)\n"
