"""parent.metrics.cloudwatch: the sender and the doctor check against moto in server mode (a
real HTTP endpoint with IAM enforcement for the denied case) and the IMDSv2 stand-in of
test_aws. Throttling, which moto never does, goes through botocore's Stubber."""

# The moto server, IAM user and IMDS fixtures are test_aws's own, imported by name; pytest
# passes them as arguments of the same names, which is what F811 would flag.
# ruff: noqa: F811

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from botocore.stub import Stubber
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tests.unsayable import Unsayable
from wgvsock.services import aws
from wgvsock.services.metrics import cloudwatch as cw

from .test_aws import (  # noqa: F401 - fixtures
    FakeImds,
    Moto,
    _document,
    enforce_iam,
    imds,
    restricted,
    running_moto,
)

INSTANCE = "i-0123456789abcdef0"  # test_aws's identity document


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with running_moto() as m:
        yield m


class Series(Collector):
    """A registry source whose values the test sets: a counter and a gauge per key."""

    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.value = 100.0

    def collect(self) -> Iterator[Metric]:
        c = CounterMetricFamily("wireguard_sent_bytes_total", "x", labels=["public_key"])
        g = GaugeMetricFamily("wgvsock_peer_attested", "x", labels=["public_key"])
        for k in self.keys:
            c.add_metric([k], self.value)
            g.add_metric([k], 1)
        yield c
        yield g


def _registry(keys: list[str]) -> tuple[CollectorRegistry, Series]:
    reg = CollectorRegistry(auto_describe=False)
    src = Series(keys)
    reg.register(src)
    return reg, src


def _sums(moto: Moto, namespace: str, name: str) -> list[float]:
    client = moto.session.client("cloudwatch")
    now = dt.datetime.now(dt.UTC)
    stats = client.get_metric_statistics(
        Namespace=namespace, MetricName=name, StartTime=now - dt.timedelta(hours=1),
        EndTime=now + dt.timedelta(hours=1), Period=60, Statistics=["Sum"],
        Dimensions=[{"Name": "InstanceId", "Value": INSTANCE}, {"Name": "Profile", "Value": "demo"},
                    {"Name": "public_key", "Value": "k0"}])
    return [p["Sum"] for p in stats["Datapoints"]]


def test_sender_sends_counters_as_increases_with_dimensions(moto: Moto, imds: FakeImds) -> None:
    reg, src = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t1", 60, "demo", session=moto.session,
                                 imds=aws.Imds(imds.url))
    assert sender.send() == 2
    src.value = 150.0
    assert sender.send() == 2
    assert sender.state == "ok" and sender.calls == 2
    client = moto.session.client("cloudwatch")
    metrics = client.list_metrics(Namespace="wgvsock-t1")["Metrics"]
    assert {m["MetricName"] for m in metrics} == {"wireguard_sent_bytes_total",
                                                  "wgvsock_peer_attested"}
    for m in metrics:
        assert {d["Name"]: d["Value"] for d in m["Dimensions"]} == {
            "InstanceId": INSTANCE, "Profile": "demo", "public_key": "k0"}
    # 100 from zero, then the increase of 50: the sum is the counter's total.
    assert sum(_sums(moto, "wgvsock-t1", "wireguard_sent_bytes_total")) == 150.0


def test_a_counter_that_went_down_sends_its_value() -> None:
    fams = [CounterMetricFamily("x_total", "x", value=5)]
    now = dt.datetime.now(dt.UTC)
    ((_key, raw, datum),) = cw.metric_data(fams, [], {("x_total", ()): 9.0}, timestamp=now)
    assert (raw, datum["Value"], datum["Unit"]) == (5.0, 5.0, "Count")
    hi = cw.metric_data([GaugeMetricFamily("g_bytes", "x", value=3)], [], {}, timestamp=now,
                        high_resolution=True)
    assert hi[0][2]["StorageResolution"] == 1 and hi[0][2]["Unit"] == "Bytes"


def test_batches_respect_count_and_size() -> None:
    assert [len(b) for b in cw.batches(list(range(2500)), lambda _: 10)] == [1000, 1000, 500]
    # 400 kB each: two fit in 1 MB with the request's overhead, a third does not.
    assert [len(b) for b in cw.batches(list(range(5)), lambda _: 400_000)] == [2, 2, 1]
    datum = cw.metric_data([CounterMetricFamily("wireguard_sent_bytes_total", "x",
                                                labels=["public_key"])], [], {},
                           timestamp=dt.datetime.now(dt.UTC))
    assert datum == []  # a family without samples sends nothing


