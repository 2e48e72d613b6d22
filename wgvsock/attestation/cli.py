"""`wgvsock attest verify|pcrs`: check a stored attestation document; turn nitro-cli's
measurements into the profile's `attestation:` block."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any

from ..argtypes import seconds
from ..regular import NotRegularFile, read_regular
from ..safetext import prose, quote
from .verify import (
    AttestationError,
    Document,
    fingerprint,
    iso_time,
    load_certificate,
    trusted_root,
    verify_document,
)

PCR_HEX_LEN = 96
EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
# An attestation document is a few KiB and nitro-cli's JSON less: more is the wrong file (a
# disk image, /dev/zero), which would otherwise be read whole into memory.
MAX_INPUT = 1 << 20
# --max-age: ten years is longer than any certificate in the chain is valid.
MAX_AGE_LIMIT = 10 * 366 * 86400
# A PCR index: 0..31 in ASCII digits (str.isdigit() takes superscript and Arabic-Indic ones).
_INDEX = re.compile(r"[0-9]{1,2}")


class _Usage(Exception):
    """A bad argument or unreadable input: exit 2, as argparse does."""


def _parse_time(text: str) -> datetime:
    try:
        return datetime.fromtimestamp(float(text), UTC)
    except ValueError:
        pass
    except (OverflowError, OSError):
        raise _Usage(f"--at {text}: out of range") from None
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise _Usage(f"--at {text!r}: not an ISO 8601 time nor Unix seconds") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def _parse_pcr(text: str) -> tuple[int, str]:
    index, sep, value = text.partition("=")
    index = index.strip().upper().removeprefix("PCR")
    value = value.strip().lower().removeprefix("0x")
    if not sep or not _INDEX.fullmatch(index) or not 0 <= int(index) <= 31:
        raise _Usage(f"--pcr {quote(text, 120)}: write N=HEX with N in 0..31, "
                     "e.g. --pcr 0=3f5a...")
    if len(value) != PCR_HEX_LEN or not re.fullmatch(r"[0-9a-f]*", value):
        raise _Usage(f"--pcr {quote(text, 120)}: the value must be {PCR_HEX_LEN} hex digits "
                     "(SHA-384)")
    return int(index), value


def _read_input(path: str, what: str) -> bytes:
    try:
        if path == "-":
            data = sys.stdin.buffer.read(MAX_INPUT + 1)
        else:
            data = read_regular(path, MAX_INPUT + 1)
    except NotRegularFile as e:
        raise _Usage(f"{what} {path}: {e.strerror} (give - to read standard input)") from None
    except OSError as e:
        raise _Usage(f"{what} {path}: {e.strerror}") from None
    if len(data) > MAX_INPUT:
        raise _Usage(f"{what} {path}: larger than {MAX_INPUT >> 20} MiB; an attestation "
                     "document is a few KiB and nitro-cli's JSON less: is this the right file?")
    return data


def _document_bytes(data: bytes) -> bytes:
    # A COSE_Sign1 starts with 0x84 (array of 4) or 0xD2 (tag 18); anything else may be the
    # base64 the control channel carries, copied from a log.
    if data[:1] in (b"\x84", b"\xd2"):
        return data
    text = b"".join(data.split())
    try:
        decoded = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return data
    return decoded if decoded[:1] in (b"\x84", b"\xd2") else data


def _human(doc: Document) -> str:
    # For a terminal: what the document says of itself (module_id, certificate subjects) is
    # escaped, so a hostile document cannot hide or forge lines (the JSON form escapes anyway).
    lines = [
        f"module:      {prose(doc.module_id, 200)}",
        f"time:        {iso_time(doc.time)} (timestamp {doc.timestamp} ms)",
        f"digest:      {doc.digest}",
    ]
    for i, value in doc.pcrs_hex().items():
        lines.append(f"{'PCR' + str(i) + ':':<12} {value}")
    if doc.debug_mode:
        lines.append("             (all-zero image PCRs: a debug-mode enclave)")
    if doc.public_key == b"":
        lines.append("public key:  (empty, 0 bytes)")
    elif doc.public_key is not None:
        lines.append(f"public key:  {base64.b64encode(doc.public_key).decode()} "
                     f"({len(doc.public_key)} bytes)")
    else:
        lines.append("public key:  (none)")
    lines.append(f"nonce:       {doc.nonce.hex() if doc.nonce is not None else '(none)'}")
    if doc.user_data is None:
        lines.append("user data:   (none)")
    else:
        lines.append(f"user data:   {base64.b64encode(doc.user_data).decode()} "
                     f"({len(doc.user_data)} bytes)")
    for cert in doc.to_json()["certificates"]:
        lines.append(f"{'certificate:' if cert['role'] == 'leaf' else 'ca:':<12} "
                     f"{prose(cert['subject'], 200) if cert['subject'] else '(unparsable)'}"
                     + (f", valid {cert['not_before']} .. {cert['not_after']}"
                        if cert["subject"] else ""))
    return "\n".join(lines)


def _verify(args: argparse.Namespace) -> int:
    pcrs = dict(_parse_pcr(p) for p in args.pcr)
    nonce = None
    if args.nonce is not None:
        try:
            nonce = bytes.fromhex(args.nonce.removeprefix("0x"))
        except ValueError:
            raise _Usage(f"--nonce {args.nonce!r}: not hexadecimal") from None
    public_key = None
    if args.public_key is not None:
        try:
            public_key = base64.b64decode(args.public_key, validate=True)
        except (binascii.Error, ValueError):
            raise _Usage(f"--public-key {args.public_key!r}: not base64") from None
    at = _parse_time(args.at) if args.at is not None else None
    try:
        if args.root is not None:
            root = load_certificate(_read_input(args.root, "--root"))
        else:
            root = trusted_root()
    except AttestationError as e:
        raise _Usage(e.reason) from None
    data = _document_bytes(_read_input(args.file, "document"))

    checked = ["structure", "chain to the pinned root",
               "validity at " + ("the time given" if at else "the document's time"),
               "signature"]
    checked += [f"PCR{i}" for i in sorted(pcrs)]
    checked += ["nonce"] * (nonce is not None) + ["public key"] * (public_key is not None)
    if args.max_age is not None:
        checked.append(f"age <= {args.max_age:g} s")
    root_text = f"{root.subject.rfc4514_string()} (SHA-256 {fingerprint(root)})"
    try:
        doc = verify_document(data, root=root, at=at, now=at, pcrs=pcrs, nonce=nonce,
                              public_key=public_key, max_age=args.max_age)
    except AttestationError as e:
        if args.json:
            print(json.dumps({"ok": False, "code": e.code, "reason": e.reason, "root": root_text,
                              "document": e.document.to_json() if e.document else None},
                             indent=2))
        else:
            if e.document is not None:
                print(_human(e.document))
            print(f"wgvsock attest verify: REFUSED ({e.code}): {prose(e.reason, 1000)}",
                  file=sys.stderr)
        return EXIT_REFUSED
    if args.json:
        out: dict[str, Any] = {"ok": True, "root": root_text, "checked": checked,
                               "document": doc.to_json()}
        print(json.dumps(out, indent=2))
    else:
        print(_human(doc))
        print(f"verified:    {', '.join(checked)}")
        print(f"root:        {root_text}")
    return EXIT_OK


def _measurements(text: str) -> dict[str, Any]:
    # `nitro-cli build-enclave` prints progress lines before its JSON; take the first object.
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(obj, dict):
            m = obj.get("Measurements", obj)
            if isinstance(m, dict) and any(str(k).upper().startswith("PCR") for k in m):
                return m
        start = text.find("{", start + 1)
    raise _Usage("no Measurements with PCR values found (give the JSON that "
                 "`nitro-cli build-enclave` or `nitro-cli describe-eif --eif-path F` prints)")


def _pcrs(args: argparse.Namespace) -> int:
    source = args.input
    # The JSON itself may be given (handy as "$(nitro-cli describe-eif ...)").
    is_text = "{" in source and not os.path.exists(source)
    raw = source.encode() if is_text else _read_input(source, "input")
    if raw[:4] == b".eif":
        raise _Usage(f"{source} is an enclave image, not JSON: run `nitro-cli describe-eif "
                     f"--eif-path {source}` and give its output")
    m = _measurements(raw.decode("utf-8", "replace"))
    algorithm = str(m.get("HashAlgorithm", "Sha384"))
    if "384" not in algorithm:
        raise _Usage(f"HashAlgorithm is {algorithm!r}; the profile needs SHA-384 values")
    pcrs: dict[int, str] = {}
    for key, value in m.items():
        k = str(key).upper()
        if not k.startswith("PCR"):
            continue
        index = k.removeprefix("PCR")
        v = str(value).strip().lower()
        if not _INDEX.fullmatch(index) or not 0 <= int(index) <= 31:
            raise _Usage(f"{prose(key, 40)}: not a PCR (nitro-cli names them PCR0 to PCR31)")
        if len(v) != PCR_HEX_LEN or not re.fullmatch(r"[0-9a-f]*", v):
            raise _Usage(f"{prose(key, 40)}: {quote(str(value), 20)} is not a SHA-384 value")
        pcrs[int(index)] = v
    print("attestation:")
    print("  require: true")
    print("  pcrs:")
    for i, v in sorted(pcrs.items()):
        print(f"    {i}: {v}")
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="wgvsock attest", description="attestation tools")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="{verify,pcrs}")
    v = sub.add_parser(
        "verify", help="verify an attestation document and print it",
        description="Verify a Nitro attestation document (raw COSE_Sign1, or its base64) "
                    "against the AWS Nitro root and print it. Exit 0 when valid, 1 when "
                    "refused (with the reason), 2 on bad arguments.")
    v.add_argument("file", metavar="FILE", help="the document; - for stdin")
    v.add_argument("--at", metavar="TIME",
                   help="check certificate validity (and age) at this time, ISO 8601 or Unix "
                        "seconds; default the document's own timestamp")
    v.add_argument("--pcr", metavar="N=HEX", action="append", default=[],
                   help="expected PCR value (repeatable); default: PCRs are printed, not "
                        "compared")
    v.add_argument("--nonce", metavar="HEX", help="expected nonce; default: not compared")
    v.add_argument("--public-key", metavar="B64", help="expected public key; default: not compared")
    v.add_argument("--max-age", metavar="S", type=seconds(MAX_AGE_LIMIT, "ten years"),
                   help="refuse documents older than S seconds (relative to --at or now); "
                        "default: no age limit")
    v.add_argument("--json", action="store_true", help="print JSON for scripts")
    v.add_argument("--root", metavar="PEM", help="trust this root instead of AWS's")
    p = sub.add_parser(
        "pcrs", help="print the profile's attestation block from nitro-cli output",
        description="Read the JSON `nitro-cli build-enclave` or `nitro-cli describe-eif` "
                    "prints (a file, - for stdin, or the JSON itself) and print the "
                    "`attestation:` block to paste into the profile.")
    p.add_argument("input", metavar="EIF_JSON_OR_FILE")
    return ap


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse printed the usage or help already
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return _verify(args) if args.cmd == "verify" else _pcrs(args)
    except _Usage as e:
        print(f"wgvsock attest {args.cmd}: {e}", file=sys.stderr)
        return EXIT_USAGE
