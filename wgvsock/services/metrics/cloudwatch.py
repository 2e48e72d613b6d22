"""`parent.metrics.cloudwatch`: the parent's metrics, sent to CloudWatch every interval.

The data points are the Prometheus registry's own samples, so both outputs carry the same
metrics under the same names. Dimensions: ``InstanceId`` (from IMDSv2; off EC2 the host name)
and ``Profile``, plus each sample's labels (``interface``, ``public_key``, ``verdict``, ...).

Counters go out as their increase since the last data point CloudWatch accepted (a counter that
went down, because a peer or the table was replaced, sends its new value), which is what a Sum
statistic and an alarm want; gauges go out as they are. ``wireguard_latest_handshake_seconds``
is a Unix time: ``EPOCH(m) - m`` in metric math is the handshake's age.

Each PutMetricData call carries at most 1000 data points and 1 MB (the API's limits). A failure
is logged once per kind (access denied, throttled, no credentials, unreachable) until a call
succeeds again, so a missing permission makes one clear line, not one per minute.
"""

from __future__ import annotations

import datetime as dt
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric

from ...safetext import error, without_userinfo
from ...threads import NamedThread
from .. import aws

log = logging.getLogger("wgvsock.metrics")

MAX_DATA_POINTS = 1000  # per PutMetricData call
# After IMDS failed, seconds until it is asked again: doubling from the first to the last.
IMDS_RETRY_FIRST = 60.0
IMDS_RETRY_MAX = 3600.0
MAX_REQUEST_BYTES = 1_000_000  # per call; measured below as the (largest) query encoding
_MAX_DIMENSION_VALUE = 1024

SeriesKey = tuple[str, tuple[tuple[str, str], ...]]


def _unit(name: str) -> str:
    if "_bytes" in name:
        return "Bytes"
    if name.endswith("_total"):
        return "Count"
    return "None"


def metric_data(
    families: Iterable[Metric],
    dimensions: list[dict[str, str]],
    sent: dict[SeriesKey, float],
    *,
    timestamp: dt.datetime,
    high_resolution: bool = False,
) -> list[tuple[SeriesKey, float, dict[str, Any]]]:
    """(series, raw value, MetricDatum) for every sample; counters as increases over SENT
    (the raw values CloudWatch last accepted, per series)."""
    out = []
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # prometheus_client's counter creation times: not a measurement
            labels = tuple(sorted(sample.labels.items()))
            key: SeriesKey = (sample.name, labels)
            value = float(sample.value)
            if family.type == "counter":
                before = sent.get(key, 0.0)
                shown = value - before if value >= before else value
            else:
                shown = value
            datum: dict[str, Any] = {
                "MetricName": sample.name,
                "Dimensions": dimensions + [
                    {"Name": k, "Value": v[:_MAX_DIMENSION_VALUE]} for k, v in labels if v],
                "Timestamp": timestamp,
                "Value": shown,
                "Unit": _unit(sample.name),
            }
            if high_resolution:
                datum["StorageResolution"] = 1
            out.append((key, value, datum))
    return out


def _encoded_size(datum: dict[str, Any]) -> int:
    """Bytes the datum takes in a query-encoded request with the largest member index: the
    bulkiest of the protocols botocore may use (query, JSON, CBOR), so a bound for all."""
    prefix = f"MetricData.member.{MAX_DATA_POINTS}."
    fields: list[tuple[str, str]] = []
    for k, v in datum.items():
        if k == "Dimensions":
            for i, d in enumerate(v, 1):
                fields += [(f"{prefix}Dimensions.member.{i}.Name", d["Name"]),
                           (f"{prefix}Dimensions.member.{i}.Value", d["Value"])]
        else:
            fields.append((prefix + k, v.isoformat() if isinstance(v, dt.datetime) else str(v)))
    return len(urllib.parse.urlencode(fields)) + 1


def batches(items: list[Any], size: Callable[[Any], int], *, limit: int = MAX_DATA_POINTS,
            max_bytes: int = MAX_REQUEST_BYTES, overhead: int = 1024) -> list[list[Any]]:
    """ITEMS cut into runs of at most LIMIT items and MAX_BYTES (OVERHEAD for the rest of the
    request: action, version, namespace)."""
    out: list[list[Any]] = []
    cur: list[Any] = []
    used = overhead
    for item in items:
        n = size(item)
        if cur and (len(cur) >= limit or used + n > max_bytes):
            out.append(cur)
            cur, used = [], overhead
        cur.append(item)
        used += n
    if cur:
        out.append(cur)
    return out


