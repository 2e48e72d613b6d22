"""Neither side of the tunnel can configure the other's routing with router advertisements or
redirects.

`parent up` turns IPv6 forwarding on and, to keep the host's own router-advertised default
route, moves interfaces (and `default`, which a new interface starts from) to accept_ra=2.
The tunnel must not be one of them: a router advertisement the enclave sent from a link-local
address would give the parent a default route into the enclave. The profile refuses link-local
tunnel addresses (tests/test_profile.py); here the parent is given one anyway, as an allowed IP
and a source its table accepts (what a link-local enclave.address made of them), with an allow
entry that lets it reach the parent (no catch-all does), and the advertisement still changes
nothing. The other way round, `enclave up` refuses them on its own
wg0: in Nitro's threat model the enclave does not trust the parent.

The namespaces of test_roles.World with a dual-stack profile (test_ipv6.py's).
"""

from __future__ import annotations

import sys

import pytest

from wgvsock.device.uapi import uapi_get, uapi_set
from wgvsock.services import firewall

from .netlab import SEND_RA, Namespace, run, wait_for
from .test_ipv6 import DUAL_STACK_PROFILE
from .test_roles import UNIX_TRANSPORT, WGVSOCK, World

pytestmark = [pytest.mark.root]

ROUTER = "fe80::2"  # the enclave's link-local source
PARENT_ROUTER = "fe80::1"  # the parent's, for the other way round
PREFIX = "2001:db8:bad::"  # the prefix the advertisement offers for SLAAC

TUNNEL_SYSCTLS = ("net/ipv6/conf/wg0/accept_ra", "net/ipv6/conf/wg0/accept_redirects",
                  "net/ipv4/conf/wg0/accept_redirects")


def sysctls(w: World) -> list[str]:
    return w.parent.run("sysctl", "-n", *TUNNEL_SYSCTLS).stdout.split()


def ras_received(w: World, side: Namespace | None = None) -> int:
    """Router advertisements the parent's (or SIDE's) ICMPv6 took in on wg0: past the table,
    and before the kernel decides whether to act on them."""
    side = side or w.parent
    for line in side.run("cat", "/proc/net/dev_snmp6/wg0").stdout.splitlines():
        key, _, value = line.partition(" ")
        if key == "Icmp6InRouterAdvertisements":
            return int(value)
    raise AssertionError("no Icmp6InRouterAdvertisements in /proc/net/dev_snmp6/wg0")


# All nodes, where an advertisement goes: the table opens no port of the parent's to a catch-all
# allow entry (`::/0`), and this one reaches the parent's ICMPv6 only through an entry that
# names it, as an operator could write.
TO_ALL_NODES = DUAL_STACK_PROFILE.replace('allow: [0.0.0.0/0, "::/0"]',
                                          'allow: [0.0.0.0/0, "::/0", "ff02::1/128"]')


def test_parent_ignores_router_advertisements_from_the_enclave(world: World) -> None:
    w = world
    assert TO_ALL_NODES != DUAL_STACK_PROFILE
    w.profile.write_text(TO_ALL_NODES.format(
        name=w.name, transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock"),
        key=w.lab.tmp / "parent.key"))
    w.parent_cmd("up")
    assert sysctls(w) == ["0", "0", "0"]
    w.start_enclave()
    wait_for(lambda: w.enclave.run("ping", "-6", "-c1", "-W1", "fd77::1",
                                   check=False).returncode == 0,
             30, "the enclave to reach the parent over IPv6")

    # The enclave's link-local address as the parent would have taken it from a profile:
    # an allowed IP of the enclave's peer and a source in the table's enclave_v6 set.
    uapi = str(w.parent_uapi())
    [peer] = uapi_get(uapi)["peers"]
    assert uapi_set(uapi, f"public_key={peer['public_key'].hex()}\nupdate_only=true\n"
                    f"allowed_ip={ROUTER}/128") == 0
    run("ip", "netns", "exec", w.parent.name, "nft", "add", "element", "inet",
        firewall.table_name(w.name), "enclave_v6", f"{{ {ROUTER} }}")
    w.enclave.ip("addr", "add", f"{ROUTER}/64", "dev", "wg0", "nodad")

    before = ras_received(w)
    w.enclave.run(sys.executable, "-c", SEND_RA, "wg0", ROUTER, PREFIX)
    wait_for(lambda: ras_received(w) > before, 10,
             "the router advertisement to reach the parent's ICMPv6 on wg0")
    routes = w.parent.ip("-6", "route", "show", "table", "all").stdout
    assert "proto ra" not in routes and "default via" not in routes, routes
    assert PREFIX.rstrip(":") not in w.parent.ip("-6", "addr", "show").stdout

    # Another parent's `up` (forwarding is on already: it changes no accept_ra, and where it
    # turns forwarding on it moves only 1s); the tunnel's 0 stays.
    firewall.enable_forwarding(w.parent.name, ipv6=True)
    assert sysctls(w) == ["0", "0", "0"]
    # Anything else that sets it again is undone within the parent's next checks.
    w.parent.run("sysctl", "-q", "-w", "net.ipv6.conf.wg0.accept_ra=2")
    wait_for(lambda: sysctls(w) == ["0", "0", "0"], 5, "the parent to put accept_ra=0 back")


def enclave_sysctls(w: World) -> list[str]:
    keys = (*TUNNEL_SYSCTLS, "net/ipv6/conf/wg0/autoconf")
    return w.enclave.run("sysctl", "-n", *keys).stdout.split()


