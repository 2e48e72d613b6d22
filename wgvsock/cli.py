"""`wgvsock`: one command for every role."""

from __future__ import annotations

import os
import stat
import sys

from . import __version__
from .stdout import guarded

USAGE = """usage: wgvsock COMMAND [ARGS...]

commands:
  daemon [-f] [-d] [-n NET] IFNAME   run a WireGuard interface (same as wireguard-go-vsock)
  genkey                             print a new private key (base64)
  pubkey                             read a private key on stdin, print its public key
  parent up|down|reload|doctor --profile F
                                     the EC2 host's side of a profile
  enclave up --profile F [-- CMD]    the enclave image's entrypoint
  status [IFNAME...] [--once|--json] live dashboard of handshakes and transfer
  attest verify|pcrs ...             check attestation documents, pin PCRs
  profile check FILE [--host]        validate a profile and print it resolved
  profile pin-parent FILE [--key-file F|--public-key K]
                                     pin the parent's public key in a profile
  version                            print the version
"""

_MAX_KEY_INPUT = 4096
_KEY_USAGE = {
    "genkey": "usage: wgvsock genkey > KEYFILE\n\nPrint a new WireGuard private key (base64), as "
              "`wg genkey` does.\n",
    "pubkey": "usage: wgvsock pubkey < KEYFILE\n\nRead a private key (base64) on stdin and print "
              "its public key, as `wg pubkey` does.\n",
}


def main(argv: list[str] | None = None) -> int:
    return guarded("wgvsock", _main, sys.argv[1:] if argv is None else argv)


def _warn_if_others_may_read_stdout() -> None:
    """`genkey > FILE` under the usual umask 022 makes FILE readable by everyone: warned as
    wg(8)'s genkey does (others' bits only). The key is written all the same."""
    try:
        st = os.fstat(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return  # closed or not a file: the write says so
    if not stat.S_ISREG(st.st_mode) or not st.st_mode & stat.S_IRWXO:
        return
    from .safetext import prose

    try:
        where = prose(os.readlink(f"/proc/self/fd/{sys.stdout.fileno()}"), 300)
    except OSError:
        where = "standard output"
    print(f"wgvsock genkey: warning: {where} is open to other users (mode "
          f"{stat.S_IMODE(st.st_mode):o}): they can read the private key written to it; set "
          "`umask 077` and make it again", file=sys.stderr)


def _main(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE, end="")
        return 0 if args else 2
    cmd, rest = args[0], args[1:]
    if cmd in _KEY_USAGE and rest:
        # They take no arguments: "--help" would otherwise print a private key, or wait on a
        # terminal for one.
        if rest[0] in ("-h", "--help"):
            print(_KEY_USAGE[cmd], end="")
            return 0
        from .safetext import quote

        print(f"wgvsock {cmd}: takes no arguments, got {quote(rest[0])}\n{_KEY_USAGE[cmd]}",
              end="", file=sys.stderr)
        return 2
    if cmd == "daemon":
        from .daemon import main as daemon_main

        return daemon_main(rest, prog="wgvsock daemon")
    if cmd == "genkey":
        from .core.crypto import generate_private_key, key_to_base64

        _warn_if_others_may_read_stdout()
        print(key_to_base64(generate_private_key()))
        return 0
    if cmd == "pubkey":
        from .core.crypto import KeyFormatError, key_from_base64, key_to_base64, public_key

        # Bytes, and a bounded read: the key is 45 of them, and a strict UTF-8 decode or a
        # whole /dev/zero would be a traceback rather than "not a key".
        data = sys.stdin.buffer.read(_MAX_KEY_INPUT + 1)
        try:
            if len(data) > _MAX_KEY_INPUT:
                raise KeyFormatError(f"more than a key (over {_MAX_KEY_INPUT} bytes)")
            key = key_from_base64(data.decode("ascii", "replace"))
        except KeyFormatError as e:
            print(f"wgvsock pubkey: invalid private key on stdin: {e}", file=sys.stderr)
            return 1
        print(key_to_base64(public_key(key)))
        return 0
    if cmd == "parent":
        from .roles.cli import parent_main

        return parent_main(rest)
    if cmd == "enclave":
        from .roles.cli import enclave_main

        return enclave_main(rest)
    if cmd == "status":
        from .ui.status import main as status_main

        return status_main(rest)
    if cmd == "attest":
        from .attestation.cli import main as attest_main

        return attest_main(rest)
    if cmd in ("version", "--version"):
        print(f"wgvsock {__version__}")
        return 0
    if cmd == "profile":
        if rest[:1] == ["check"]:
            from .services.profile import main_check

            return main_check(rest[1:])
        if rest[:1] == ["pin-parent"]:
            from .services.profile import main_pin_parent

            return main_pin_parent(rest[1:])
        print("usage: wgvsock profile check FILE [--host]\n"
              "       wgvsock profile pin-parent FILE [--key-file F | --public-key B64]",
              file=sys.stdout if rest[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if rest[:1] in (["-h"], ["--help"]) else 2
    print(f"wgvsock: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr, end="")
    return 2


if __name__ == "__main__":
    sys.exit(main())
