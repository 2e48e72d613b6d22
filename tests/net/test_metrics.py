"""The parent's metrics end to end: `parent up` with parent.metrics in the profile, in the
namespaces of test_roles.World (Unix stand-in for vsock).

/metrics is scraped inside the parent's namespace and parsed with prometheus_client's own
parser; every value is checked against `wg show dump` and the nftables counters of the same
moment. CloudWatch goes to moto in server mode, started inside the parent's namespace.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
from ipaddress import ip_network
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from wgvsock.services import firewall
from wgvsock.services.metrics.prometheus import MAX_AGE

from .netlab import Lab, wait_for
from .test_roles import WGVSOCK, World

pytestmark = [pytest.mark.root]

PORT = 9586
PYTHON = str(Path(sys.executable))


def with_metrics(world: World, block: str) -> None:
    """Puts `block` (lines under parent.metrics, indented four spaces) into the profile."""
    text = world.profile.read_text()
    world.profile.write_text(text.replace("  ingress:\n", f"  metrics:\n{block}  ingress:\n", 1))


@pytest.fixture
def world(lab: Lab):
    w = World(lab)
    with_metrics(w, f"    listen: 127.0.0.1:{PORT}\n")
    try:
        yield w
    finally:
        w.close()


def scrape(world: World) -> dict[str, list]:
    res = world.parent.run("curl", "-sf", "--max-time", "5", f"http://127.0.0.1:{PORT}/metrics",
                           check=False)
    assert res.returncode == 0, res.stderr
    return {f.name: f.samples for f in text_string_to_metric_families(res.stdout)}


def wg_dump(world: World) -> list[list[str]]:
    # `wg` only looks in /var/run/wireguard: bind the parent's run directory there, in the
    # private mount namespace `ip netns exec` gives each command.
    os.makedirs("/var/run/wireguard", exist_ok=True)
    res = world.parent.run(
        "sh", "-c", 'mount --bind "$1" /var/run/wireguard && exec wg show wg0 dump', "sh",
        str(world.parent_uapi().parent))
    return [line.split("\t") for line in res.stdout.splitlines()]


def one(samples: list, **labels: str) -> float:
    found = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (labels, samples)
    return found[0]


def steady(world: World):
    """(dump, nft counters, scraped families) of one moment: dump and nft are read before and
    after the scrape, and the round is retried if anything moved (a keepalive). A page is
    served for up to MAX_AGE after its collection, so a retry's scrape comes more than that
    after the last one: its page is collected between the round's two readings."""
    scraped = None
    for _ in range(20):
        if scraped is not None:
            time.sleep(max(0.0, scraped + MAX_AGE + 0.05 - time.monotonic()))
        dump = wg_dump(world)
        nft = firewall.read_counters(world.name, netns=world.parent.name)
        families = scrape(world)
        scraped = time.monotonic()
        if wg_dump(world) == dump and firewall.read_counters(
                world.name, netns=world.parent.name) == nft:
            return dump, nft, families
    raise AssertionError("counters never held still")


