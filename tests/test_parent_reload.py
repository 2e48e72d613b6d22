"""`parent reload`'s decisions without the host: which keys a running parent can take, and
an enclave judged under a policy that a reload replaced before it was installed. End to end
(namespaces, nftables, the control channel): tests/net/test_reload.py."""

from __future__ import annotations

import pytest

from wgvsock.roles.parent import Parent, RoleError
from wgvsock.services.control import ControlError
from wgvsock.services.profile import changed_keys, parse_profile

BASE = """\
version: 1
name: pay
interface: wg0
transport: {kind: unix, path: /run/wgvsock/pay}
parent:
  address: 10.77.0.1/30
  private_key: /etc/wgvsock/pay.key
  egress:
    allow: [0.0.0.0/0]
  ingress:
    - {listen: 8443, to: 8080}
enclave:
  address: 10.77.0.2/30
"""


def profile(text: str = BASE, **replace: str):
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return parse_profile(text, "pay.yaml")


def test_changed_keys_name_each_leaf_that_differs() -> None:
    a = profile()
    assert changed_keys(a, profile()) == []
    b = profile(**{"allow: [0.0.0.0/0]": "allow: [0.0.0.0/0, api.example.com]",
                   "listen: 8443": "listen: 9443"})
    # Resolved values: with a name in use, enclave.dns defaults to the parent's forwarder,
    # and dns_grace appears.
    assert changed_keys(a, b) == ["parent.egress.allow", "parent.ingress", "enclave.dns",
                                  "parent.egress.dns_grace"]
    c = profile(BASE + "attestation:\n  pcrs: {0: " + "ab" * 48 + "}\n")
    assert changed_keys(a, c) == ["attestation.pcrs.0"]
    d = profile(**{"interface: wg0": "interface: wg1"})
    assert changed_keys(a, d) == ["interface"]


class Device:
    """What Parent._install_enclave uses of the device: uapi_set (through configure)."""

    def __init__(self) -> None:
        self.configs: list = []
        self.extra_status: dict = {}

    def uapi_set(self, cfg) -> None:
        self.configs.append(cfg)


def test_a_reload_refuses_keys_it_cannot_change_and_changes_nothing() -> None:
    p = Parent(profile())
    new = profile(**{"interface: wg0": "interface: wg1", "version: 1": "version: 1\nmtu: 1400"})
    with pytest.raises(RoleError, match=r"interface \(line 4\), mtu \(line 2\) changed"):
        p.reload(new)
    assert p.profile.interface == "wg0"
    assert p.reload(profile()) == ["nothing changed"]


def test_enclave_only_keys_are_reported_not_applied() -> None:
    p = Parent(profile())
    new = profile(**{"  address: 10.77.0.2/30": "  address: 10.77.0.2/30\n  dns: [10.0.0.2]"})
    done = p.reload(new)
    assert done == ["enclave.dns: read by the enclave from the profile in its image, not by "
                    "the parent; they take effect with a new image"]


def test_an_enclave_verified_under_a_policy_a_reload_replaced_is_judged_again() -> None:
    """A registration's verdict and its install are apart in time; a reload may tighten the
    policy in between (installs and the reload's check of the running enclave take turns, but
    a verdict already given would slip through): the install asks the new policy."""
    p = Parent(profile())
    p.device = Device()  # type: ignore[assignment]
    key = b"K" * 32
    verdict = p._verify(key, None, b"n" * 32)  # no document: fine while require is false
    assert verdict.accepted
    p.profile = profile(BASE + "attestation:\n  require: true\n  pcrs: {0: " + "ab" * 48 + "}\n")
    with pytest.raises(ControlError, match="requires attestation"):
        p._install_enclave(key, verdict)
    assert p.device.configs == [] and p.enclave_key is None  # type: ignore[attr-defined]
    # Under an unchanged policy the verdict stands.
    p.profile = profile()
    p._install_enclave(key, verdict)
    assert p.enclave_key == key and len(p.device.configs) == 1  # type: ignore[attr-defined]