def test_many_series_go_in_calls_of_at_most_1000(moto: Moto, imds: FakeImds) -> None:
    reg, _ = _registry([f"k{i}" for i in range(1200)])  # 2400 data points
    sender = cw.CloudWatchSender(reg, "wgvsock-t2", 60, "demo", session=moto.session,
                                 imds=aws.Imds(imds.url))
    assert sender.send() == 2400
    assert sender.calls == 3
    pages = moto.session.client("cloudwatch").get_paginator("list_metrics")
    names = [m for p in pages.paginate(Namespace="wgvsock-t2") for m in p["Metrics"]]
    assert len(names) == 2400


@pytest.mark.usefixtures("enforce_iam")
def test_denied_permission_is_reported_once(restricted: boto3.Session, imds: FakeImds,
                                            caplog: pytest.LogCaptureFixture) -> None:
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t3", 60, "demo", session=restricted,
                                 imds=aws.Imds(imds.url))
    with caplog.at_level(logging.WARNING, logger="wgvsock.services.metrics"):
        for _ in range(3):
            assert sender.send() == 0
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    assert "cloudwatch:PutMetricData" in errors[0] and "access denied" in errors[0]
    assert "'wgvsock-t3'" in errors[0]
    assert sender.state == "denied" and sender.calls == 0


def test_throttling_is_reported_once_and_recovery_said(moto: Moto, imds: FakeImds,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t4", 60, "demo", session=moto.session,
                                 imds=aws.Imds(imds.url))
    assert sender.send() == 2  # sets the client up
    stub = Stubber(sender._client)
    for _ in range(2):
        stub.add_client_error("put_metric_data", "Throttling", "Rate exceeded", 400)
    stub.add_response("put_metric_data", {})
    with stub, caplog.at_level(logging.WARNING, logger="wgvsock.services.metrics"):
        assert sender.send() == 0
        assert sender.state == "throttled"
        assert sender.send() == 0
        assert sender.send() == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("throttled by CloudWatch" in m for m in messages) == 1, messages
    assert any("again" in m for m in messages)
    assert sender.state == "ok"


def test_off_ec2_the_host_name_is_the_instance(moto: Moto,
                                               caplog: pytest.LogCaptureFixture) -> None:
    import socket

    from .test_aws import _closed_port

    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t5", 60, "demo", session=moto.session,
                                 imds=aws.Imds(f"http://127.0.0.1:{_closed_port()}", timeout=0.3))
    with caplog.at_level(logging.WARNING, logger="wgvsock.services.metrics"):
        assert sender.send() == 2
    assert "InstanceId dimension is the host name" in caplog.text
    (m, _) = moto.session.client("cloudwatch").list_metrics(Namespace="wgvsock-t5")["Metrics"]
    assert {"Name": "InstanceId", "Value": socket.gethostname()} in m["Dimensions"]


def test_no_region_off_ec2_is_reported_once(moto: Moto, monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    from .test_aws import _closed_port

    monkeypatch.delenv("AWS_DEFAULT_REGION")
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t7", 60, "demo", session=boto3.Session(),
                                 imds=aws.Imds(f"http://127.0.0.1:{_closed_port()}", timeout=0.3))
    with caplog.at_level(logging.WARNING, logger="wgvsock.services.metrics"):
        assert sender.send() == 0
        assert sender.send() == 0
    assert sender.state == "region"
    assert caplog.text.count("no AWS region configured") == 1
    assert caplog.text.count("InstanceId dimension is the host name") == 1


def test_sender_thread_starts_and_stops(moto: Moto, imds: FakeImds) -> None:
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t6", 3600, "demo", session=moto.session,
                                 imds=aws.Imds(imds.url))
    sender.start()
    try:
        from tests.net.netlab import wait_for

        wait_for(lambda: sender.calls == 1, 10, "the first round at start")
    finally:
        sender.close()
    assert sender._thread is not None and not sender._thread.is_alive()


