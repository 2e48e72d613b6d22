"""parent.metrics in the profile: listen and cloudwatch, their defaults, refusals, round trip."""

from __future__ import annotations

import ipaddress

import pytest

from wgvsock.services.profile import CloudWatch, Metrics, dump_profile, parse_profile

from .test_profile import FILE, refused, y


def test_metrics_are_off_by_default():
    assert parse_profile("name: a\n", FILE).parent.metrics == Metrics(None, None)


def test_listen_and_cloudwatch():
    p = parse_profile(y("""
        name: a
        parent:
          metrics:
            listen: 127.0.0.1:9586
            cloudwatch: {namespace: Enclaves/wgvsock}
        """), FILE)
    assert p.parent.metrics == Metrics((ipaddress.ip_address("127.0.0.1"), 9586),
                                       CloudWatch("Enclaves/wgvsock", 60))


@pytest.mark.parametrize("text", [
    'listen: "[::1]:9586"',
    "cloudwatch: {namespace: wgvsock, interval: 10}",
    'listen: "0.0.0.0:9100"\n    cloudwatch: {namespace: "a b#c:d", interval: 300}',
])
def test_metrics_round_trip(text):
    p = parse_profile(f"name: a\nparent:\n  metrics:\n    {text}\n", FILE)
    assert parse_profile(dump_profile(p), FILE) == p


BAD = [
    ("listen: 9586", "parent.metrics.listen", "is not ADDRESS:PORT", "listen"),
    ("listen: localhost:9586", "parent.metrics.listen", "is not an IP address", "listen"),
    ('listen: "::1:9586"', "parent.metrics.listen", "needs brackets", "listen"),
    ("listen: 127.0.0.1:70000", "parent.metrics.listen", "is not ADDRESS:PORT", "listen"),
    ("cloudwatch: {interval: 60}", "parent.metrics.cloudwatch.namespace", "missing",
     "cloudwatch"),
    ("cloudwatch: {namespace: AWS/EC2}", "parent.metrics.cloudwatch.namespace", "AWS's own",
     "cloudwatch"),
    ("cloudwatch: {namespace: 'a%b'}", "parent.metrics.cloudwatch.namespace",
     "not a CloudWatch namespace", "cloudwatch"),
    ("cloudwatch: {namespace: x, interval: 5}", "parent.metrics.cloudwatch.interval",
     "out of range", "cloudwatch"),
    ("cloudwatch: yes", "parent.metrics.cloudwatch", "expected a mapping", "cloudwatch"),
    ("lisen: 127.0.0.1:1", "parent.metrics.lisen", "unknown key", "lisen"),
]


@pytest.mark.parametrize(("text", "key", "reason", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_metrics_are_refused_with_their_line(text, key, reason, needle):
    refused(f"name: a\nparent:\n  address: 10.9.0.1/30\n  metrics:\n    {text}\n", key, reason,
            needle)
