"""`wgvsock enclave up` run where it does not belong: in a namespace that already has a default
route (a host, an EC2 parent, a container) rather than an enclave, which has only `lo`.

Once run on the development machine itself, it replaced the machine's default route with one
through wg0 (gone for good with wg0) and overwrote /etc/resolv.conf. Now it refuses before it
changes anything, unless told with --outside-enclave that this is meant; then it also puts
the default routes it replaced and resolv.conf back when it ends.

Every run here is in a namespace the test made, and its resolv.conf is the private copy that
`ip netns exec` bind-mounts from /etc/netns/NAME/, never the machine's own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .netlab import Lab, Namespace, run, wait_for
from .test_ipv6 import DUAL_STACK_HEAD
from .test_roles import UNIX_TRANSPORT, WGVSOCK, World

pytestmark = [pytest.mark.root]

PROFILE = """\
version: 1
name: onhost
interface: wg0
transport:
  kind: unix
  port: 51820
  control_port: 51821
  path: {sock}
parent:
  address: 10.77.0.1/30
  private_key: {key}
enclave:
  address: 10.77.0.2/30
  dns: [198.51.100.53]
"""

RESOLV = "# this namespace's own, from before\nnameserver 192.0.2.53\n"


@contextlib.contextmanager
def private_resolv_conf(ns: Namespace, text: str) -> Iterator[Path]:
    """/etc/netns/NS/resolv.conf, which `ip netns exec` bind-mounts over /etc/resolv.conf for
    what it starts; removed afterwards, with its directory."""
    path = Path("/etc/netns") / ns.name / "resolv.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.write_text(text)
        yield path
    finally:
        path.unlink(missing_ok=True)
        path.parent.rmdir()


def host_like(lab: Lab, families: tuple[int, ...]) -> Namespace:
    """A namespace like a host's: `eth0` (one end of a veth) with addresses of both families and
    a default route of each of FAMILIES through it. `lo` is left down, as in an enclave at boot,
    so that bringing it up shows in the dumps."""
    ns = lab.netns("h")
    ns.ip("link", "set", "lo", "down")
    # No duplicate address detection: the addresses' flags would change under the dumps.
    ns.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
    ns.ip("addr", "add", "fd00:77::2/64", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    if 4 in families:
        ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "eth0")
    if 6 in families:
        ns.ip("-6", "route", "add", "default", "via", "fd00:77::1", "dev", "eth0")
    return ns


def dump(ns: Namespace, resolv: Path) -> dict[str, str]:
    """Everything `enclave up` could change in NS: links, addresses, routes and rules of every
    table, the namespace's net.* sysctls (accept_ra and the rest, per interface), resolv.conf."""
    out = {
        "links": ns.ip("-d", "link", "show").stdout,
        "addresses": ns.ip("addr", "show").stdout,
        "routes4": ns.ip("-4", "route", "show", "table", "all").stdout,
        "routes6": ns.ip("-6", "route", "show", "table", "all").stdout,
        "rules4": ns.ip("-4", "rule", "show").stdout,
        "rules6": ns.ip("-6", "rule", "show").stdout,
        # (Some keys, stable_secret among them, cannot be read: sysctl says so and goes on.)
        "sysctls": ns.run("sysctl", "-a", "-r", r"^net\.", check=False).stdout,
        "resolv.conf": resolv.read_text(),
    }
    return out


