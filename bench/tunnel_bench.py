"""End-to-end tunnel benchmark: our daemon over UDP, Unix stream and TCP vs Debian's wireguard-go.

Run as root: .venv/bin/python bench/tunnel_bench.py [--seconds S] [--json FILE]

Two network namespaces joined by a veth cable; in each case a fresh pair of WireGuard interfaces
(MTU 1420) is started, ping latency is measured (20 pings, -i 0.05), then iperf3 runs one TCP
stream for S seconds a->b and again with -R (b->a), and the daemons' VmRSS is read afterwards.
The Unix stream transport is the stand-in for vsock (DESIGN.md §5: never connect AF_VSOCK).
Everything made is removed at the end, also on Ctrl-C, SIGTERM or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

from wgvsock.ui.nslab import (
    Keys,
    Lab,
    LabError,
    Namespace,
    interrupts_raise,
    missing_tools,
    parse_ping,
    rss_kib,
)

MTU = 1420
PING_COUNT = 20
PING_INTERVAL = 0.05
IPERF_PORT = 5201
TOOLS = ("ip", "wg", "iperf3", "ping", "ss", "wireguard-go")
VETH_A, VETH_B = "192.168.201.1", "192.168.201.2"


@dataclass(frozen=True)
class Case:
    key: str
    label: str
    impl: str  # "wgvsock" or "wireguard-go"
    network: str


CASES = (
    Case("wgvsock-udp", "wgvsock udp", "wgvsock", "udp"),
    Case("wgvsock-unix", "wgvsock unix stream", "wgvsock", "unix"),
    Case("wgvsock-tcp", "wgvsock tcp", "wgvsock", "tcp"),
    Case("wireguard-go-udp", "wireguard-go udp", "wireguard-go", "udp"),
)
BASELINE = "wireguard-go-udp"


@dataclass
class Result:
    key: str
    label: str
    impl: str
    network: str
    mbps_a_to_b: float | None = None
    mbps_b_to_a: float | None = None
    ping_ms: dict[str, float] | None = None
    rss_kib_a: int | None = None
    rss_kib_b: int | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


def iperf(client: Namespace, addr: str, seconds: float, reverse: bool) -> float:
    """Receiver-side Mbit/s of one TCP stream (what actually crossed the tunnel)."""
    cmd = ["iperf3", "-c", addr, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
           "--connect-timeout", "3000"]
    if reverse:
        cmd.append("-R")
    res = client.run(*cmd, check=False, timeout=seconds + 30)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError as e:
        raise LabError(f"iperf3 gave no JSON (rc {res.returncode}): {res.stderr.strip()}") from e
    if "error" in data:
        raise LabError(f"iperf3: {data['error']}")
    return data["end"]["sum_received"]["bits_per_second"] / 1e6


def wait_ping(ns: Namespace, addr: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ns.ping(addr, 1, timeout=1).returncode == 0:
            return
    raise LabError(f"no ping reply from {addr} through the tunnel within {timeout:g} s")


def run_case(lab: Lab, a: Namespace, b: Namespace, case: Case, index: int,
             seconds: float) -> Result:
    result = Result(case.key, case.label, case.impl, case.network)
    tag = f"{os.getpid() % 100000}"
    if_a, if_b = f"wgb{tag}{index}a", f"wgb{tag}{index}b"
    # A fresh subnet and fresh ports per case: a previous case's sockets may linger briefly.
    tun_a, tun_b = f"10.201.{index}.1", f"10.201.{index}.2"
    port_a, port_b = 51000 + 10 * index, 51001 + 10 * index
    pids: dict[str, int | None] = {if_a: None, if_b: None}
    try:
        for ns, ifname in ((a, if_a), (b, if_b)):
            if case.impl == "wireguard-go":
                pids[ifname] = lab.start_wireguard_go(ns, ifname)
            else:
                pids[ifname] = lab.start_ours(ns, ifname, case.network)
        # The unix transport ignores the host: port N names <unix_dir>/N.sock.
        host = "127.0.0.1" if case.network == "unix" else VETH_B
        ka, kb = Keys(), Keys()
        lab.configure(if_a, ka, kb, f"{tun_b}/32", listen_port=port_a,
                      endpoint=f"{host}:{port_b}")
        # b learns a's endpoint from the first handshake, as a parent does from its enclave.
        lab.configure(if_b, kb, ka, f"{tun_a}/32", listen_port=port_b)
        lab.address(a, if_a, f"{tun_a}/24", MTU)
        lab.address(b, if_b, f"{tun_b}/24", MTU)
        wait_ping(a, tun_b)

        res = a.ping(tun_b, PING_COUNT, PING_INTERVAL)
        result.ping_ms = parse_ping(res.stdout)
        if result.ping_ms is None:
            result.notes.append(f"ping: {res.stdout.strip()} {res.stderr.strip()}")

        server = b.popen("iperf3", "-s", "-B", tun_b, "-p", str(IPERF_PORT))
        try:
            _wait_listening(b, tun_b, IPERF_PORT)
            result.mbps_a_to_b = iperf(a, tun_b, seconds, reverse=False)
            result.mbps_b_to_a = iperf(a, tun_b, seconds, reverse=True)
        finally:
            server.kill()
            server.wait(5)
        # After the transfers: what the daemon holds once it has been under load.
        result.rss_kib_a = rss_kib(pids[if_a]) if pids[if_a] else None
        result.rss_kib_b = rss_kib(pids[if_b]) if pids[if_b] else None
    except (LabError, subprocess.TimeoutExpired) as e:
        result.error = str(e)
        for ifname in (if_a, if_b):
            log = lab.log_path(ifname)
            if log.exists() and log.stat().st_size:
                result.notes.append(f"{ifname} log tail: {log.read_text()[-400:]}")
    finally:
        lab.stop_interface(a, if_a, pids[if_a])
        lab.stop_interface(b, if_b, pids[if_b])
    return result


def _wait_listening(ns: Namespace, addr: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = ns.run("ss", "-Hltn", "src", f"{addr}:{port}", check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise LabError(f"iperf3 server did not listen on {addr}:{port}")


# -- output ---------------------------------------------------------------------------------


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def _mean_rss(r: Result) -> float | None:
    vals = [v for v in (r.rss_kib_a, r.rss_kib_b) if v is not None]
    return sum(vals) / len(vals) if vals else None


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if ours is not None and theirs else None


def ratios(results: list[Result]) -> dict[str, dict[str, float | None]]:
    base = next((r for r in results if r.key == BASELINE and r.error is None), None)
    if base is None:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    for r in results:
        if r.impl != "wgvsock" or r.error is not None:
            continue
        out[r.key] = {
            "a_to_b": _ratio(r.mbps_a_to_b, base.mbps_a_to_b),
            "b_to_a": _ratio(r.mbps_b_to_a, base.mbps_b_to_a),
            "ping_avg": _ratio(r.ping_ms and r.ping_ms["avg"],
                               base.ping_ms and base.ping_ms["avg"]),
            "rss": _ratio(_mean_rss(r), _mean_rss(base)),
        }
    return out


def print_table(results: list[Result], ratio_table: dict[str, dict[str, float | None]],
                seconds: float) -> None:
    print(f"\nTCP single stream, {seconds:g} s each way, MTU {MTU}; "
          f"ping: {PING_COUNT} at -i {PING_INTERVAL}; RSS after the transfers (a / b)\n")
    head = f"{'tunnel':<22}{'a->b Mbit/s':>12}{'b->a Mbit/s':>12}{'ping avg ms':>12}" \
           f"{'RSS MiB a / b':>16}"
    print(head)
    print("-" * len(head))
    for r in results:
        if r.error:
            print(f"{r.label:<22}  FAILED: {r.error}")
            continue
        ping = r.ping_ms["avg"] if r.ping_ms else None
        rss = f"{_mib(r.rss_kib_a)} / {_mib(r.rss_kib_b)}"
        print(f"{r.label:<22}{_f(r.mbps_a_to_b, '.1f'):>12}{_f(r.mbps_b_to_a, '.1f'):>12}"
              f"{_f(ping, '.3f'):>12}{rss:>16}")
    for r in results:
        for note in r.notes:
            print(f"  note ({r.label}): {note}")
    if ratio_table:
        print(f"\n{'ours / wireguard-go':<22}{'a->b':>12}{'b->a':>12}{'ping avg':>12}"
              f"{'RSS':>16}")
        print("-" * len(head))
        labels = {r.key: r.label for r in results}
        for key, q in ratio_table.items():
            print(f"{labels[key]:<22}{_f(q['a_to_b'], '.3f'):>12}{_f(q['b_to_a'], '.3f'):>12}"
                  f"{_f(q['ping_avg'], '.2f'):>12}{_f(q['rss'], '.2f'):>16}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 time per direction")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("tunnel_bench: needs root (network namespaces, TUN)", file=sys.stderr)
        return 2
    if missing := missing_tools(TOOLS):
        print(f"tunnel_bench: missing tools: {', '.join(missing)} (`make apt` installs them)",
              file=sys.stderr)
        return 2

    results: list[Result] = []
    tag = f"{os.getpid() % 100000}"
    with interrupts_raise(), Lab("wgvsock-bench-") as lab:
        try:
            a, b = lab.netns(f"wgbench{tag}a"), lab.netns(f"wgbench{tag}b")
            lab.veth(a, f"vb{tag}a", f"{VETH_A}/24", b, f"vb{tag}b", f"{VETH_B}/24")
            for i, case in enumerate(CASES):
                print(f"[{i + 1}/{len(CASES)}] {case.label} ...", flush=True)
                results.append(run_case(lab, a, b, case, i, args.seconds))
        except KeyboardInterrupt:
            print("\ninterrupted; cleaning up", file=sys.stderr)
            return 130
        except LabError as e:
            print(f"tunnel_bench: {e}", file=sys.stderr)
            return 1

    ratio_table = ratios(results)
    print_table(results, ratio_table, args.seconds)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seconds": args.seconds, "mtu": MTU, "ping_count": PING_COUNT,
                       "ping_interval": PING_INTERVAL, "results": [asdict(r) for r in results],
                       "ratios_vs_wireguard_go": ratio_table}, f, indent=2)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