def test_metrics_page_matches_wg_and_nft(world: World) -> None:
    world.parent_cmd("up")
    world.start_enclave()
    wait_for(world.egress_works, 30, "the enclave to fetch a page through the parent's NAT")
    assert world.curl(world.enclave, "http://198.51.100.3/", timeout=1.5) is None  # denied
    dump, nft, families = steady(world)

    _device, *peers = dump
    ((pub, _psk, _endpoint, allowed, handshake, rx, tx, _ka),) = peers
    labels = {"interface": "wg0", "public_key": pub, "allowed_ips": allowed}
    assert one(families["wireguard_sent_bytes"], **labels) == int(tx) > 0
    assert one(families["wireguard_received_bytes"], **labels) == int(rx) > 0
    assert one(families["wireguard_latest_handshake_seconds"], **labels) == int(handshake) > 0
    states = families["wgvsock_peer_connection_state"]
    assert one(states, public_key=pub, state="connected") == 1
    assert sum(s.value for s in states) == 1
    assert one(families["wgvsock_peer_attested"], public_key=pub) == 0  # no attestation here
    assert one(families["wgvsock_transport_accepted_connections"], interface="wg0") >= 1

    egress = families["wgvsock_egress_packets"]
    name = world.name
    assert one(egress, profile=name, verdict="allowed") == nft["egress_allowed"].packets > 0
    assert one(egress, profile=name, verdict="denied") == nft["egress_denied"].packets > 0
    assert one(egress, profile=name, verdict="blocked") == (
        nft["egress_blocked"].packets + nft["local_blocked"].packets)
    assert one(egress, profile=name, verdict="limited") == nft["egress_limited"].packets
    rules = families["wgvsock_egress_rule_packets"]
    for rule in ("169.254.169.254/32", "198.51.100.3/32"):
        assert one(rules, profile=name, action="deny", rule=rule) == nft[f"deny {rule}"].packets
    assert one(rules, action="deny", rule="198.51.100.3/32") > 0
    assert one(rules, action="allow", rule="0.0.0.0/0") == nft["allow 0.0.0.0/0"].packets
    named = families["wgvsock_firewall_packets"]
    for counter in firewall.COUNTERS:
        assert one(named, profile=name, counter=counter) == nft[counter].packets
    # No DNS forwarder runs: its series are absent, not zero.
    assert "wgvsock_dns_queries" not in families and "wgvsock_dns_refused" not in families

    # `wgvsock status` shows the same egress counters (read-only UAPI keys).
    res = world.parent.run(WGVSOCK, "status", "--once", "--json", env=world.env_for("parent"))
    (iface,) = json.loads(res.stdout)["interfaces"]
    assert iface["egress"] == {"allowed": nft["egress_allowed"].packets,
                               "denied": nft["egress_denied"].packets,
                               "blocked": nft["egress_blocked"].packets
                               + nft["local_blocked"].packets,
                               "limited": nft["egress_limited"].packets}
    assert iface["dns"] is None
    # `wg` ignores the extra keys: the dump above parsed, and `wg show` works too.
    assert world.parent.run("sh", "-c", 'mount --bind "$1" /var/run/wireguard && wg show wg0',
                            "sh", str(world.parent_uapi().parent)).returncode == 0