# The profile routes 0.0.0.0/0 (enclave.routes' default) and no ::/0.
@pytest.mark.parametrize(("families", "found", "change"), [
    ((4,), "a default route (default via 192.0.2.1 dev eth0)",
     "would replace it with a default route through wg0 (until `enclave up` ends, and for "
     "good should it be killed: then it would not be put back)"),
    ((6,), "a default route (default via fd00:77::1 dev eth0 metric 1024)",
     "would route 0.0.0.0/0 through wg0 beside it"),
    ((4, 6), "default routes (default via 192.0.2.1 dev eth0; "
             "default via fd00:77::1 dev eth0 metric 1024)",
     "would replace the IPv4 one with a default route through wg0 (until `enclave up` ends, "
     "and for good should it be killed: then it would not be put back)"),
], ids=["ipv4", "ipv6-only", "both"])
def test_a_namespace_with_a_default_route_is_refused_and_left_as_it_was(
        lab: Lab, families: tuple[int, ...], found: str, change: str) -> None:
    """Before: `enclave up` brought lo up, made wg0, replaced the default route with one
    through it (gone for good once wg0 went), set sysctls and overwrote resolv.conf, then
    waited for a parent that was never there."""
    ns = host_like(lab, families)
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key"))
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    with private_resolv_conf(ns, RESOLV) as resolv:
        before = dump(ns, resolv)
        assert "accept_ra" in before["sysctls"] and "default" in before[f"routes{families[0]}"]
        res = ns.run(WGVSOCK, "enclave", "up", "--profile", str(profile), "--timeout", "3",
                     "--", "true", env=env, check=False, timeout=60)
        after = dump(ns, resolv)
    for key in before:
        assert after[key] == before[key], key
    assert "wg0" not in after["links"]
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith(
        "wgvsock enclave up: refusing to start: this network namespace already has "
        f"{found}: it looks like a host or a container, not an enclave"), res.stderr
    message = " ".join(res.stderr.split())
    assert f"{change} and overwrite /etc/resolv.conf" in message, message
    assert "--outside-enclave" in message, message
    assert not (lab.tmp / "run").exists() or not any((lab.tmp / "run").iterdir())


def up_over_a_private_etc(lab: Lab, ns: Namespace, setup: str, *enter: str,
                          timeout: int = 3) -> tuple[subprocess.CompletedProcess[str], Path]:
    """`enclave up`, started by ENTER (`ip netns exec NS` and the like), with /etc an overlay in
    a mount namespace of the test's, so that nothing `up` might write, nor SETUP (a shell
    snippet run in it first), reaches the machine's /etc. Returns the run and the overlay's
    upper directory: what was written to /etc."""
    assert not (Path("/etc/netns") / ns.name).exists()
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key"))
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    upper, work = lab.tmp / "upper", lab.tmp / "work"
    upper.mkdir()
    work.mkdir()
    res = run("unshare", "--mount", "--propagation", "private", "sh", "-c",
              'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$0,workdir=$1" /etc '
              f'&& {setup} && shift && exec "$@"', str(upper), str(work),
              *enter, WGVSOCK, "enclave", "up", "--profile", str(profile), "--timeout",
              str(timeout), "--", "true", env=env, check=False, timeout=60)
    assert "Traceback" not in res.stderr, res.stderr
    return res, upper


def test_a_namespace_that_shares_the_machine_s_resolv_conf_is_refused(lab: Lab) -> None:
    """`ip netns exec NS` binds /etc/netns/NS/resolv.conf over /etc/resolv.conf only when that
    file exists. Without one, a namespace made on a host has no default route, so the check
    above let `up` through, and it wrote the profile's nameservers into the host's own
    /etc/resolv.conf (the development machine's still said "written by wgvsock enclave up").
    /etc/resolv.conf is no mount of its own in the overlay, as on a host."""
    ns = lab.netns("s")
    res, upper = up_over_a_private_etc(lab, ns, "true", "ip", "netns", "exec", ns.name)
    assert res.returncode == 1, res.stdout + res.stderr
    message = " ".join(res.stderr.split())
    assert message.startswith(
        f"wgvsock enclave up: refusing to start: this process runs in network namespace "
        f"'{ns.name}' (`ip netns exec {ns.name}`), but /etc/resolv.conf here is the "
        "machine's own"), message
    assert f"write /etc/netns/{ns.name}/resolv.conf" in message, message
    assert list(upper.iterdir()) == []  # nothing written to /etc
    assert "wg0" not in ns.ip("-o", "link", "show").stdout


