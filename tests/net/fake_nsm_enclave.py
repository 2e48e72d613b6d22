"""Runs `wgvsock enclave up` against a fake NSM, for the attested end-to-end test of the roles.

    python tests/net/fake_nsm_enclave.py --ca-dir DIR --mode MODE -- ENCLAVE-UP-ARGS...

e.g. `... --mode good -- --profile p.yaml --timeout 8 -- python3 -m http.server 8080`.

The enclave is its own process (under `ip netns exec`), out of reach of a test's monkeypatch.
This launcher loads the test CA that TestCA.save() wrote to DIR (or makes and saves one),
installs FakeNSM's ioctl as `wgvsock.attestation.nsm.system_ioctl`, points WGVSOCK_NSM_DEVICE
at a stand-in file in DIR, and then runs `wgvsock enclave up ARGS` in this process, so the
real NSM client, control exchange and enclave role run unchanged. MODE decides what the fake
NSM signs:

  good          the test PCRs, with the nonce and public key the enclave asks for
  wrong-pcr     PCR0 of another image; the nonce and key as asked
  replay-nonce  the first nonce recorded in DIR/nonces by an earlier run, not the one asked for
  key-mismatch  another WireGuard public key than the enclave's own
  debug         all-zero PCRs, as a debug-mode enclave reports; the nonce and key as asked

Every run appends what the enclave asked to have attested to DIR/nonces (hex) and DIR/keys
(base64), one line per request, so a later run can replay a nonce and tests can name the keys.
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.attest_fixtures import DEBUG_PCRS, TEST_PCRS, FakeNSM, TestCA, make_test_ca, pcr  # noqa: E402
from wgvsock import cli  # noqa: E402
from wgvsock.attestation import nsm  # noqa: E402
from wgvsock.core.crypto import generate_private_key, public_key  # noqa: E402

MODES = ("good", "wrong-pcr", "replay-nonce", "key-mismatch", "debug")
OTHER_IMAGE_PCR0 = pcr("another image")


def load_ca(directory: Path) -> TestCA:
    if (directory / "leaf.key").exists():
        return TestCA.load(directory)
    ca = make_test_ca()
    ca.save(directory)
    return ca


def recorded_nonce(directory: Path) -> bytes | None:
    try:
        first = (directory / "nonces").read_text().split()[:1]
    except FileNotFoundError:
        return None
    return bytes.fromhex(first[0]) if first else None


def fake_nsm(ca: TestCA, mode: str, directory: Path) -> FakeNSM:
    pcrs = dict(TEST_PCRS)
    if mode == "wrong-pcr":
        pcrs[0] = OTHER_IMAGE_PCR0
    elif mode == "debug":
        pcrs = dict(DEBUG_PCRS)
    fake = FakeNSM(ca, pcrs=pcrs)
    replayed = recorded_nonce(directory) if mode == "replay-nonce" else None
    if mode == "replay-nonce" and replayed is None:
        raise SystemExit(f"fake_nsm_enclave: --mode replay-nonce needs a nonce recorded by an "
                         f"earlier run in {directory / 'nonces'}")
    other_key = public_key(generate_private_key())
    honest = fake.answer

    def answer(request: Any) -> Any:
        if isinstance(request, Mapping) and isinstance(request.get("Attestation"), Mapping):
            args = dict(request["Attestation"])
            with open(directory / "nonces", "a") as f:
                f.write((args.get("nonce") or b"").hex() + "\n")
            with open(directory / "keys", "a") as f:
                f.write(base64.b64encode(args.get("public_key") or b"").decode() + "\n")
            if mode == "replay-nonce":
                args["nonce"] = replayed
            elif mode == "key-mismatch":
                args["public_key"] = other_key
            request = {"Attestation": args}
        return honest(request)

    fake.answer = answer  # type: ignore[method-assign]
    return fake


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: fake_nsm_enclave.py --ca-dir DIR --mode MODE -- ENCLAVE-UP-ARGS...",
              file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="fake_nsm_enclave.py")
    ap.add_argument("--ca-dir", required=True, type=Path)
    ap.add_argument("--mode", required=True, choices=MODES)
    args = ap.parse_args(argv[:split])
    directory: Path = args.ca_dir
    directory.mkdir(parents=True, exist_ok=True)
    fake = fake_nsm(load_ca(directory), args.mode, directory)
    nsm.system_ioctl = fake.ioctl
    os.environ[nsm.DEVICE_ENV] = str(fake.device(directory))
    print(f"fake_nsm_enclave: mode {args.mode}, fake NSM at {os.environ[nsm.DEVICE_ENV]}",
          file=sys.stderr, flush=True)
    return cli.main(["enclave", "up", *argv[split + 1:]])


if __name__ == "__main__":
    sys.exit(main())