class CloudWatchSender:
    """A thread that sends REGISTRY's samples to NAMESPACE every INTERVAL seconds."""

    def __init__(self, registry: CollectorRegistry, namespace: str, interval: int, profile: str,
                 *, session: Any = None, imds: aws.Imds | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.namespace = namespace
        self.interval = interval
        self.profile = profile
        self._session = session
        self._imds = imds
        self._client: Any = None
        self._dimensions: list[dict[str, str]] | None = None
        self._region: str | None = None  # the instance's, when boto3 has none configured
        self._clock = clock
        # IMDS is asked until it has answered once (it may not be up yet at boot, or be
        # throttled), at growing intervals: a first failure must not fix the host name as the
        # InstanceId, and leave the region unknown, for the parent's whole life.
        self._identified = False
        self._imds_failures = 0
        self._imds_next = 0.0
        self._sent: dict[SeriesKey, float] = {}
        self._reported: str | None = None  # the kind of failure already logged
        self.state = "starting"  # ok, or the kind of the last failure
        self.calls = 0  # successful PutMetricData calls
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = NamedThread(target=self._run, name="cloudwatch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # A daemon thread: a call still in flight must not hold up `parent down`.
            self._thread.join(2.0)

    def _run(self) -> None:
        while True:
            try:
                self.send()
            except Exception as e:  # the sender must never take the parent down
                # Not an AWSError, whose words are cleaned: an endpoint URL in them would be
                # logged with its user name and password.
                self._report("other", "CloudWatch: "
                             + error(e, 2000, clean=without_userinfo))
            if self._stop.wait(self.interval):
                return

    def _report(self, kind: str, message: str) -> None:
        self.state = kind
        if self._reported != kind:
            log.error("%s", message)
            self._reported = kind

    def _identify(self) -> None:
        """The InstanceId dimension and the instance's region, from IMDS once it answers;
        until then the host name."""
        if self._identified or self._clock() < self._imds_next:
            return
        try:
            ident = (self._imds or aws.Imds()).identity()
        except aws.AWSError as e:
            self._imds_failures += 1
            delay = min(IMDS_RETRY_MAX, IMDS_RETRY_FIRST * 2 ** (self._imds_failures - 1))
            self._imds_next = self._clock() + delay
            if self._dimensions is None:
                self._dimensions = self._dimensions_for(socket.gethostname())
                log.warning("CloudWatch: %s; the InstanceId dimension is the host name %s "
                            "until the instance metadata service answers (asked again in "
                            "%.0f s, then less often)", e, socket.gethostname(), delay)
            return
        self._identified = True
        self._region = ident.region
        if self._dimensions is not None:
            log.warning("CloudWatch: the instance metadata service answered: InstanceId %s "
                        "from now on, in place of the host name", ident.instance_id)
        self._dimensions = self._dimensions_for(ident.instance_id)

    def _dimensions_for(self, instance_id: str) -> list[dict[str, str]]:
        return [{"Name": "InstanceId", "Value": instance_id},
                {"Name": "Profile", "Value": self.profile}]

    def _setup(self) -> bool:
        self._identify()
        if self._client is not None:
            return True
        import boto3

        session = self._session or boto3.Session()
        try:
            self._client = aws.cloudwatch_client(session, session.region_name or self._region)
        except aws.AWSError as e:
            self._report("region", str(e))
            return False
        return True

    def send(self) -> int:
        """One round; returns the data points CloudWatch accepted."""
        if not self._setup():
            return 0
        assert self._dimensions is not None
        items = metric_data(self.registry.collect(), self._dimensions, self._sent,
                            timestamp=dt.datetime.now(dt.UTC),
                            high_resolution=self.interval < 60)
        accepted = 0
        for batch in batches(items, lambda item: _encoded_size(item[2])):
            try:
                aws.put_metric_data(self._client, self.namespace, [d for _, _, d in batch])
            except aws.CloudWatchError as e:
                self._report(e.kind, str(e))
                return accepted  # the rest would fail alike; they go with the next round
            self.calls += 1
            accepted += len(batch)
            self._sent.update((key, raw) for key, raw, _ in batch)
        if self._reported is not None:
            log.warning("CloudWatch: sending to namespace %r again", self.namespace)
            self._reported = None
        self.state = "ok"
        return accepted
