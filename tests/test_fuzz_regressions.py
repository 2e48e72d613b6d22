"""Regression tests for the bugs `make fuzz` found (fuzz/, tests/test_fuzz_targets.py)."""

from __future__ import annotations

import base64
import json
import socket
import struct

import pytest

from wgvsock.device.uapi import ERR_INVALID, UAPIError, parse_set
from wgvsock.services.control import ControlError, register
from wgvsock.services.profile import MAX_FLOW_DEPTH, ProfileError, parse_profile


@pytest.mark.parametrize("value", ["1.2.3.4:5\0", "a\rb", "\r"])
def test_parse_set_refuses_an_endpoint_with_control_characters(value: str) -> None:
    # parse_set took these, and format_set then raised ValueError on the same config.
    with pytest.raises(UAPIError) as e:
        parse_set(f"public_key={'11' * 32}\nendpoint={value}\n")
    assert e.value.errno == ERR_INVALID and "endpoint" in e.value.message


def _parent_says(*messages: dict) -> tuple[socket.socket, socket.socket]:
    parent, enclave = socket.socketpair()
    for m in messages:
        body = json.dumps({"v": 1, **m}).encode()
        parent.sendall(struct.pack(">I", len(body)) + body)
    parent.shutdown(socket.SHUT_WR)
    return parent, enclave


@pytest.mark.parametrize("port", [True, False, 1.0, "1"])
def test_welcome_with_a_port_that_is_not_an_integer_is_refused(port: object) -> None:
    # JSON true is a Python bool, which is an int: it passed as port 1.
    key = base64.b64encode(b"k" * 32).decode()
    parent, enclave = _parent_says(
        {"type": "challenge", "nonce": base64.b64encode(b"n" * 32).decode(), "profile": "p"},
        {"type": "welcome", "public_key": key, "wg_port": port, "attested": False},
    )
    with parent, enclave, pytest.raises(ControlError, match="wg_port"):
        register(enclave, b"e" * 32, timeout=5)


@pytest.mark.parametrize("text", [
    "[" * 2000,
    "{a: " * 2000 + "1" + "}" * 2000,
    "- " * 3000 + "x",
    "".join(" " * i + "a:\n" for i in range(1500)),
])
def test_deeply_nested_yaml_is_a_profile_error(text: str) -> None:
    # PyYAML's composer recurses per level: these raised RecursionError.
    with pytest.raises(ProfileError):
        parse_profile(text)


def test_flow_nesting_is_capped_before_the_scanner_goes_quadratic() -> None:
    # "[" * 1000 took 1.5 s and "[" * 5000 several seconds to refuse (2 KB of input); the
    # scanner now stops at MAX_FLOW_DEPTH, so the refusal names the cap.
    with pytest.raises(ProfileError, match=f"nested more than {MAX_FLOW_DEPTH} deep") as e:
        parse_profile("name: x\nparent:\n  egress:\n    allow: " + "[" * 5000)
    assert e.value.problems[0].line == 4
    ok = "name: x\nparent:\n  ingress: [{listen: 8443, to: 443}]\n"
    assert parse_profile(ok).parent.ingress[0].listen == 8443


@pytest.mark.parametrize("fwmark", [564339380, 0])
def test_a_set_refused_for_its_port_leaves_the_fwmark_as_it_was(tmp_path, fwmark: int) -> None:
    # uapi-server found it the day fwmark reached the sockets: the mark was applied, then the
    # listen port was refused, and the refused set had changed the device.
    from wgvsock.conn import StreamBind
    from wgvsock.device.device import Device

    bind = StreamBind("unix", unix_dir=str(tmp_path / "wg"))
    dev = Device("fzreg0", bind, run_dir=str(tmp_path / "run"))
    try:
        dev.uapi_set(parse_set("fwmark=7\n"))
        with pytest.raises(UAPIError):
            dev.uapi_set(parse_set(f"listen_port=4294967295\nfwmark={fwmark}\n"))
        assert dev.fwmark == 7 and bind.mark == 7
    finally:
        bind.close()
