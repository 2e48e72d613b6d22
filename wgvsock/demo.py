"""`make demo`: two of our WireGuard daemons talking through a Unix socket, narrated.

Run as root: python -m wgvsock.demo [--live SECONDS] [--iperf-seconds S]

It builds two network namespaces, "parent" and "enclave", with no network link between them
at all: the only path is a Unix stream socket in a private temporary directory, the stand-in
for vsock on a machine where AF_VSOCK cannot be connected (DESIGN.md §5). One of our daemons
runs in each namespace; the demo gives them fresh keys over the UAPI, addresses them, pings
through the tunnel, runs a short iperf3, prints `wg show`, then shows a live view for a few
seconds. Everything is removed on exit, on Ctrl-C and on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .nslab import (
    RUN_DIR,
    Keys,
    Lab,
    LabError,
    Namespace,
    interrupts_raise,
    missing_tools,
    parse_ping,
    run,
)
from .uapi import UAPIError, uapi_get

NS_PARENT, NS_ENCLAVE = "wgdemo-parent", "wgdemo-enclave"
IF_PARENT, IF_ENCLAVE = "wgdemo-p", "wgdemo-e"
ADDR_PARENT, ADDR_ENCLAVE = "10.88.0.1", "10.88.0.2"
# Unix port N is the socket <unix_dir>/N.sock; 5000 mirrors a vsock port on the parent (CID 3).
PORT_PARENT, PORT_ENCLAVE = 5000, 5001
MTU = 1420
# Who owns the fixed names above, so that the next run can tell a live demo from leftovers.
STATE_FILE = Path("/run/wgvsock-demo.json")
TMP_PREFIX = "wgvsock-demo-"
REQUIRED_TOOLS = ("ip", "wg", "ping")


def say(text: str = "") -> None:
    print(text, flush=True)


def heading(text: str) -> None:
    say()
    say(f"== {text}")


def _indent(text: str, prefix: str = "   ") -> str:
    return "\n".join(prefix + line if line else line for line in text.rstrip().splitlines())


def preflight() -> str | None:
    """Why the demo cannot run here, or None."""
    if os.geteuid() != 0:
        return "the demo needs root (it creates network namespaces and TUN devices); " \
               "try: sudo make demo"
    if missing := missing_tools(REQUIRED_TOOLS):
        return f"missing tools: {', '.join(missing)} (`make apt` installs them)"
    if not Path("/dev/net/tun").exists():
        return "/dev/net/tun is missing: this kernel or container has no TUN support"
    return None


def _demo_alive(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # The pid may have been reused by an unrelated process since the state file was written.
    return b"wgvsock.demo" in argv


def clear_leftovers() -> str | None:
    """Removes what an earlier demo killed with SIGKILL left behind; refuses (returns why)
    if a demo is still running.

    Fixed names let users poke at the namespaces while the demo runs, and our daemons run in
    their own sessions, so a demo that could not clean up leaves them for the next run."""
    try:
        state = json.loads(STATE_FILE.read_text())
    except (OSError, ValueError):
        state = {}
    if isinstance(state.get("pid"), int) and _demo_alive(state["pid"]):
        return f"another demo is running (pid {state['pid']})"
    existing = set(run("ip", "netns", "list", check=False).stdout.split())
    for name in (NS_PARENT, NS_ENCLAVE):
        if name in existing:
            for pid in run("ip", "netns", "pids", name, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run("ip", "netns", "del", name, check=False)
            say(f"   (removed namespace {name} left by an earlier run)")
    for ifname in (IF_PARENT, IF_ENCLAVE):
        sock = f"{RUN_DIR}/{ifname}.sock"
        if not os.path.exists(sock):
            continue
        try:
            uapi_get(sock, timeout=1.0)
        except (OSError, UAPIError):
            os.unlink(sock)
            say(f"   (removed stale {sock} left by an earlier run)")
        else:
            # Not in our namespaces, so not ours to kill.
            return f"interface {ifname} exists outside the demo's namespaces ({sock} answers)"
    tmp = state.get("tmp")
    if isinstance(tmp, str) and Path(tmp).name.startswith(TMP_PREFIX) and \
            Path(tmp).parent == Path(tempfile.gettempdir()):
        shutil.rmtree(tmp, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    return None


def wg_show(ns: Namespace, ifname: str) -> str:
    res = ns.run("wg", "show", ifname, check=False)
    return res.stdout if res.returncode == 0 else f"(wg show failed: {res.stderr.strip()})"


def first_contact(enclave: Namespace, timeout: float = 15.0) -> float:
    """Pings until the first reply; returns that reply's RTT in ms, which includes the
    handshake the first packet triggered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = enclave.ping(ADDR_PARENT, 1, timeout=2)
        stats = parse_ping(res.stdout)
        if res.returncode == 0 and stats:
            return stats["avg"]
    raise LabError(f"no reply from {ADDR_PARENT} through the tunnel within {timeout:g} s")


