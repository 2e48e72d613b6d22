"""Messages name a profile as one ("profile 'demo'"): `make demo`'s profile is called demo,
and `wgvsock parent down` printed "demo: nothing to remove", which read as the demo's own
line rather than as the state of a profile."""

from __future__ import annotations

import sys
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


def test_the_parents_log_names_the_profile_as_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """What `parent up/down/reload` print named the profile as one since 73095ca, but the
    parent's log went on with "parent demo: nftables table wgvsock_demo was deleted ...",
    "parent demo reloaded from ...": the profile's name read as part of the sentence."""
    import logging

    from wgvsock.services import firewall
    from wgvsock.services.profile import parse_profile

    path = tmp_path / "demo.yaml"
    path.write_text(PROFILE)
    p = parent.Parent(parse_profile(PROFILE, str(path)))
    p._state = state.State("demo", 1, "wg0", str(path))

    def full(self) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state.State, "save", full)
    monkeypatch.setattr(p, "_replace_table", lambda profile, *, keep_counters: 0)
    monkeypatch.setattr(firewall, "rule_count", lambda name, netns=None: -1)
    p._table, p._rules = True, 42
    with caplog.at_level(logging.INFO, logger="wgvsock.parent"):
        assert parent.reload_from_file(p) is True
        p.check_firewall()
    said = [r.getMessage() for r in caplog.records]
    assert f"profile 'demo' reloaded from {path}: nothing changed" in said, said
    assert any(m.startswith("profile 'demo': cannot record the reload's outcome in ")
               for m in said), said
    assert ("profile 'demo': nftables table wgvsock_demo was deleted or changed by someone "
            "else; putting it back") in said, said
    assert not [m for m in said if m.startswith("parent demo")], said
    # and every other line of the parent's log that names the profile
    source = Path(parent.__file__).read_text()
    assert '"parent %s' not in source


def test_the_doctors_table_names_the_profile_as_one(
        profile_file: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Its title was "wgvsock parent doctor — demo", where every other message of the
    parent's commands says "profile 'demo'"."""
    from wgvsock.services import profile as profile_mod

    ok = parent.Check("x", True, "fine")
    for check in ("parent_key_check", "forward_chain_check", "metrics_port_check",
                  "connection_limit_check"):
        monkeypatch.setattr(parent, check, lambda profile: ok)
    monkeypatch.setattr(parent, "local_checks", lambda profile: [])
    monkeypatch.setattr(cli, "_refusal_log_check", lambda profile: ok)
    monkeypatch.setattr(profile_mod, "check_host", lambda *a: [])
    monkeypatch.setattr(profile_mod, "check_routes", lambda *a: [])
    monkeypatch.setattr(profile_mod, "local_networks", lambda **k: [])
    monkeypatch.setattr(profile_mod, "local_routes", lambda **k: [])
    monkeypatch.setitem(sys.modules, "wgvsock.services.aws", None)  # no AWS here
    monkeypatch.setenv("COLUMNS", "120")
    assert cli.parent_main(["doctor", "--profile", profile_file]) == 0
    assert "wgvsock parent doctor — profile 'demo'" in capsys.readouterr().out