def test_a_namespace_entered_without_ip_netns_exec_is_told_to_use_it(lab: Lab) -> None:
    """nsenter --net (or systemd's NetworkNamespacePath=) puts no /etc/netns file in place:
    with /etc/netns/NS/resolv.conf already written, the refusal told the user to write it,
    which changed nothing; it says how to start `up` so that the file is used."""
    ns = lab.netns("n")
    res, upper = up_over_a_private_etc(
        lab, ns, f"mkdir -p /etc/netns/{ns.name} && echo 'nameserver 192.0.2.53' "
        f"> /etc/netns/{ns.name}/resolv.conf", "nsenter", f"--net=/run/netns/{ns.name}")
    assert res.returncode == 1, res.stdout + res.stderr
    message = " ".join(res.stderr.split())
    assert "/etc/resolv.conf here is the machine's own" in message, message
    assert "mkdir -p" not in message, message
    assert (f"/etc/netns/{ns.name}/resolv.conf is there, but only `ip netns exec {ns.name}` "
            "puts it over /etc/resolv.conf, and this process was not started by it (nsenter "
            "or NetworkNamespacePath= do not): start `enclave up` with `ip netns exec "
            f"{ns.name}`, or leave enclave.dns out of the profile.") in message, message
    assert (upper / "resolv.conf").exists() is False  # the machine's own was left alone
    assert "wg0" not in ns.ip("-o", "link", "show").stdout


def test_a_link_to_nowhere_is_named_where_ip_netns_exec_could_not_bind(lab: Lab) -> None:
    """/etc/resolv.conf a link whose target is gone (systemd-resolved stopped): `ip netns exec`
    cannot bind the namespace's file over it and goes on, so the refusal must not say to
    write a file that is already there, nor to use the `ip netns exec` that was used."""
    ns = lab.netns("d")
    gone = lab.tmp / "gone" / "stub-resolv.conf"
    res, _ = up_over_a_private_etc(
        lab, ns, f"mkdir -p /etc/netns/{ns.name} && echo 'nameserver 192.0.2.53' "
        f"> /etc/netns/{ns.name}/resolv.conf && rm /etc/resolv.conf && ln -s {gone} "
        "/etc/resolv.conf", "ip", "netns", "exec", ns.name)
    assert res.returncode == 1, res.stdout + res.stderr
    message = " ".join(res.stderr.split())
    assert (f"/etc/netns/{ns.name}/resolv.conf is there, but /etc/resolv.conf is a link to "
            f"{gone}, which does not exist, so `ip netns exec` could not put it over that: "
            "make the link's target exist, or leave enclave.dns out of the profile.") in message
    assert not gone.parent.exists()
    assert "wg0" not in ns.ip("-o", "link", "show").stdout


def test_the_refusal_s_fix_lets_up_through_where_resolv_conf_is_a_link(lab: Lab) -> None:
    """What the refusal says to do works, where /etc/resolv.conf is systemd-resolved's kind of
    link: `ip netns exec` binds the namespace's file over the link's target (mount(2) follows
    it), where mountinfo shows the target, and `up` writes through the link into the
    namespace's file, never into the target, and puts it back as it ends. The parent never
    answers (there is none)."""
    ns = lab.netns("l")
    stub = lab.tmp / "stub-resolv.conf"
    stub.write_text("nameserver 127.0.0.53\n")
    res, upper = up_over_a_private_etc(
        lab, ns, f"mkdir -p /etc/netns/{ns.name} && echo 'nameserver 192.0.2.53' "
        f"> /etc/netns/{ns.name}/resolv.conf && rm /etc/resolv.conf && ln -s {stub} "
        "/etc/resolv.conf", "ip", "netns", "exec", ns.name, timeout=1)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "refusing to start" not in res.stderr, res.stderr
    assert "no answer from the parent's control port" in res.stderr, res.stderr
    assert stub.read_text() == "nameserver 127.0.0.53\n"
    # Put back, as --outside-enclave does: the namespace's other commands read it too, and
    # the profile's nameservers answer only through the tunnel (it said "written by wgvsock").
    assert (upper / "netns" / ns.name / "resolv.conf").read_text() == "nameserver 192.0.2.53\n"
    assert "put /etc/resolv.conf back as it was" in res.stderr, res.stderr


