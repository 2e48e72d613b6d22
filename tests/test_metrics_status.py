"""`wgvsock status` with the parent's counter keys: egress verdicts and DNS counts, in the
live view's text and in --json, read over a real UAPI socket."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wgvsock.core.crypto import generate_private_key, public_key
from wgvsock.device.uapi import DeviceStatus, PeerStatus
from wgvsock.ui import status as st

from .test_status_format import _serve, _show, run_dir  # noqa: F401 - run_dir is a fixture

PARENT_KEYS = {"wgvsock_role": "parent", "wgvsock_profile": "demo",
               "wgvsock_egress_allowed": "5", "wgvsock_egress_denied": "2",
               "wgvsock_egress_blocked": "1"}


def _status(extra: dict[str, str]) -> DeviceStatus:
    return DeviceStatus(private_key=generate_private_key(), listen_port=51820, extra=extra, peers=[
        PeerStatus(public_key=public_key(generate_private_key()), endpoint="192.0.2.1:51820",
                   allowed_ips=["10.77.0.2/32"])])


def test_connection_limit_drops_are_shown_when_there_are_some(
        run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: F811
    """Before: drops by parent.egress.max_connections were in no total (status, UAPI,
    wgvsock_egress_packets_total), only in the refusals list."""
    for limited, line in (("0", "blocked 1\n"), ("4", "blocked 1 · limited 4")):
        server, _ = _serve(run_dir, "wgp", _status({**PARENT_KEYS,
                                                     "wgvsock_egress_limited": limited}))
        try:
            assert st.main(["--once", "--json", "--run-dir", str(run_dir)]) == 0
            egress = json.loads(capsys.readouterr().out)["interfaces"][0]["egress"]
            assert egress == {"allowed": 5, "denied": 2, "blocked": 1, "limited": int(limited)}
            assert st.main(["--once", "--run-dir", str(run_dir)]) == 0
            out = capsys.readouterr().out
            assert line in out, out
        finally:
            server.close()


@pytest.mark.parametrize(("dns", "shown"), [
    ({"wgvsock_dns_queries": "7", "wgvsock_dns_refused": "3"}, {"queries": 7, "refused": 3}),
    ({}, None),  # no forwarder: absent, not zero
])
def test_counters_in_json_and_text(run_dir: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
                                   dns: dict[str, str], shown: dict[str, int] | None) -> None:
    server, _ = _serve(run_dir, "wgp", _status({**PARENT_KEYS, **dns}))
    try:
        assert st.main(["--once", "--json", "--run-dir", str(run_dir)]) == 0
        iface = json.loads(capsys.readouterr().out)["interfaces"][0]
        assert iface["egress"] == {"allowed": 5, "denied": 2, "blocked": 1}
        assert iface["dns"] == shown
        assert st.main(["--once", "--run-dir", str(run_dir)]) == 0
        out = capsys.readouterr().out
        assert "egress allowed 5 · denied 2 · blocked 1" in out
        assert ("dns 7 queries · refused 3" in out) == (shown is not None)
    finally:
        server.close()


def test_other_daemons_show_no_counters(run_dir: Path) -> None:  # noqa: F811
    server, _ = _serve(run_dir, "wgx", _status({"wgvsock_egress_allowed": "x"}))
    try:
        snap = st.Collector(run_dir=str(run_dir)).sample()
        assert (snap.interfaces[0].egress, snap.interfaces[0].dns) == (None, None)
        assert "egress" not in _show(snap)[0]
    finally:
        server.close()


def test_counter_line_styles_and_narrow_width() -> None:
    iface = st.InterfaceView(name="wg0", socket="/run/wg0.sock", role="parent",
                             egress={"allowed": 10, "denied": 4, "blocked": 0},
                             dns={"queries": 1, "refused": 0})
    snap = st.Snapshot(time=0.0, run_dir="/run", interfaces=[iface])
    plain, styled = _show(snap, width=40)
    assert "dns 1 query" in plain
    assert all(len(line) <= 40 for line in plain.splitlines())
    assert "\x1b[1;31mdenied 4" in styled  # denials stand out
    assert "\x1b[2mblocked 0" in styled  # zero is dim


def test_a_counter_the_parent_did_not_give_is_shown_as_unknown() -> None:
    """A parent leaves out a counter its nftables table lacks: shown as "-", with what that
    means, where the whole egress line went missing."""
    iface = st.interface_view("wg0", "/s", {"peers": [], "extra": {
        "wgvsock_role": "parent", "wgvsock_egress_allowed": "5"}}, 0.0)
    assert iface.egress == {"allowed": 5, "denied": None, "blocked": None}
    plain, _ = _show(st.Snapshot(time=0.0, run_dir="/run", interfaces=[iface]), 100)
    assert "egress allowed 5 · denied - · blocked - · -: not in the parent's nftables " \
        "table" in " ".join(plain.split()), plain


def test_counters_the_parent_could_not_read_are_said_to_be_unavailable() -> None:
    why = "nft -j -t list table inet wgvsock_demo: output is not JSON (Expecting value)"
    iface = st.interface_view("wg0", "/s", {"peers": [], "extra": {
        "wgvsock_role": "parent", "wgvsock_egress_error": why + "\x1b[2J"}}, 0.0)
    assert iface.egress is None
    plain, _ = _show(st.Snapshot(time=0.0, run_dir="/run", interfaces=[iface]), 200)
    assert f"  egress counters unavailable: {why}" in plain, plain
    assert "\x1b" not in plain