def test_the_name_filter_serves_the_named_families(world: World) -> None:
    """`/metrics?name[]=...` (the Prometheus federation convention prometheus_client honours)
    used to serve an empty page: prometheus_client picks collectors by the names they
    describe, and ours describes none up front."""
    world.parent_cmd("up")
    world.start_enclave()
    wait_for(world.egress_works, 30, "the enclave to fetch a page through the parent's NAT")

    def filtered(*names: str) -> str:
        query = "&".join(f"name[]={n}" for n in names)
        # -g: the brackets are the parameter's name, not a curl glob.
        res = world.parent.run("curl", "-gsf", "--max-time", "5",
                               f"http://127.0.0.1:{PORT}/metrics?{query}", check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout

    # As the text format prints them (a counter with its _total)...
    text = filtered("wireguard_sent_bytes_total", "wgvsock_peer_attested")
    assert {f.name: len(f.samples) for f in text_string_to_metric_families(text)} == {
        "wireguard_sent_bytes": 1, "wgvsock_peer_attested": 1}
    for line in ("# HELP wireguard_sent_bytes_total Bytes sent to the peer",
                 "# TYPE wireguard_sent_bytes_total counter",
                 "# TYPE wgvsock_peer_attested gauge"):
        assert line in text.splitlines(), text
    # ...or by the family's name.
    families = {f.name: f.samples for f in text_string_to_metric_families(
        filtered("wgvsock_egress_packets"))}
    assert list(families) == ["wgvsock_egress_packets"]
    assert {s.labels["verdict"] for s in families["wgvsock_egress_packets"]} == {
        "allowed", "denied", "blocked", "limited"}
    assert filtered("wgvsock_no_such_metric") == ""


def test_the_control_port_s_refused_connections_are_counted(world: World) -> None:
    """Before: the control port counted the connections it turned away (refused_connections)
    but no metric said so, where the WireGuard port's are
    wgvsock_transport_refused_connections_total. Here a peer's third connection while its
    two registrations are in progress (MAX_PENDING_PER_PEER) is the one refused: the Unix
    stand-in has no CID to refuse by."""
    from wgvsock.roles.common import unix_socket_path
    from wgvsock.services.control import MAX_PENDING_PER_PEER, read_message
    from wgvsock.services.profile import parse_profile

    world.parent_cmd("up")
    t = parse_profile(world.profile.read_text()).transport
    path = unix_socket_path(t.path, t.control_port)
    assert one(scrape(world)["wgvsock_control_refused_connections"], profile=world.name) == 0
    held: list[socket.socket] = []
    try:
        for _ in range(MAX_PENDING_PER_PEER):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.connect(path)
            # Its challenge: admitted and in its exchange before the next one comes.
            assert read_message(s, time.monotonic() + 10)["type"] == "challenge"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as refused:
            refused.settimeout(10)
            refused.connect(path)
            assert refused.recv(1) == b""  # closed without a challenge
        # (A page is served for up to MAX_AGE after it was collected.)
        wait_for(lambda: one(scrape(world)["wgvsock_control_refused_connections"],
                             profile=world.name) == 1, 10, "the refusal on /metrics")
    finally:
        for s in held:
            s.close()


def test_the_control_port_s_registrations_are_counted(world: World) -> None:
    """The enclave's registration is wgvsock_control_registrations_total, and a refused one
    wgvsock_control_refused_registrations_total by reason (every reason there at 0 from the
    start): here one of a control protocol version this parent does not speak. Before,
    neither was a metric: the parent counted registrations in a bare attribute."""
    import base64

    from wgvsock.roles.common import unix_socket_path
    from wgvsock.services.control import encode, read_message
    from wgvsock.services.profile import parse_profile

    def counts() -> tuple[float, dict[str, float]]:
        families = scrape(world)
        refused = families["wgvsock_control_refused_registrations"]
        return (one(families["wgvsock_control_registrations"], profile=world.name),
                {s.labels["reason"]: s.value for s in refused
                 if s.labels["profile"] == world.name})

    world.parent_cmd("up")
    assert counts() == (0, {"verdict": 0, "throttled": 0, "version": 0})
    world.start_enclave()
    wait_for(world.egress_works, 30, "the enclave to fetch a page through the parent's NAT")
    # (A page is served for up to MAX_AGE after it was collected.)
    wait_for(lambda: counts()[0] == 1, 10, "the registration on /metrics")
    t = parse_profile(world.profile.read_text()).transport
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(unix_socket_path(t.path, t.control_port))
        challenge = read_message(s, time.monotonic() + 10)
        s.sendall(encode({"v": 2, "type": "register", "nonce": challenge["nonce"],
                          "public_key": base64.b64encode(b"G" * 32).decode()}))
        assert read_message(s, time.monotonic() + 10)["type"] == "refused"
    wait_for(lambda: counts() == (1, {"verdict": 0, "throttled": 0, "version": 1}), 10,
             "the refused registration on /metrics")


def doctor_says(world: World, check: str) -> tuple[str, str]:
    """(state, detail) of CHECK in `wgvsock parent doctor`'s table, run in the parent."""
    world.parent_env["COLUMNS"] = "400"  # a row per check
    out = world.parent_cmd("doctor", check=False).stdout
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) == 5 and cells[1] == check:
            return cells[2], cells[3]
    raise AssertionError(f"no {check!r} in {out}")


def test_a_metrics_port_taken_at_start_does_not_keep_the_tunnel_down(world: World) -> None:
    """Any local user may bind port 9586 before the parent does (at boot, or while systemd
    restarts it). That failed `parent up` whole, every restart, until systemd gave up: one
    command kept the tunnel down (review finding). The tunnel now comes up without metrics,
    says so, and takes the port once it is free."""
    squatter = world.parent.popen(PYTHON, "-c", (
        "import socket, time\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {PORT})); s.listen()\n"
        "print('ready', flush=True); time.sleep(60)\n"), stdout=subprocess.PIPE)
    try:
        assert squatter.stdout is not None and squatter.stdout.readline() == b"ready\n"
        state, detail = doctor_says(world, "metrics port")
        assert state == "NOT READY" and detail.startswith(
            f"parent.metrics.listen 127.0.0.1 port {PORT} is held by {Path(PYTHON).name} "
            f"(pid {squatter.pid}): `up` comes up without metrics"), detail
        log = world.lab.tmp / "parent.log"
        world.parent_env["WGVSOCK_LOG_FILE"] = str(log)
        res = world.parent_cmd("up", check=False)
        assert res.returncode == 0, res.stderr
        assert "parent.metrics.listen 127.0.0.1 port 9586 is taken by another process" in \
            log.read_text()
        assert firewall.exists(world.name, netns=world.parent.name)
        assert "wg0" in world.parent.ip("-o", "link", "show").stdout
    finally:
        squatter.kill()
        squatter.wait()

    def served() -> bool:
        return world.parent.run("curl", "-sf", "--max-time", "2",
                                f"http://127.0.0.1:{PORT}/metrics", check=False).returncode == 0

    wait_for(served, 20, "the parent to take the metrics port once it was free")
    assert "wgvsock_firewall_packets" in scrape(world)
    state, detail = doctor_says(world, "metrics port")
    assert state == "ready" and detail.startswith(
        f"parent.metrics.listen 127.0.0.1 port {PORT} is served by this profile's running "
        "`wgvsock parent up` (pid"), detail