def test_a_nitro_parent_is_refused_in_a_namespace_with_no_name(lab: Lab) -> None:
    """On an EC2 parent, `unshare -n wgvsock enclave up` (or a unit's PrivateNetwork=): no
    default route and no name under /run/netns, so neither check above stopped it, and it
    wrote its name servers into the parent's own /etc/resolv.conf. The parent has
    /dev/nitro_enclaves, which an enclave never has. Here the device is a file in an overlay of
    /dev, and /etc an overlay too, in a mount namespace of the test's: nothing `up` might write
    reaches the machine."""
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key"))
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    dirs = []
    for name in ("dev-upper", "dev-work", "etc-upper", "etc-work"):
        (lab.tmp / name).mkdir()
        dirs.append(str(lab.tmp / name))
    script = ('mount -t overlay overlay -o "lowerdir=/dev,upperdir=$0,workdir=$1" /dev && '
              'mount -t overlay overlay -o "lowerdir=/etc,upperdir=$2,workdir=$3" /etc && '
              ': > /dev/nitro_enclaves && shift 3 && exec "$@"')
    for extra in ([], ["--outside-enclave"]):
        res = run("unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", script,
                  *dirs, WGVSOCK, "enclave", "up", "--profile", str(profile), "--timeout", "1",
                  *extra, "--", "true", env=env, check=False, timeout=60)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "Traceback" not in res.stderr, res.stderr
        refused = ("wgvsock enclave up: refusing to start: this machine has /dev/nitro_enclaves, "
                   "the device an EC2 parent runs its enclaves with")
        # Told, it goes on (and gives up on the parent no one runs here).
        assert res.stderr.startswith(refused) != bool(extra), res.stderr
        if not extra:
            assert os.listdir(lab.tmp / "etc-upper") == []  # nothing written to /etc


def test_outside_enclave_comes_up_over_a_default_route_and_puts_resolv_conf_back(
        world: World) -> None:
    """--outside-enclave (a container tried with `docker run`): the tunnel comes up as in an
    enclave, the log names the default route it replaced, and resolv.conf is as it was once
    `enclave up` has ended."""
    ns = world.enclave
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "eth0")
    placeholder = world.resolv.read_text()
    assert world.parent_cmd("up").returncode == 0
    proc = world.start_enclave(launcher=(WGVSOCK, "enclave", "up", "--outside-enclave"))
    wait_for(world.egress_works, 30, "the enclave to fetch a page through the parent's NAT")
    assert "nameserver 198.51.100.53" in world.resolv.read_text()
    routes = ns.ip("-4", "route", "show", "default").stdout.splitlines()
    assert len(routes) == 1 and routes[0].startswith("default dev wg0"), routes
    proc.send_signal(signal.SIGTERM)  # to `ip netns exec`, which execs: `enclave up` itself
    assert proc.wait(15) == 128 + signal.SIGTERM
    log = (world.lab.tmp / "enclave.log").read_text()
    assert ("replaced this network namespace's default route (default via 192.0.2.1 dev eth0) "
            "with one through wg0") in log, log
    assert world.resolv.read_text() == placeholder, log
    assert "put /etc/resolv.conf back as it was" in log, log
    assert "wg0" not in ns.ip("-o", "link", "show").stdout
    assert ns.ip("-4", "route", "show", "default").stdout == "default via 192.0.2.1 dev eth0 \n"


# Both families, the enclave's default routes through wg0 replacing the namespace's.
DUAL_STACK = DUAL_STACK_HEAD + """\
enclave:
  address: [10.77.0.2/30, fd77::2/126]
"""


def main_tables(ns: Namespace) -> dict[str, str]:
    return {"routes4": ns.ip("-4", "route", "show").stdout,
            "routes6": ns.ip("-6", "route", "show").stdout}