def test_an_unexpected_failure_is_logged_without_an_endpoints_password(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # What put_metric_data does not turn into a CloudWatchError was logged as it was said,
    # an endpoint URL with its user name and password included.
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t9", 60, "demo")

    def fail() -> int:
        raise ValueError("cannot send to https://user:s3cr3t-pw@monitoring.example/")

    monkeypatch.setattr(sender, "send", fail)
    sender._stop.set()  # one round
    with caplog.at_level(logging.ERROR, logger="wgvsock.metrics"):
        sender._run()
    assert "CloudWatch: ValueError: cannot send to https://***@monitoring.example/" in caplog.text
    assert "s3cr3t-pw" not in caplog.text


def test_an_unexpected_failure_whose_message_cannot_be_made_is_still_logged(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Before, its str() raised again while the line was made, out of _run: the sender's
    thread ended, and nothing more went to CloudWatch until the parent was restarted."""
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t9", 60, "demo")

    def fail() -> int:
        raise Unsayable()

    monkeypatch.setattr(sender, "send", fail)
    sender._stop.set()  # one round
    with caplog.at_level(logging.ERROR, logger="wgvsock.metrics"):
        sender._run()
    assert "CloudWatch: Unsayable (its message cannot be shown: ValueError)" in caplog.text
    assert sender.state == "other"


# ---------------------------------------------------------------------------------------------
# parent doctor


def test_doctor_checks_put_metric_data(moto: Moto, imds: FakeImds) -> None:
    checks = {c.name: c for c in aws.doctor_checks(aws.Imds(imds.url), session=moto.session,
                                                   cloudwatch=("wgvsock-doc", "demo"))}
    assert checks["CloudWatch"].ok is True, checks["CloudWatch"]
    assert "'wgvsock-doc'" in checks["CloudWatch"].detail
    # Without parent.metrics.cloudwatch the check is not made at all.
    assert "CloudWatch" not in {c.name for c in aws.doctor_checks(aws.Imds(imds.url),
                                                                   session=moto.session)}


@pytest.mark.usefixtures("enforce_iam")
def test_doctor_denied_names_the_permission(restricted: boto3.Session, imds: FakeImds) -> None:
    checks = {c.name: c for c in aws.doctor_checks(aws.Imds(imds.url), session=restricted,
                                                   cloudwatch=("wgvsock-doc", "demo"))}
    assert checks["CloudWatch"].ok is False
    assert "cloudwatch:PutMetricData" in checks["CloudWatch"].detail



@pytest.mark.usefixtures("enforce_iam")
def test_parent_doctor_command_names_the_missing_permission(
    moto: Moto, restricted: boto3.Session, imds: FakeImds, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
) -> None:
    """`wgvsock parent doctor` with parent.metrics.cloudwatch, as a user without the
    permission: the table's CloudWatch row says NOT READY and names cloudwatch:PutMetricData."""
    from wgvsock import cli

    from .test_aws import _instance

    moto.set_auth(False)
    imds.document = _document(_instance(moto, "m5.xlarge", True))
    moto.set_auth(True)
    creds = restricted.get_credentials()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", creds.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", creds.secret_key)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url)
    monkeypatch.setenv("COLUMNS", "200")
    profile = tmp_path / "p.yaml"
    text = (Path(__file__).parent / "data" / "profile-unix.yaml").read_text()
    profile.write_text(text.replace("  ingress:\n", "  metrics:\n    cloudwatch: {namespace: "
                                                   "wgvsock-doctor}\n  ingress:\n", 1))
    assert cli.main(["parent", "doctor", "--profile", str(profile)]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "CloudWatch" in line)
    assert "NOT READY" in row and "cloudwatch:PutMetricData" in out


def test_instance_metadata_that_answers_late_is_asked_again(
        moto: Moto, imds: FakeImds, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """IMDS refusing at first (not up yet at boot, throttled) must not fix the host name as the
    InstanceId, and leave the region unknown, for the parent's life: it is asked again at
    growing intervals until it answers."""
    import socket

    monkeypatch.delenv("AWS_DEFAULT_REGION")  # the region must come from IMDS
    now = [1000.0]
    imds.refuse_tokens = True
    reg, _ = _registry(["k0"])
    sender = cw.CloudWatchSender(reg, "wgvsock-t8", 60, "demo", session=boto3.Session(),
                                 imds=aws.Imds(imds.url), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="wgvsock.services.metrics"):
        assert sender.send() == 0  # no region yet
        asked = len(imds.requests)
        now[0] += cw.IMDS_RETRY_FIRST - 1
        assert sender.send() == 0
        assert len(imds.requests) == asked  # not yet asked again
        now[0] += 1
        assert sender.send() == 0
        assert len(imds.requests) > asked  # asked again, refused again: next in twice as long
        asked = len(imds.requests)
        imds.refuse_tokens = False
        now[0] += cw.IMDS_RETRY_FIRST
        assert sender.send() == 0 and len(imds.requests) == asked
        now[0] += cw.IMDS_RETRY_FIRST
        assert sender.send() == 2
    assert caplog.text.count(f"InstanceId dimension is the host name {socket.gethostname()} "
                             "until the instance metadata service answers") == 1
    assert f"the instance metadata service answered: InstanceId {INSTANCE} from now on" \
        in caplog.text
    (m, _) = moto.session.client("cloudwatch").list_metrics(Namespace="wgvsock-t8")["Metrics"]
    assert {"Name": "InstanceId", "Value": INSTANCE} in m["Dimensions"]
    # Answered once: never asked again.
    asked = len(imds.requests)
    now[0] += 10 * cw.IMDS_RETRY_MAX
    assert sender.send() == 2
    assert len(imds.requests) == asked
