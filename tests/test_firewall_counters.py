"""Reading the parent's nftables counters from `nft -j` output of any shape: what `wgvsock
status` (through the parent's UAPI keys), the metrics and `make demo` show. A counter that is
missing or malformed must cost that counter only, never a traceback (nft's JSON differs between
versions, and a table edited by hand can hold anything)."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from wgvsock.services import firewall
from wgvsock.services.metrics.counters import ParentCounters


def _fake_nft(monkeypatch: pytest.MonkeyPatch, doc: Any) -> None:
    out = doc if isinstance(doc, str) else json.dumps(doc)

    def nft(args: list[str], netns: str | None,
            script: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["nft", *args], 0, out, "")

    monkeypatch.setattr(firewall, "_nft", nft)


GOOD = {"counter": {"family": "inet", "table": "wgvsock_x", "name": "egress_allowed",
                    "handle": 3, "packets": 7, "bytes": 420}}
RULE = {"rule": {"family": "inet", "table": "wgvsock_x", "chain": "forward", "handle": 9,
                 "comment": "deny 10.0.0.0/8",
                 "expr": [{"match": {}}, {"counter": {"packets": 2, "bytes": 120}},
                          {"drop": None}]}}

ODD_ITEMS = [
    {"counter": {"name": "egress_denied", "bytes": 0}},  # no packets
    {"counter": {"name": "egress_blocked", "packets": "5", "bytes": 0}},  # not a number
    {"counter": {"packets": 1, "bytes": 1}},  # no name
    {"counter": None},
    {"counter": [1, 2]},
    {"rule": {"comment": "deny 192.0.2.0/24", "expr": [{"counter": {"packets": 1}}]}},
    {"rule": {"comment": "deny 198.51.100.0/24", "expr": "counter"}},
    {"rule": {"comment": ["not", "text"], "expr": [{"counter": {"packets": 1, "bytes": 1}}]}},
    {"rule": None},
    "a string",
    7,
]


@pytest.mark.parametrize("odd", ODD_ITEMS, ids=lambda o: json.dumps(o)[:60])
def test_a_malformed_counter_costs_that_counter_only(monkeypatch: pytest.MonkeyPatch,
                                                     odd: Any) -> None:
    _fake_nft(monkeypatch, {"nftables": [{"metainfo": {"json_schema_version": 1}}, GOOD, odd,
                                         RULE]})
    got = firewall.read_counters("x")
    assert got["egress_allowed"] == firewall.Counter(7, 420)
    assert got["deny 10.0.0.0/8"] == firewall.Counter(2, 120)
    assert all(isinstance(c.packets, int) and isinstance(c.bytes, int) for c in got.values())


@pytest.mark.parametrize("doc", ["", "not json", "[]", "[1, 2]", "null", '"text"',
                                 '{"nftables": 5}', '{"nftables": {"counter": {}}}'])
def test_output_of_another_shape_is_a_firewall_error(monkeypatch: pytest.MonkeyPatch,
                                                     doc: str) -> None:
    _fake_nft(monkeypatch, doc)
    with pytest.raises(firewall.FirewallError, match="nft"):
        firewall.read_counters("x")


@pytest.mark.parametrize("doc", ['{"nftables": [{"set": {"elem": [{"elem": {}}]}}]}',
                                 '{"nftables": [{"set": {"elem": 3}}]}',
                                 '{"nftables": [{"set": {"elem": [{"elem": {"val": "192.0.2.1",'
                                 ' "timeout": "x"}}]}}]}',
                                 '[]'])
def test_set_elements_of_another_shape_do_not_raise_a_traceback(
        monkeypatch: pytest.MonkeyPatch, doc: str) -> None:
    _fake_nft(monkeypatch, doc)
    try:
        got = firewall.set_elements("x", "name0_v4")
    except firewall.FirewallError:
        return
    assert all(isinstance(v, tuple) for v in got.values())


@pytest.mark.parametrize("odd", ODD_ITEMS[:3], ids=lambda o: json.dumps(o)[:60])
def test_the_parents_status_keys_survive_a_malformed_counter(
        monkeypatch: pytest.MonkeyPatch, odd: Any) -> None:
    """The parent's UAPI `get` carries these keys: an exception here failed the whole `get`,
    so `wgvsock status` and `wg show` lost the parent, not one number."""
    _fake_nft(monkeypatch, {"nftables": [GOOD, odd]})
    keys = ParentCounters("x").uapi_keys()
    assert keys["wgvsock_egress_allowed"] == "7"


def test_a_counter_the_table_lacks_is_left_out_of_the_status_keys_not_said_to_be_0(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """egress() fills a missing counter with 0 (Prometheus needs a number); the dashboard
    must not show as 0 what nobody counted: the key is left out, and shown as "-"."""
    _fake_nft(monkeypatch, {"nftables": [GOOD, {"counter": {"name": "egress_denied",
                                                            "bytes": 0}}]})
    keys = ParentCounters("x").uapi_keys()
    assert keys["wgvsock_egress_allowed"] == "7"
    assert "wgvsock_egress_denied" not in keys and "wgvsock_egress_blocked" not in keys


def test_nft_output_that_cannot_be_read_is_said_in_the_status_keys(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The egress line then went missing from the dashboard without a word."""
    _fake_nft(monkeypatch, "[1, 2]")
    keys = ParentCounters("x").uapi_keys()
    assert keys == {"wgvsock_egress_error": "nft -j -t list table inet wgvsock_x: output is not "
                    "the JSON this version of wgvsock knows (no \"nftables\" list)"}


def test_nfts_error_is_one_line_the_device_can_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """A NUL or a second line in a UAPI value makes the device refuse the whole `get`."""
    def nft(args: list[str], netns: str | None,
            script: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(["nft", *args], 1, "",
                                           "Error: odd\0table\nlist table\n^^^^^\n")

    monkeypatch.setattr(firewall, "_nft", nft)
    assert ParentCounters("x").uapi_keys() == {
        "wgvsock_egress_error": "nft -t list table inet wgvsock_x: Error: odd table"}