def ping_line(src: Namespace, dst: str, count: int = 20) -> str:
    res = src.ping(dst, count, interval=0.05)
    stats = parse_ping(res.stdout)
    if not stats:
        return f"no replies ({res.stdout.strip().splitlines()[-1] if res.stdout else 'no output'})"
    lost = next((w for w in res.stdout.split(",") if "packet loss" in w), "").strip()
    return (f"{count} pings, avg {stats['avg']:.3f} ms "
            f"(min {stats['min']:.3f}, max {stats['max']:.3f}), {lost}")


def iperf_mbps(client: Namespace, addr: str, seconds: float, reverse: bool) -> str:
    cmd = ["iperf3", "-c", addr, "-t", f"{seconds:g}", "-J", "--connect-timeout", "3000"]
    if reverse:
        cmd.append("-R")
    res = client.run(*cmd, check=False, timeout=seconds + 30)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        return f"failed ({res.stderr.strip() or 'no output'})"
    if "error" in data:
        return f"failed (iperf3: {data['error']})"
    return f"{data['end']['sum_received']['bits_per_second'] / 1e6:.1f} Mbit/s"


def throughput(parent: Namespace, enclave: Namespace, seconds: float) -> None:
    server = parent.popen("iperf3", "-s", "-B", ADDR_PARENT)
    try:
        deadline = time.monotonic() + 10
        while not parent.run("ss", "-Hltn", "src", f"{ADDR_PARENT}:5201",
                             check=False).stdout.strip():
            if time.monotonic() > deadline:
                raise LabError("iperf3 server did not start")
            time.sleep(0.05)
        up = iperf_mbps(enclave, ADDR_PARENT, seconds, reverse=False)
        say(f"   enclave -> parent: {up}")
        down = iperf_mbps(enclave, ADDR_PARENT, seconds, reverse=True)
        say(f"   parent -> enclave: {down}")
    finally:
        server.kill()
        server.wait(5)


def counters(ifname: str) -> tuple[int, int]:
    peers = Lab.status(ifname)["peers"]
    return (peers[0]["rx_bytes"], peers[0]["tx_bytes"]) if peers else (0, 0)