def test_enclave_ignores_router_advertisements_from_the_parent(world: World) -> None:
    """The other way round: in Nitro's threat model the enclave does not trust the parent.
    Before, one advertisement the parent sent into the tunnel gave the enclave's wg0 an
    address from its prefix, a default route (`pref high`) and its hop limit."""
    w = world
    w.profile.write_text(DUAL_STACK_PROFILE.format(
        name=w.name, transport=UNIX_TRANSPORT.format(sock=w.lab.tmp / "sock"),
        key=w.lab.tmp / "parent.key"))
    w.parent_cmd("up")
    w.start_enclave()
    wait_for(lambda: w.enclave.run("ping", "-6", "-c1", "-W1", "fd77::1",
                                   check=False).returncode == 0,
             30, "the enclave to reach the parent over IPv6")
    hop_limit = w.enclave.run("sysctl", "-n", "net/ipv6/conf/wg0/hop_limit").stdout.strip()

    # A parent that sends one: from a link-local address of its wg0, which the enclave's
    # allowed IPs for it take (its routes include ::/0), to all nodes, which the parent's
    # device is told to send to the enclave, past its own table (which drops what the
    # parent host sends the enclave unasked).
    uapi = str(w.parent_uapi())
    [peer] = uapi_get(uapi)["peers"]
    assert uapi_set(uapi, f"public_key={peer['public_key'].hex()}\nupdate_only=true\n"
                    "allowed_ip=ff02::1/128") == 0
    w.parent.ip("addr", "add", f"{PARENT_ROUTER}/64", "dev", "wg0", "nodad")
    before = ras_received(w, w.enclave)

    def send() -> bool:
        # `parent up` puts its table back within a second of a change: rule and send again
        # until one gets out.
        w.parent.run("nft", "insert", "rule", "inet", firewall.table_name(w.name),
                      "local_output", "oifname", "wg0", "icmpv6", "type", "nd-router-advert",
                      "accept")
        return w.parent.run(sys.executable, "-c", SEND_RA, "wg0", PARENT_ROUTER, PREFIX,
                            check=False).returncode == 0

    wait_for(send, 10, "the parent to send a router advertisement into wg0")
    wait_for(lambda: ras_received(w, w.enclave) > before, 10,
             "the router advertisement to reach the enclave's ICMPv6 on wg0")
    routes = w.enclave.ip("-6", "route", "show", "table", "all").stdout
    assert "proto ra" not in routes and "default via fe80" not in routes, routes
    assert PREFIX.rstrip(":") not in w.enclave.ip("-6", "addr", "show").stdout
    assert w.enclave.run("sysctl", "-n", "net/ipv6/conf/wg0/hop_limit").stdout.strip() \
        == hop_limit
    assert enclave_sysctls(w) == ["0", "0", "0", "0"]


# `enclave up` where /proc/sys is read-only, as `docker run` without --privileged mounts it:
# in a mount namespace of its own, so nothing else sees it.
READ_ONLY_PROC_SYS = ("unshare", "-m", "--propagation", "private", "--", "sh", "-c",
                      'mount --bind /proc/sys /proc/sys && '
                      'mount -o remount,bind,ro /proc/sys && exec "$@"', "read-only-proc-sys")


def test_enclave_up_refuses_to_run_where_it_cannot_refuse_router_advertisements(
        world: World) -> None:
    """Before: `enclave up` warned and went on, CMD ran, and the untrusted parent could give
    the enclave addresses and routes with router advertisements. Now it stops before CMD,
    naming the sysctl and the error, and wg0 is gone again."""
    w = world
    w.parent_cmd("up")
    proc = w.start_enclave(launcher=(*READ_ONLY_PROC_SYS, WGVSOCK, "enclave", "up"))
    assert proc.wait(30) == 1
    log = (w.lab.tmp / "enclave.log").read_text()
    assert ("wgvsock enclave up: wg0: cannot refuse router advertisements and redirects from "
            "the parent: setting its accept_ra, autoconf and accept_redirects to 0 failed: "
            "/proc/sys/net/ipv6/conf/wg0/accept_ra: Read-only file system (EROFS)") in log, log
    assert "--outside-enclave" in log, log
    assert "Traceback" not in log and "tunnel to the parent is up" not in log, log
    assert "wg0" not in w.enclave.ip("-o", "link", "show").stdout
    assert w.enclave.ip("-4", "route", "show").stdout == ""


def test_outside_an_enclave_a_read_only_proc_sys_is_warned_about(world: World) -> None:
    """--outside-enclave (the image tried with `docker run`): the same warns and goes on."""
    w = world
    w.parent_cmd("up")
    proc = w.start_enclave(launcher=(*READ_ONLY_PROC_SYS, WGVSOCK, "enclave", "up",
                                     "--outside-enclave"))
    wait_for(w.egress_works, 30, "the enclave to fetch a page through the parent's NAT")
    log = (w.lab.tmp / "enclave.log").read_text()
    assert ("WARNING wgvsock.enclave: wg0: cannot refuse router advertisements and redirects "
            "from the parent "
            "(setting its accept_ra, autoconf and accept_redirects to 0: "
            "/proc/sys/net/ipv6/conf/wg0/accept_ra: Read-only file system (EROFS)); the parent "
            "could set its routes") in " ".join(log.split()), log
    assert enclave_sysctls(w)[0] != "0"  # as the warning says: accept_ra was left as it was
    proc.terminate()
    assert proc.wait(15) == 128 + 15