@pytest.mark.parametrize("ending", ["cmd-exits", "sigterm"])
def test_outside_enclave_puts_the_default_routes_it_replaced_back(world: World,
                                                                  ending: str) -> None:
    """Before: --outside-enclave replaced the namespace's default routes with the tunnel's and
    logged that it did, but they stayed gone once `enclave up` ended, taking the container's
    (or namespace's) way out with them. Now each comes back as it was, its gateway, device,
    metric, onlink flag, MTU and router preference included, whether CMD ends or `up` is
    stopped with SIGTERM; one the tunnel's routes left beside them stays as it was."""
    ns = world.enclave
    world.profile.write_text(DUAL_STACK.format(
        name=world.name, transport=UNIX_TRANSPORT.format(sock=world.lab.tmp / "sock"),
        key=world.lab.tmp / "parent.key"))
    ns.ip("link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    ns.ip("addr", "add", "192.0.2.2/24", "dev", "eth0")
    ns.ip("-6", "addr", "add", "fd00:77::2/64", "dev", "eth0", "nodad")
    ns.ip("link", "set", "eth0", "up")
    ns.ip("link", "set", "eth1", "up")
    ns.ip("route", "add", "default", "via", "192.0.2.1", "dev", "eth0", "onlink")
    ns.ip("route", "add", "default", "via", "192.0.2.254", "dev", "eth0", "metric", "300")
    ns.ip("-6", "route", "add", "default", "via", "fd00:77::1", "dev", "eth0", "mtu", "1400",
          "pref", "high")
    before = main_tables(ns)
    assert "default via fd00:77::1 dev eth0 metric 1024 mtu 1400 pref high" in before["routes6"]
    assert world.parent_cmd("up").returncode == 0
    ready, fifo = world.lab.tmp / "ready", world.lab.tmp / "fifo"
    os.mkfifo(fifo)
    log = world.lab.tmp / "enclave.log"
    with open(log, "ab") as out:
        proc = ns.popen(WGVSOCK, "enclave", "up", "--outside-enclave", "--profile",
                        str(world.profile), "--timeout", "30", "--", "sh", "-c",
                        f"echo > {ready}; read line < {fifo}",
                        env=world.env_for("enclave"), stdout=out, stderr=out)
    world.enclave_proc = proc
    wait_for(ready.exists, 30, "the tunnel and CMD")
    during = main_tables(ns)
    assert "default dev wg0" in during["routes4"] and "default dev wg0" in during["routes6"]
    assert "192.0.2.1" not in during["routes4"] and "fd00:77::1" not in during["routes6"]
    assert "default via 192.0.2.254 dev eth0 metric 300" in during["routes4"]
    if ending == "cmd-exits":
        with open(fifo, "w") as f:
            f.write("done\n")
        expected = 0
    else:
        proc.send_signal(signal.SIGTERM)  # to `ip netns exec`, which execs: `enclave up` itself
        expected = 128 + signal.SIGTERM
    assert proc.wait(15) == expected, log.read_text()
    assert main_tables(ns) == before, log.read_text()
    text = log.read_text()
    for route in ("default via 192.0.2.1 dev eth0", "default via fd00:77::1 dev eth0 metric 1024"):
        assert f"put back this network namespace's default route ({route})" in text, text
    assert "default route (default via 192.0.2.254 dev eth0 metric 300) stays" in text, text
    assert "put back this network namespace's default route (default via 192.0.2.254" not in text


def _running(pid: int) -> bool:
    """Whether PID runs (a zombie does not: it has ended, its reaper has yet to look)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_cmd_does_not_outlive_a_killed_enclave_up(world: World) -> None:
    """Before: outside Nitro, with `enclave up` SIGKILLed (the OOM killer, kill -9) where it
    is not PID 1, CMD ran on, adopted by init, without its network and with nothing to stop
    it. Now the kernel SIGKILLs it when `up` dies."""
    assert world.parent_cmd("up").returncode == 0
    pid_file = world.lab.tmp / "cmd.pid"
    with open(world.lab.tmp / "enclave.log", "ab") as out:
        proc = world.enclave.popen(
            WGVSOCK, "enclave", "up", "--profile", str(world.profile), "--timeout", "30", "--",
            "sh", "-c", f"echo $$ > {pid_file}.new; mv {pid_file}.new {pid_file}; exec sleep 600",
            env=world.env_for("enclave"), stdout=out, stderr=out)
    world.enclave_proc = proc
    wait_for(pid_file.exists, 30, "the tunnel and CMD")
    cmd = int(pid_file.read_text())
    wait_for(lambda: Path(f"/proc/{cmd}/cmdline").read_bytes().startswith(b"sleep\0"), 5,
             "CMD to exec sleep")
    # (After the command line: state, then parent.) `up` is its parent.
    assert Path(f"/proc/{cmd}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(proc.pid)
    proc.kill()  # `ip netns exec` execs: this is `enclave up` itself
    assert proc.wait(10) == -signal.SIGKILL
    try:
        wait_for(lambda: not _running(cmd), 10, "CMD to end with `enclave up`")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cmd, signal.SIGKILL)


# Holds a TUN named argv[1] (as a running `enclave up` or daemon does) until killed.
_HOLD_TUN = """\
import fcntl, os, struct, sys, time
fd = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", sys.argv[1].encode(), 0x0001 | 0x1000))
print("holding", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("routed", [False, True], ids=["no-route", "default-through-it"])
def test_a_second_enclave_up_is_told_the_interface_is_taken(lab: Lab, routed: bool) -> None:
    """`enclave up` where one already runs (wg0 held, and its default route through it):
    "refusing to start: this network namespace already has a default route (default dev
    wg0): it looks like a host or a container, not an enclave", which it is not; and without
    that route (or with --outside-enclave), Python's "[Errno 16] creating TUN 'wg0':
    interface is busy (already attached elsewhere)"."""
    import subprocess
    import sys

    ns = lab.netns("t")
    holder = ns.popen(sys.executable, "-c", _HOLD_TUN, "wg0", stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
    if routed:
        ns.ip("link", "set", "wg0", "up")
        ns.ip("route", "add", "default", "dev", "wg0")
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key"))
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    with private_resolv_conf(ns, RESOLV):  # (the machine's own is refused: see above)
        res = ns.run(WGVSOCK, "enclave", "up", "--profile", str(profile), "--timeout", "3",
                     "--", "true", env=env, check=False, timeout=60)
    assert (res.returncode, res.stderr) == (1, (
        "wgvsock enclave up: interface wg0 is taken: another `wgvsock enclave up` (or another "
        "WireGuard program) already runs it in this network namespace. One `enclave up` "
        "serves an enclave, as the image's CMD: stop that one first, or give the profile "
        "another `interface`\n"))
    assert holder.poll() is None  # the one there is left as it was



def test_an_enclave_up_killed_leaves_no_taken_interface_behind(lab: Lab) -> None:
    """The interface-taken refusal reads a default route through the interface as another
    `enclave up`'s. One killed with SIGKILL (its supervisor's restart, say) must not leave one:
    its TUN is not persistent and its descriptor not inherited (O_CLOEXEC), so the interface
    and its routes go with it, and the next `enclave up` is not told it is taken."""
    import subprocess
    import sys

    ns = lab.netns("k")
    holder = ns.popen(sys.executable, "-c", _HOLD_TUN, "wg0", stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
    ns.ip("link", "set", "wg0", "up")
    ns.ip("route", "add", "default", "dev", "wg0")
    holder.kill()
    holder.wait(timeout=10)
    assert ns.run("ip", "route", "show", "default").stdout == ""
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key"))
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    with private_resolv_conf(ns, RESOLV):
        res = ns.run(WGVSOCK, "enclave", "up", "--profile", str(profile), "--timeout", "2",
                     "--", "true", env=env, check=False, timeout=60)
    # It made wg0 again, then failed on its own account: no parent answers here.
    assert res.returncode == 1 and "is taken" not in res.stderr, res.stderr
    assert "interface wg0 up" in res.stderr and "default route" not in res.stderr, res.stderr
    assert "wgvsock enclave up: no answer from the parent's control port" in res.stderr

def test_no_tun_device_is_said_without_pythons_errno(lab: Lab) -> None:
    """A container run without `--device /dev/net/tun`: "wgvsock enclave up: [Errno 2]
    /dev/net/tun does not exist: ...", Python's prefix before the TUN's own words."""
    ns = lab.netns("n")
    profile = lab.tmp / "profile.yaml"
    profile.write_text(PROFILE.format(sock=lab.tmp / "sock", key=lab.tmp / "parent.key"))
    env = lab.env(WGVSOCK_RUN_DIR=str(lab.tmp / "run"), TMPDIR=str(lab.tmp))
    # `ip netns exec` runs it in a mount namespace of its own: the tmpfs hides the TUN there.
    with private_resolv_conf(ns, RESOLV):
        res = ns.run("sh", "-c", 'mount -t tmpfs none /dev/net && exec "$@"', "sh", WGVSOCK,
                     "enclave", "up", "--profile", str(profile), "--timeout", "3", "--",
                     "true", env=env, check=False, timeout=60)
    assert (res.returncode, res.stderr) == (1, (
        "wgvsock enclave up: /dev/net/tun does not exist: the kernel has no TUN support "
        "(CONFIG_TUN) or the device node was not created\n"))
    assert os.path.exists("/dev/net/tun")