def _screen_lines(block: str) -> int:
    # Long lines wrap; counting them as one would redraw over the wrong rows.
    cols = max(shutil.get_terminal_size().columns, 1)
    return sum(max(1, -(-len(line) // cols)) for line in block.splitlines())


def live_view(parent: Namespace, enclave: Namespace, seconds: float) -> None:
    """Until the dashboard exists: `wg show` of both sides once a second. A background ping
    of ~25 KB/s keeps the counters moving (wg prints MiB with two decimals) so there is
    something to watch; the header line gives exact bytes from the UAPI."""
    tty = sys.stdout.isatty()
    pinger = enclave.popen("ping", "-q", "-s", "1200", "-i", "0.05", ADDR_PARENT)
    printed = 0
    last = counters(IF_PARENT)
    try:
        end = time.monotonic() + seconds
        while True:
            now = counters(IF_PARENT)
            block = (f"-- {time.strftime('%H:%M:%S')} parent rx {now[0]:,} B "
                     f"(+{now[0] - last[0]:,}), tx {now[1]:,} B (+{now[1] - last[1]:,})"
                     "\n"
                     f"[parent]\n{_indent(wg_show(parent, IF_PARENT))}\n"
                     f"[enclave]\n{_indent(wg_show(enclave, IF_ENCLAVE))}\n")
            last = now
            if tty and printed:
                # Redraw in place rather than scroll the summary away.
                sys.stdout.write(f"\033[{printed}F\033[J")
            sys.stdout.write(block)
            sys.stdout.flush()
            printed = _screen_lines(block)
            if time.monotonic() >= end:
                break
            time.sleep(1.0)
    except KeyboardInterrupt:
        say("\n   (stopped by Ctrl-C)")
    finally:
        pinger.kill()
        pinger.wait(5)


def demo(lab: Lab, args: argparse.Namespace) -> None:
    heading("Building")
    parent, enclave = lab.netns(NS_PARENT), lab.netns(NS_ENCLAVE)
    say(f"   namespace {NS_PARENT:<15} plays the EC2 parent instance")
    say(f"   namespace {NS_ENCLAVE:<15} plays the Nitro Enclave")
    say("   no veth, no route: the only path between them is a Unix stream socket in")
    say(f"   {lab.unix_dir} (the stand-in for vsock; same framing code)")

    pid_p = lab.start_ours(parent, IF_PARENT, "unix", log_level="verbose")
    pid_e = lab.start_ours(enclave, IF_ENCLAVE, "unix", log_level="verbose")
    say(f"   daemon in parent:  wireguard-go-vsock -n unix {IF_PARENT}  (pid {pid_p})")
    say(f"   daemon in enclave: wireguard-go-vsock -n unix {IF_ENCLAVE}  (pid {pid_e})")

    kp, ke = Keys(), Keys()
    lab.configure(IF_PARENT, kp, ke, f"{ADDR_ENCLAVE}/32", listen_port=PORT_PARENT)
    # The enclave dials the parent, as it would dial CID 3; the parent learns the enclave's
    # endpoint from the inbound connection.
    lab.configure(IF_ENCLAVE, ke, kp, f"{ADDR_PARENT}/32", listen_port=PORT_ENCLAVE,
                  endpoint=f"127.0.0.1:{PORT_PARENT}")
    say(f"   keys generated now; parent {kp.public_b64}")
    say(f"                       enclave {ke.public_b64}")
    say(f"   configured through the UAPI sockets {RUN_DIR}/{IF_PARENT}.sock and "
        f"{IF_ENCLAVE}.sock")
    say(f"   parent listens on Unix port {PORT_PARENT} ({lab.unix_dir}/{PORT_PARENT}.sock)")
    say(f"   enclave's peer endpoint = 127.0.0.1:{PORT_PARENT} (the host part is ignored)")
    lab.address(parent, IF_PARENT, f"{ADDR_PARENT}/24", MTU)
    lab.address(enclave, IF_ENCLAVE, f"{ADDR_ENCLAVE}/24", MTU)
    say(f"   {IF_PARENT} = {ADDR_PARENT}/24, {IF_ENCLAVE} = {ADDR_ENCLAVE}/24, MTU {MTU}, up")

    heading("Handshake")
    rtt = first_contact(enclave)
    peer = lab.status(IF_ENCLAVE)["peers"][0]
    hs = peer["last_handshake_time_sec"] + peer["last_handshake_time_nsec"] / 1e9
    say(f"   the enclave's first ping started a Noise IKpsk2 handshake; first reply after "
        f"{rtt:.1f} ms")
    if hs:
        say(f"   handshake recorded at {time.strftime('%H:%M:%S', time.localtime(hs))}"
            f".{int(hs % 1 * 1000):03d}")
    # An inbound Unix connection has no address `wg` could parse, so the parent's endpoint
    # only shows in our read-only extra key (see DESIGN.md §3).
    learned = lab.status(IF_PARENT)["peers"][0]["extra"].get("wgvsock_endpoint", "none")
    say(f"   the parent learned the enclave's endpoint from the connection: {learned}")

    heading("Ping through the tunnel (-i 0.05)")
    say(f"   enclave -> parent: {ping_line(enclave, ADDR_PARENT)}")
    say(f"   parent -> enclave: {ping_line(parent, ADDR_ENCLAVE)}")

    heading(f"Throughput (iperf3, one TCP stream, {args.iperf_seconds:g} s each way)")
    if args.iperf_seconds <= 0:
        say("   skipped (--iperf-seconds 0)")
    elif shutil.which("iperf3") is None:
        say("   skipped: iperf3 is not installed")
    else:
        throughput(parent, enclave, args.iperf_seconds)

    heading("wg show")
    say(f"[parent] ip netns exec {NS_PARENT} wg show {IF_PARENT}")
    say(_indent(wg_show(parent, IF_PARENT)))
    say(f"[enclave] ip netns exec {NS_ENCLAVE} wg show {IF_ENCLAVE}")
    say(_indent(wg_show(enclave, IF_ENCLAVE)))

    if args.live > 0:
        heading(f"Live view for {args.live:g} s: wg show every second while a ping runs "
                "(Ctrl-C stops)")
        live_view(parent, enclave, args.live)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m wgvsock.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--live", type=float, default=5.0, metavar="SECONDS",
                    help="how long to show the live view (0: skip)")
    ap.add_argument("--iperf-seconds", type=float, default=3.0, metavar="S",
                    help="iperf3 time per direction (0: skip)")
    args = ap.parse_args(argv)

    say("wgvsock demo: two userspace WireGuard daemons, parent and enclave, over a Unix socket")
    if reason := preflight():
        print(f"demo: refusing to run: {reason}", file=sys.stderr)
        return 2
    if reason := clear_leftovers():
        print(f"demo: refusing to run: {reason}", file=sys.stderr)
        return 2

    code = 0
    with interrupts_raise():
        lab = Lab(TMP_PREFIX)
        try:
            STATE_FILE.write_text(json.dumps({"pid": os.getpid(), "tmp": str(lab.tmp)}))
            demo(lab, args)
        except KeyboardInterrupt:
            say("\ninterrupted")
            code = 130
        except (LabError, UAPIError, OSError, subprocess.TimeoutExpired) as e:
            print(f"\ndemo failed: {e}", file=sys.stderr)
            for ifname in (IF_PARENT, IF_ENCLAVE):
                log = lab.log_path(ifname)
                if log.exists() and log.stat().st_size:
                    print(f"--- {ifname} log (tail)\n{log.read_text()[-1500:]}", file=sys.stderr)
            code = 1
        finally:
            # Printing can fail (a closed pipe, say): it must not stop the clean-up.
            with contextlib.suppress(OSError):
                heading("Cleaning up")
            lab.close()
            STATE_FILE.unlink(missing_ok=True)
            left = [n for n in (NS_PARENT, NS_ENCLAVE)
                    if n in run("ip", "netns", "list", check=False).stdout.split()]
            left += [s for s in (f"{RUN_DIR}/{IF_PARENT}.sock", f"{RUN_DIR}/{IF_ENCLAVE}.sock")
                     if os.path.exists(s)]
            if lab.tmp.exists():
                left.append(str(lab.tmp))
            with contextlib.suppress(OSError):
                if left:
                    say(f"   WARNING: still present: {', '.join(left)}")
                else:
                    say("   daemons stopped, namespaces deleted, sockets and temp dir removed")
            if left:
                code = code or 1
    return code


if __name__ == "__main__":
    sys.exit(main())