def test_a_metrics_address_not_on_this_host_is_refused_cleanly(world: World) -> None:
    """A port taken is waited for; an address the host does not have is a mistake in the
    profile, refused before anything is changed."""
    world.profile.write_text(world.profile.read_text().replace(
        f"listen: 127.0.0.1:{PORT}", "listen: 192.0.2.77:9586"))
    res = world.parent_cmd("up", check=False)
    assert res.returncode != 0
    assert "parent.metrics.listen 192.0.2.77 port 9586" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
    assert not firewall.exists(world.name, netns=world.parent.name)
    assert "wg0" not in world.parent.ip("-o", "link", "show").stdout


MOTO_PORT = 5055
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{MOTO_PORT}",
    # Off EC2 on purpose: the sender falls back to the host name for InstanceId.
    "AWS_EC2_METADATA_SERVICE_ENDPOINT": "http://127.0.0.1:1", "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
}
LIST_METRICS = """
import json, boto3
pages = boto3.client("cloudwatch").get_paginator("list_metrics")
print(json.dumps([m for p in pages.paginate(Namespace="wgvsock-e2e") for m in p["Metrics"]]))
"""


def test_cloudwatch_gets_the_same_metrics(lab: Lab) -> None:
    world = World(lab, parent_env=AWS_ENV)
    moto = None
    try:
        with_metrics(world, "    cloudwatch: {namespace: wgvsock-e2e, interval: 10}\n")
        moto = world.parent.popen(str(Path(PYTHON).parent / "moto_server"), "-H", "127.0.0.1",
                                  "-p", str(MOTO_PORT), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        aws_env = {**os.environ, **AWS_ENV}
        wait_for(lambda: world.parent.run("curl", "-s", f"http://127.0.0.1:{MOTO_PORT}/",
                                          check=False).returncode == 0, 20, "moto to listen")
        world.parent_cmd("up")
        world.start_enclave()
        wait_for(world.egress_works, 30, "the tunnel")

        def sent() -> dict[str, list[dict[str, str]]]:
            res = world.parent.run(PYTHON, "-c", LIST_METRICS, env=aws_env)
            return {m["MetricName"]: m["Dimensions"] for m in json.loads(res.stdout)
                    if any(d["Name"] == "public_key" for d in m["Dimensions"])
                    or m["MetricName"].startswith("wgvsock_egress")}

        # The first round goes out at start, before the enclave is there; the next carries it.
        wait_for(lambda: "wireguard_sent_bytes_total" in sent(), 30, "per-peer data points")
        metrics = sent()
        dims = {d["Name"]: d["Value"] for d in metrics["wireguard_sent_bytes_total"]}
        assert dims["Profile"] == world.name and dims["interface"] == "wg0"
        assert dims["InstanceId"] == socket.gethostname()
        assert {"wireguard_received_bytes_total", "wireguard_latest_handshake_seconds",
                "wgvsock_egress_packets_total", "wgvsock_egress_rule_packets_total"} <= set(metrics)
    finally:
        world.close()
        if moto is not None:
            moto.kill()
            moto.wait()


class _NoDevice:
    """A parent before its device exists: only the profile-level series are collected."""

    def __init__(self, name: str, counters: object) -> None:
        egress = SimpleNamespace(allow_names=[])
        self.profile = SimpleNamespace(name=name, parent=SimpleNamespace(egress=egress))
        self.device = self.enclave_key = self.verdict = None
        self.counters = counters


def test_dns_counters_feed_status_keys_and_metrics(lab: Lab, caplog) -> None:
    """The hook part 1's forwarder plugs into: its counts appear as UAPI keys and series; a
    missing table is logged once and leaves the egress numbers out instead of failing, with
    nft's reason in their place (the dashboard says it)."""
    from prometheus_client import generate_latest

    from wgvsock.services.metrics.counters import DnsCounters, ParentCounters
    from wgvsock.services.metrics.prometheus import registry_for

    ns = lab.netns("fw")
    ticks = itertools.count(0, 10)  # every reading is past the cache's second
    counters = ParentCounters("mdns", dns=lambda: DnsCounters(5, 2), netns=ns.name,
                              clock=lambda: next(ticks))
    with caplog.at_level("WARNING", logger="wgvsock.services.metrics"):
        keys = counters.uapi_keys()
        why = keys.pop("wgvsock_egress_error")
        assert keys == {"wgvsock_dns_queries": "5", "wgvsock_dns_refused": "2"}
        # nft's first line only (the others point at the command with ^^^).
        assert why.startswith("nft -t list table inet wgvsock_mdns: ") and "^" not in why, why
        assert "No such file or directory" in why, why
        counters.read()
    assert caplog.text.count("cannot read the firewall counters of mdns") == 1
    firewall.apply(firewall.FirewallSpec(name="mdns", tunnel_interface="wg0",
                                         enclave_addresses=["10.77.0.2"],
                                         deny=[firewall.Rule(ip_network("192.0.2.0/24"))]),
                   netns=ns.name)
    assert counters.uapi_keys() == {
        "wgvsock_egress_allowed": "0", "wgvsock_egress_denied": "0", "wgvsock_egress_blocked": "0",
        "wgvsock_egress_limited": "0",
        "wgvsock_dns_queries": "5", "wgvsock_dns_refused": "2"}
    text = generate_latest(registry_for(_NoDevice("mdns", counters))).decode()
    families = {f.name: f.samples for f in text_string_to_metric_families(text)}
    assert one(families["wgvsock_dns_queries"], profile="mdns") == 5
    assert one(families["wgvsock_dns_refused"], profile="mdns") == 2
    assert one(families["wgvsock_egress_rule_packets"], action="deny", rule="192.0.2.0/24") == 0
    assert "wireguard_sent_bytes" not in families


def test_counters_never_go_back_across_a_table_replaced_below_them(lab: Lab) -> None:
    """`parent reload` reads the counters, then loads the new table starting from them; a
    reading in between is higher than the new table's start, and a table put back after
    `nft flush ruleset` starts at zero. Prometheus would take either for a restart and count
    the whole value again, so what the parent reports never goes down."""
    from wgvsock.services.metrics.counters import ParentCounters

    ns = lab.netns("fw")
    ticks = itertools.count(0, 10)  # every reading is past the cache's second
    counters = ParentCounters("mmono", netns=ns.name, clock=lambda: next(ticks))

    def table(**start: firewall.Counter) -> None:
        firewall.apply(firewall.FirewallSpec(
            name="mmono", tunnel_interface="wg0", enclave_addresses=["10.77.0.2"],
            deny=[firewall.Rule(ip_network("192.0.2.0/24"))], counters=start), netns=ns.name)

    try:
        table(egress_allowed=firewall.Counter(100, 10_000))
        assert counters.uapi_keys()["wgvsock_egress_allowed"] == "100"
        table(egress_allowed=firewall.Counter(90, 9_000))  # carried over from before the 100
        assert counters.uapi_keys()["wgvsock_egress_allowed"] == "100"
        table(egress_allowed=firewall.Counter(95, 9_500))  # 5 more since
        assert counters.uapi_keys()["wgvsock_egress_allowed"] == "105"
        table()  # put back from nothing
        reading = counters.read()
        assert reading.firewall is not None
        assert reading.firewall["egress_allowed"] == firewall.Counter(105, 10_500)
    finally:
        firewall.remove("mmono", netns=ns.name)
