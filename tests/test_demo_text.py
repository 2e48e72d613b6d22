"""What `make demo` says, without running it (tests/net/test_demo.py runs it as root)."""

from __future__ import annotations

import os

from wgvsock.services.firewall import Counter
from wgvsock.ui import demo


def test_counters_the_table_lacks_are_shown_as_unknown_not_a_traceback() -> None:
    """The demo read them as counters["egress_allowed"]: a table without one (another nft's
    JSON, a rule renamed) ended the demo with a KeyError."""
    assert demo.deny_counter_lines({}) == [
        "   [wgdemo-parent] nftables counters (packets): - (no deny rule counters in the table)",
        "     egress_allowed -, egress_denied -, ingress_accepted -" + demo._UNKNOWN_NOTE,
    ]
    assert demo.names_counter_line({"dns forwarder": Counter(3, 200)}) == (
        "     packets: 'allow www.demo.test' -, to the forwarder 3" + demo._UNKNOWN_NOTE)


def test_counters_the_table_has_are_shown_as_before() -> None:
    c = {"deny 198.51.100.3/32": Counter(4, 240), "egress_allowed": Counter(9, 900),
         "egress_denied": Counter(4, 240), "ingress_accepted": Counter(1, 60),
         "allow www.demo.test": Counter(2, 120), "dns forwarder": Counter(3, 200)}
    assert demo.deny_counter_lines(c) == [
        "   [wgdemo-parent] nftables counters (packets): deny 198.51.100.3/32: 4",
        "     egress_allowed 9, egress_denied 4, ingress_accepted 1",
    ]
    assert demo.names_counter_line(c) == "     packets: 'allow www.demo.test' 2, to the forwarder 3"


def test_the_dashboard_heading_says_q_only_when_a_key_can_reach_it() -> None:
    """`make demo < /dev/null` in a terminal said "(q or Ctrl-C ends it)": q cannot."""
    with open(os.devnull) as devnull:
        assert demo.how_to_end_live(devnull) == f"Ctrl-C or `kill {os.getpid()}` ends it"
    assert demo.how_to_end_live(None) == f"Ctrl-C or `kill {os.getpid()}` ends it"
    controller, terminal = os.openpty()
    try:
        with open(terminal, closefd=False) as tty:
            assert demo.how_to_end_live(tty) == "q or Ctrl-C ends it"
    finally:
        os.close(controller)
        os.close(terminal)
