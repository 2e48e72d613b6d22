"""Command lines of the roles: `wgvsock parent up|down|doctor` and `wgvsock enclave up`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..argtypes import seconds


def _load(path: str, after: str = ""):
    """The profile at PATH, or None once its problems are printed, and AFTER: what that
    meant for the command (a `down` that stopped nothing, a `reload` that changed nothing)."""
    from ..services.profile import ProfileError, load_profile

    try:
        return load_profile(path)
    except ProfileError as e:
        print(f"invalid profile:\n{e}" + (f"\n{after}" if after else ""), file=sys.stderr)
        return None


# What an invalid profile left as it was, said after its problems.
_NOT_LOADED = {
    "down": "nothing was stopped or removed: no parent runs from this file or under the "
            "name it gives, and `down` reads the profile to know what else is its own. Fix it "
            "(or put back the file the parent was started with) and run `down` again",
    "reload": "nothing was reloaded: a running parent goes on with the profile it read "
              "before",
}


# Libraries whose DEBUG lines carry secrets: botocore's the session token and access key id
# of every request it signs (the canonical request, the headers) and the bodies of responses
# (a key fetched from SSM), urllib3's the URLs. They never log below INFO, even with debug on.
_QUIET = ("botocore", "boto3", "urllib3", "s3transfer")


def _logging(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.WARNING
    given = os.environ.get("LOG_LEVEL", "")
    name = given.lower()
    if name == "debug":
        level = logging.DEBUG
    elif name == "verbose":
        level = logging.INFO
    elif name not in ("", "error", "silent"):  # the daemon's other two: the default here
        print(f"warning: LOG_LEVEL={given!r} is not one of debug, verbose, error, silent; "
              "ignored", file=sys.stderr)
    from ..journal import handler

    logging.basicConfig(level=level, handlers=[handler("%(levelname)s %(name)s: %(message)s")])
    for library in _QUIET:
        logging.getLogger(library).setLevel(max(level, logging.INFO))


_PROFILE_HELP = "the profile (YAML), e.g. /etc/wgvsock/NAME.yaml"
_VERBOSE_HELP = "log INFO lines too, not only warnings (LOG_LEVEL=debug: debug lines)"


def parent_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="wgvsock parent", description="the EC2 host's side")
    sub = ap.add_subparsers(dest="cmd", required=True,
                             metavar="{up,down,reload,doctor}")
    up = sub.add_parser("up", help="bring the tunnel, NAT, ingress and control listener up")
    up.add_argument("--profile", required=True, metavar="FILE", help=_PROFILE_HELP)
    up.add_argument("-f", "--foreground", action="store_true",
                    help="stay in the foreground, logging to stderr (as the systemd unit runs "
                    "it). Without it `up` returns once the parent is ready, and the parent "
                    "in the background logs to $WGVSOCK_LOG_FILE, or nowhere when it is unset")
    up.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    down = sub.add_parser("down", help="remove everything `up` made")
    reload = sub.add_parser("reload", help="apply a changed egress, ingress or attestation "
                            "policy to the running parent (the tunnel stays up)")
    check = sub.add_parser("doctor", help="check this host is ready")
    for p in (down, reload, check):
        p.add_argument("--profile", required=True, metavar="FILE",
                       help=_PROFILE_HELP + (" (the file the parent runs from)"
                                             if p is reload else ""))
    args = ap.parse_args(argv)
    if args.cmd == "down":
        return _down(args.profile)
    profile = _load(args.profile, _NOT_LOADED.get(args.cmd, ""))
    if profile is None:
        return 1
    from . import parent, state
    from .common import named

    if args.cmd == "doctor":
        return doctor(profile)
    if args.cmd == "reload":
        try:
            ok, message = state.request_reload(profile)
        except parent.RoleError as e:
            print(f"wgvsock parent reload: {e}", file=sys.stderr)
            return 1
        print(message, file=sys.stdout if ok else sys.stderr)
        for w in (parent.ingress_port_holders(profile) or []) if ok else []:
            print(f"warning: {w}", file=sys.stderr)
        # The running parent read the profile with the code it started with: after an upgrade
        # a key only the new release knows is refused there, while `profile check` takes it.
        if note := state.running_code_note(profile):
            print(note, file=sys.stderr)
        return 0 if ok else 1
    from ..daemon import EnvError, follow_log, spawn_background, take_ready_fd
    from ..services.profile import (
        check_host,
        check_host_warnings,
        check_routes,
        local_networks,
        local_routes,
    )

    try:
        ready_fd = take_ready_fd()
    except EnvError as e:
        print(f"wgvsock parent up: {e}", file=sys.stderr)
        return 2
    if ready_fd is None:
        try:
            pid = state.already_up(profile)
        except parent.RoleError as e:
            print(f"wgvsock parent up: {e}", file=sys.stderr)
            return 1
        if pid is not None:
            print(f"{named(profile.name)} is already up (pid {pid})")
            if note := state.running_code_note(profile):
                print(note)
            return 0
        try:
            parent.renamed(profile, its_interface=True)
        except parent.RoleError as e:
            print(f"wgvsock parent up: {e}", file=sys.stderr)
            return 1
        # Checked before anything is made, so a clash with the host changes nothing.
        routes = local_routes(exclude_interface=profile.interface)
        problems = check_host(profile, local_networks(exclude_interface=profile.interface),
                              routes)
        if problems:
            print("refusing to start:\n" + "\n".join(str(p) for p in problems), file=sys.stderr)
            return 1
        # Only a warning: the rest of the tunnel works, and the host may get its route later
        # (an IPv6 default route comes by router advertisement).
        warnings: list[object] = [*check_host_warnings(profile, routes),
                                  *check_routes(profile, routes),
                                  *(parent.ingress_port_holders(profile) or [])]
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not args.foreground:
            # The background process logs them (Parent.start), where nobody may look: its
            # output goes nowhere without $WGVSOCK_LOG_FILE. In the foreground the log is here.
            for w in profile.warnings:
                print(f"warning: {w}", file=sys.stderr)
            if key_warning := parent.key_path_warning(profile.parent.private_key):
                print(f"warning: {key_warning}", file=sys.stderr)
            # Docker's FORWARD policy drop, say: the tunnel comes up and carries nothing.
            if (forward := parent.forward_chain_check(profile)).ok is False:
                print(f"warning: {named(profile.name)}: {forward.detail}", file=sys.stderr)
            extra = ["-v"] if args.verbose else []
            code = spawn_background(
                ["-m", "wgvsock.cli", "parent", "up", "--profile", args.profile, "-f", *extra],
                "wgvsock parent up",
            )
            if code == 0:
                print(_up_line(profile))
            return code
    _logging(args.verbose)
    if ready_fd is not None:
        follow_log()
    return parent.run_up(profile, ready_fd)


def _up_line(profile) -> str:
    """What a background `up` brought up and where its log goes, once it is ready: it said
    nothing, as `enclave up` and the running parent's log do, and its log went nowhere
    without a word when $WGVSOCK_LOG_FILE was unset."""
    from ..daemon import ENV_LOG_FILE
    from ..safetext import prose
    from . import state
    from .common import named

    try:
        pid = state.already_up(profile)
    except state.RoleError:
        pid = None
    log_file = os.environ.get(ENV_LOG_FILE)
    where = (f"logging to {prose(log_file, 200)}" if log_file else
             f"logging nowhere: {ENV_LOG_FILE} is unset (set it to keep the log, or run "
             "`up -f`, which logs to stderr)")
    return (f"{named(profile.name)} is up on {profile.interface}"
            + (f" (pid {pid})" if pid is not None else "") + f", {where}")


def _down(path: str) -> int:
    from ..services.profile import ProfileError, load_profile
    from . import parent
    from .common import named

    try:
        profile = load_profile(path)
    except ProfileError as e:
        # The file broken while its parent runs: that parent can still be stopped, by the
        # state file it left (parent.down_unloaded).
        print(f"invalid profile:\n{e}", file=sys.stderr)
        try:
            done, failed = parent.down_unloaded(path)
        except parent.RoleError as e:
            print(f"wgvsock parent down: {e}", file=sys.stderr)
            return 1
        if not done and not failed:
            print(_NOT_LOADED["down"], file=sys.stderr)
            return 1
    else:
        try:
            done, failed = parent.down(profile)
        except parent.RoleError as e:
            print(f"wgvsock parent down: {e}", file=sys.stderr)
            return 1
        if not done and not failed:
            done = [f"{named(profile.name)}: nothing to remove"]
    if done:
        print("\n".join(done))
    for line in failed:
        print(f"wgvsock parent down: {line}", file=sys.stderr)
    return 1 if failed else 0


def doctor(profile) -> int:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from ..safetext import prose
    from ..services.profile import (
        check_host,
        check_host_warnings,
        check_routes,
        local_networks,
        local_routes,
    )
    from .common import named
    from .parent import (
        Check,
        connection_limit_check,
        forward_chain_check,
        ingress_port_check,
        local_checks,
        metrics_port_check,
        parent_key_check,
        running_check,
    )

    checks = [running_check(profile), *local_checks(profile)]
    checks.append(parent_key_check(profile))
    routes = local_routes(exclude_interface=profile.interface)
    problems = check_host(profile, local_networks(exclude_interface=profile.interface), routes)
    # The profile's own too (an allow entry a deny entry covers whole): `profile check` and
    # `up` print them, and the doctor called such a profile plainly "valid".
    warnings = [*profile.warnings, *check_host_warnings(profile, routes)] if not problems else []
    checks.append(Check("profile", not problems,
                        "; ".join(str(p) for p in problems or warnings)
                        or "valid, no overlap with this host's networks, routes and ip rules",
                        warning=bool(warnings)))
    problems = check_routes(profile, routes)
    checks.append(Check("routes", not problems,
                        "this host has a route for each of enclave.routes" if not problems
                        else "; ".join(str(p) for p in problems)))
    checks.append(_refusal_log_check(profile))
    checks.append(forward_chain_check(profile))
    checks.append(metrics_port_check(profile))
    checks.append(ingress_port_check(profile))
    checks.append(connection_limit_check(profile))
    try:
        from ..services.aws import doctor_checks

        cw = profile.parent.metrics.cloudwatch
        checks += [Check(c.name, c.ok, c.detail) for c in doctor_checks(
            cloudwatch=(cw.namespace, profile.name) if cw is not None else None)]
    except ImportError:
        checks.append(Check("AWS", None, "AWS checks are not available in this version"))
    table = Table(title=f"wgvsock parent doctor — {named(profile.name)}")
    table.add_column("check")
    table.add_column("state")
    table.add_column("detail", overflow="fold")
    marks = {True: "[green]ready[/]", False: "[red]NOT READY[/]", None: "[dim]n/a[/]"}
    for c in checks:
        # Text, not markup: a detail quotes AWS's and the OS's words, where "[/red]" would
        # stop the table with a MarkupError and "[link=...]" would render.
        mark = "[yellow]WARNING[/]" if c.ok is True and c.warning else marks[c.ok]
        table.add_row(c.name, mark, Text(prose(c.detail, 2000)))
    Console().print(table)
    return 1 if any(c.ok is False for c in checks) else 0


def _refusal_log_check(profile):
    """Whether `parent up` will be able to name refused destinations (nfnetlink_log). Not
    needed to run: without it they are counted, not named."""
    from ..services.nflog import open_free_group
    from .parent import Check

    try:
        open_free_group(profile.name).close()
    except OSError as e:
        return Check("refusal log", None, f"nfnetlink_log unavailable ({e.strerror or e}): "
                     "refused packets will be counted but not named (modprobe nfnetlink_log)")
    return Check("refusal log", True, "nfnetlink_log available: refused destinations are named "
                 "in the log and `wgvsock status`")


def enclave_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="wgvsock enclave",
        description="the enclave's entrypoint: bring the tunnel up, then run CMD",
        usage="wgvsock enclave up --profile FILE [--timeout S] [--outside-enclave] [-v] "
              "[-- CMD [ARGS...]]",
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{up}")
    # prog: argparse would otherwise put the enclave parser's whole usage before "up".
    up = sub.add_parser("up", prog="wgvsock enclave up",
                        usage="wgvsock enclave up [-h] --profile FILE [--timeout S] "
                        "[--outside-enclave] [-v] [-- CMD [ARGS...]]",
                        help="bring the tunnel up, then run CMD as a child")
    up.add_argument("--profile", required=True, metavar="FILE",
                    help="the profile (YAML) baked into the image")
    up.add_argument("--timeout", type=seconds(86400, "a day"), default=60.0, metavar="S",
                    help="seconds to wait for the parent (default 60)")
    up.add_argument("--outside-enclave", action="store_true",
                    help="start even though this network namespace already has a default route "
                    "(a container tried with `docker run`; an enclave has none). Without it "
                    "`up` refuses there, changing nothing: on a host it would replace the "
                    "host's default route and /etc/resolv.conf. With it, the replaced routes "
                    "are logged, they and /etc/resolv.conf put back when `up` ends, and "
                    "a read-only /proc/sys (which leaves wg0 open to the parent's router "
                    "advertisements) only warned about rather than refused")
    up.add_argument("-v", "--verbose", action="store_true", help=_VERBOSE_HELP)
    up.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                    help="the app, started once the tunnel is up; its exit status is ours. "
                    "Without it the tunnel stays up until signalled")
    args = ap.parse_args(argv)
    from ..signals import STOPPING, note

    # Loading the profile and the enclave's modules takes about half a second, during which
    # a stop asked for (as PID 1 dropped without a handler) is kept for run_up.
    early = note(STOPPING)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    profile = _load(args.profile)
    if profile is None:
        return 1
    _logging(args.verbose)
    from .enclave import run_up

    return run_up(profile, command, timeout=args.timeout, signalled=early,
                  outside_enclave=args.outside_enclave)
