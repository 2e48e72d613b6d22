"""Attestation: the verifier against documents signed by a test CA, the packaged AWS root, the
NSM client against a fake device, and `wgvsock attest`."""

from __future__ import annotations

import base64
import errno
import hashlib
import io
import json
import logging
import os
import random
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.attest_fixtures import (
    DEBUG_PCRS,
    MODULE_ID,
    TEST_PCRS,
    FakeNSM,
    TestCA,
    make_document,
    make_payload,
    make_test_ca,
    resign,
    sign1,
)
from tests.unsayable import Unsayable
from wgvsock import cli
from wgvsock.attestation import (
    NSM,
    AttestationError,
    Document,
    NSMError,
    aws_root,
    decode_document,
    nsm,
    nsm_attester,
    trusted_root,
    verify,
    verify_document,
    verify_enclave,
)
from wgvsock.attestation import cli as attest_cli
from wgvsock.attestation.verify import AWS_ROOT_SHA256, CODES, MAX_DOCUMENT, fingerprint
from wgvsock.services.control import ControlError, Verdict, attested_nonce
from wgvsock.services.profile import Attestation, parse_profile

NONCE = bytes(range(32))
WG_KEY = hashlib.sha256(b"enclave wireguard key").digest()
SHARED_ROOT = Path(__file__).resolve().parents[2] / "shared" / "certs" / \
    "aws-nitro-enclaves-root-g1.pem"
DATA = Path(__file__).resolve().parent / "data"


def genuine(year: int) -> bytes:
    """A genuine AWS document, public and long expired: 2022's payload is a definite-length
    map with a 32-byte public_key, 2026's an indefinite-length one (as the NSM writes now)."""
    return base64.b64decode((DATA / f"aws-nitro-document-{year}.b64").read_text())


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return make_test_ca()


@pytest.fixture(scope="module")
def other_ca() -> TestCA:
    return make_test_ca(name="other")


@pytest.fixture(scope="module")
def good(ca: TestCA) -> bytes:
    return make_document(ca, nonce=NONCE, public_key=WG_KEY, user_data=b"hello")


def refused(data: bytes, code: str, root, **expect) -> AttestationError:
    """verify_document must refuse with exactly this code, and nothing but AttestationError."""
    with pytest.raises(AttestationError) as info:
        verify_document(data, root=root, **expect)
    assert info.value.code == code, info.value.reason
    assert info.value.code in CODES
    assert str(info.value) == info.value.reason
    return info.value


def with_payload(document: bytes, change) -> bytes:
    """The document with its payload changed but the original signature kept (a forgery)."""
    protected, unprotected, payload, signature = cbor2.loads(document)
    p = cbor2.loads(payload)
    change(p)
    return cbor2.dumps([protected, unprotected, cbor2.dumps(p), signature])


# -- valid documents -------------------------------------------------------------------------


def test_valid_untagged_document(ca, good):
    doc = verify_document(good, root=ca.root_cert, nonce=NONCE, public_key=WG_KEY,
                          pcrs={i: v.hex() for i, v in TEST_PCRS.items() if i < 3},
                          max_age=300)
    assert isinstance(doc, Document)
    assert doc.module_id == MODULE_ID
    assert doc.digest == "SHA384"
    assert doc.pcrs == TEST_PCRS
    assert doc.nonce == NONCE and doc.public_key == WG_KEY and doc.user_data == b"hello"
    assert abs(doc.time - datetime.now(UTC)) < timedelta(minutes=1)
    assert not doc.debug_mode
    json.dumps(doc.to_json())  # all of it serialisable


def test_valid_tagged_document_and_root_as_pem(ca):
    tagged = make_document(ca, tagged=True)
    assert tagged[0] == 0xD2  # CBOR tag 18
    doc = verify_document(tagged, root=ca.root_pem)
    assert doc.nonce is None and doc.public_key is None and doc.user_data is None


def test_optional_fields_may_be_left_out(ca):
    doc = verify_document(make_document(ca, drop=("public_key", "user_data", "nonce")),
                          root=ca.root_cert)
    assert doc.nonce is None


def test_pcr_expectations_accept_bytes_and_uppercase_hex(ca, good):
    verify_document(good, root=ca.root_cert, pcrs={0: TEST_PCRS[0], 1: TEST_PCRS[1].hex().upper()})


def test_decode_without_verifying(ca, other_ca):
    doc = decode_document(make_document(other_ca, nonce=b"x"))
    assert doc.nonce == b"x"


# -- refused documents: signature, root, chain, validity -------------------------------------


def test_bad_signature(ca, good):
    protected, unprotected, payload, signature = cbor2.loads(good)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    e = refused(cbor2.dumps([protected, unprotected, payload, flipped]), "bad-signature",
                ca.root_cert)
    assert "does not verify" in e.reason
    assert e.document is not None and e.document.module_id == MODULE_ID


def test_signed_by_a_key_other_than_the_leaf(ca, other_ca):
    refused(make_document(ca, sign_key=other_ca.leaf_key), "bad-signature", ca.root_cert)


def test_signature_of_the_wrong_length(ca, good):
    protected, unprotected, payload, signature = cbor2.loads(good)
    e = refused(cbor2.dumps([protected, unprotected, payload, signature[:64]]), "bad-signature",
                ca.root_cert)
    assert "64 bytes" in e.reason


def test_wrong_root(ca, other_ca, good):
    e = refused(good, "untrusted-root", other_ca.root_cert)
    assert fingerprint(ca.root_cert) in e.reason and fingerprint(other_ca.root_cert) in e.reason


def test_what_a_document_says_of_itself_reaches_a_reason_escaped_and_short(ca):
    # A hostile enclave chooses its certificates' subjects and its field values; the reason
    # is logged by the parent and sent back: no forged lines, no terminal escapes, no 64 KiB.
    forged = make_test_ca(name="x\n2026 WARNING control: registered\x1b[2J")
    e = refused(make_document(forged), "untrusted-root", ca.root_cert)
    assert "\\n2026 WARNING control" in e.reason and "\\x1b[2J" in e.reason
    assert e.reason.isprintable()
    e = refused(with_payload(make_document(ca), lambda p: p.update(digest=b"\n" * 12000)),
                "invalid-field", ca.root_cert)
    assert e.reason.isprintable() and len(e.reason) < 120


def test_test_documents_are_not_trusted_by_the_aws_root(good):
    refused(good, "untrusted-root", None)


def test_pinned_root_with_an_intermediate_it_did_not_sign(ca, other_ca):
    # The bundle starts with the pinned root but continues with another CA's intermediate.
    cabundle = [ca.cabundle[0], other_ca.cabundle[1]]
    doc = make_document(other_ca, overrides={"cabundle": cabundle})
    e = refused(doc, "bad-chain", ca.root_cert)
    assert "intermediate" in e.reason


def test_leaf_not_issued_by_the_bundle(ca, other_ca):
    doc = make_document(other_ca, overrides={"cabundle": ca.cabundle})
    refused(doc, "bad-chain", ca.root_cert)


def test_leaf_used_as_a_ca(ca):
    # A chain that tries to pass the leaf off as an intermediate issuing another leaf.
    from tests.attest_fixtures import _cert, _key

    key = _key()
    now = datetime.now(UTC)
    fake_leaf = _cert("child of leaf", key, "test enclave leaf", ca.leaf_key, ca=False,
                      path_length=None, not_before=now - timedelta(hours=1),
                      not_after=now + timedelta(hours=1))
    doc = make_document(ca, sign_key=key, overrides={
        "certificate": fake_leaf.public_bytes(serialization.Encoding.DER),
        "cabundle": [*ca.cabundle, ca.leaf_der]})
    e = refused(doc, "bad-chain", ca.root_cert)
    assert "not a CA" in e.reason


def test_expired_leaf(ca):
    past = datetime.now(UTC) - timedelta(days=2)
    old = make_test_ca(now=past)
    # Reuse the root and intermediate of `old` but a leaf that expired before the timestamp.
    doc = make_document(old, timestamp_ms=int(time.time() * 1000))
    e = refused(doc, "certificate-expired", old.root_cert)
    assert "the signing certificate" in e.reason and "expired at" in e.reason


def test_leaf_not_yet_valid():
    soon = datetime.now(UTC) + timedelta(hours=2)
    early = make_test_ca(leaf_not_before=soon)
    e = refused(make_document(early), "certificate-not-yet-valid", early.root_cert)
    assert "valid only from" in e.reason


def test_validity_at_a_given_time(ca, good):
    later = datetime.now(UTC) + timedelta(hours=5)
    refused(good, "certificate-expired", ca.root_cert, at=later)
    verify_document(good, root=ca.root_cert, at=time.time())


def test_unusable_certificate(ca):
    e = refused(make_document(ca, overrides={"certificate": b"\x30\x03\x02\x01\x01"}),
                "bad-certificate", ca.root_cert)
    assert "signing certificate" in e.reason
    refused(make_document(ca, overrides={"cabundle": [ca.cabundle[0], b"junk"]}),
            "bad-certificate", ca.root_cert)


# -- refused documents: tampering and expectations -------------------------------------------


@pytest.mark.parametrize("change", [
    pytest.param(lambda p: p.update(module_id="i-0000000000000000-enc0000000000000000"),
                 id="module_id"),
    pytest.param(lambda p: p["pcrs"].update({0: bytes(48)}), id="pcr"),
    pytest.param(lambda p: p.update(nonce=b"\x00" * 32), id="nonce"),
    pytest.param(lambda p: p.update(public_key=b"\x01" * 32), id="public_key"),
    pytest.param(lambda p: p.update(timestamp=p["timestamp"] + 1), id="timestamp"),
])
def test_tampered_payload(ca, good, change):
    refused(with_payload(good, change), "bad-signature", ca.root_cert)


def test_pcr_mismatch(ca, good):
    e = refused(good, "pcr-mismatch", ca.root_cert, pcrs={1: "ab" * 48})
    assert e.reason.startswith("PCR1 is ")
    e = refused(good, "pcr-mismatch", ca.root_cert, pcrs={20: "ab" * 48})
    assert "PCR20 is not in the document" in e.reason


def test_debug_mode_enclave_refused_when_pcrs_are_pinned(ca):
    doc = make_document(ca, pcrs=DEBUG_PCRS)
    refused(doc, "debug-enclave", ca.root_cert, pcrs={0: "00" * 48})
    assert verify_document(doc, root=ca.root_cert).debug_mode  # no pins: genuine, just debug


def test_nonce_mismatch(ca, good):
    e = refused(good, "nonce-mismatch", ca.root_cert, nonce=b"\x07" * 32)
    assert "replayed" in e.reason
    e = refused(make_document(ca), "nonce-mismatch", ca.root_cert, nonce=NONCE)
    assert "no nonce" in e.reason


def test_public_key_mismatch(ca, good):
    e = refused(good, "public-key-mismatch", ca.root_cert, public_key=b"\x02" * 32)
    assert base64.b64encode(WG_KEY).decode() in e.reason
    refused(make_document(ca), "public-key-mismatch", ca.root_cert, public_key=WG_KEY)


def test_too_old_and_from_the_future(ca):
    now = time.time()
    doc = make_document(ca, timestamp_ms=int((now - 600) * 1000))
    e = refused(doc, "too-old", ca.root_cert, max_age=300, now=now)
    assert "600 s old" in e.reason
    verify_document(doc, root=ca.root_cert, max_age=900, now=now)
    future = make_document(ca, timestamp_ms=int((now + 1200) * 1000))
    refused(future, "from-the-future", ca.root_cert, max_age=300, now=now)


# -- refused documents: structure ------------------------------------------------------------


@pytest.mark.parametrize("name", ["module_id", "digest", "timestamp", "pcrs", "certificate",
                                  "cabundle"])
def test_missing_field(ca, name):
    e = refused(make_document(ca, drop=(name,)), "missing-field", ca.root_cert)
    assert name in e.reason


@pytest.mark.parametrize("name", ["module_id", "certificate"])
def test_null_mandatory_field(ca, name):
    refused(make_document(ca, overrides={name: None}), "missing-field", ca.root_cert)


@pytest.mark.parametrize("overrides", [
    {"module_id": ""},
    {"module_id": 7},
    {"digest": "SHA256"},
    {"timestamp": 0},
    {"timestamp": "yesterday"},
    {"timestamp": True},
    {"timestamp": 2**64 - 1},  # a bignum (2**70) is a tag, refused as malformed
    {"pcrs": {}},
    {"pcrs": [b"\x00" * 48]},
    {"pcrs": {32: b"\x00" * 48}},
    {"pcrs": {"0": b"\x00" * 48}},
    {"pcrs": {0: b"\x00" * 20}},
    {"pcrs": {0: "00" * 48}},
    {"cabundle": []},
    {"cabundle": "root"},
    {"cabundle": [b""]},
    {"certificate": "pem text"},
    {"certificate": b"\x00" * 2000},
    {"nonce": "text"},
    {"public_key": b"\x00" * 1025},
    {"user_data": b"\x00" * 2000},
], ids=repr)
def test_invalid_field(ca, overrides):
    refused(make_document(ca, overrides=overrides), "invalid-field", ca.root_cert)


def test_algorithm_must_be_es384(ca):
    e = refused(make_document(ca, alg=-7), "unsupported-algorithm", ca.root_cert)
    assert "-7" in e.reason
    _, _, payload, signature = cbor2.loads(make_document(ca))
    refused(cbor2.dumps([b"", {}, payload, signature]), "unsupported-algorithm", ca.root_cert)
    refused(cbor2.dumps([cbor2.dumps({1: -35.0}), {}, payload, signature]),
            "unsupported-algorithm", ca.root_cert)


def test_oversized_document(ca):
    big = make_document(ca, user_data=b"\x00" * 1000) + b"\x00" * MAX_DOCUMENT
    e = refused(big, "too-large", ca.root_cert)
    assert str(MAX_DOCUMENT) in e.reason
    refused(b"\x84" + b"\xff" * (64 * 1024), "too-large", ca.root_cert)


@pytest.mark.parametrize("data", [
    b"",
    b"\xff",
    b"not cbor at all",
    b"\x84\x40\xa0",                                   # truncated array
    b"\x5a\xff\xff\xff\xff",                           # length beyond the data
    b"\x81" * 5000,                                    # deep nesting
    cbor2.dumps([b"", {}, b""]),                       # three items
    cbor2.dumps({"a": 1}),                             # a map
    cbor2.dumps(cbor2.CBORTag(17, [b"", {}, b"", b""])),  # COSE_Mac0's tag
    cbor2.dumps([cbor2.dumps({1: -35}), [], b"", b""]),   # unprotected not a map
    cbor2.dumps([cbor2.dumps({1: -35}), {}, "payload", b""]),
    cbor2.dumps([b"\xff", {}, b"", b""]),              # protected not CBOR
    cbor2.dumps([cbor2.dumps([1]), {}, b"", b""]),     # protected not a map
    cbor2.dumps([cbor2.dumps({1: -35}), {}, b"\xff\x00", b""]),  # payload not CBOR
    cbor2.dumps([cbor2.dumps({1: -35}), {}, cbor2.dumps([1, 2]), b""]),  # payload a list
], ids=lambda d: d[:12].hex() or "empty")
def test_malformed_cbor(ca, data):
    refused(data, "malformed", ca.root_cert)


def test_trailing_bytes_after_the_document(ca, good):
    e = refused(good + b"\x00", "malformed", ca.root_cert)
    assert "after" in e.reason


def test_not_bytes_at_all(ca):
    refused("a string", "malformed", ca.root_cert)  # type: ignore[arg-type]


def test_a_payload_key_too_large_to_print_is_refused_as_malformed(ca, good, caplog):
    """str() of an int of more than 4300 digits raises ValueError: a registrant's document
    with such a key must be an AttestationError, never "unexpected". Such an int is a CBOR
    bignum (tag 2), refused as every tag is before anything is decoded."""
    huge = 1 << 20000
    signed = resign(ca, good, lambda p: p.update({huge: 1}))
    with caplog.at_level(logging.WARNING, logger="wgvsock.attestation"):
        with pytest.raises(AttestationError, match="tag 2 "):
            decode_document(signed)
        refused(signed, "malformed", ca.root_cert)
        refused(with_payload(good, lambda p: p.update({huge: 1})), "malformed", ca.root_cert)
    assert not [r for r in caplog.records if "unexpected" in r.getMessage()]


def test_unforeseen_errors_are_logged_a_few_at_a_time(ca, good, monkeypatch, caplog):
    def broken(data):
        raise ValueError("a library's surprise")

    monkeypatch.setattr(verify, "_cose", broken)
    with caplog.at_level(logging.WARNING, logger="wgvsock.attestation"):
        for _ in range(50):
            e = refused(good, "malformed", ca.root_cert)
            assert "a library's surprise" in e.reason
    logged = [r for r in caplog.records if "unexpected" in r.getMessage()]
    assert 1 <= len(logged) <= 6, len(logged)


def test_an_unforeseen_error_whose_message_cannot_be_made_still_refuses(ca, good, monkeypatch):
    """Before: the safety net took str() of the unforeseen exception, which raised again, so
    verify_document raised that ValueError and not AttestationError; verify_enclave then took
    it for its policy's (reason 'attestation policy is invalid: no message', code bad-policy).
    Now the document is refused as malformed, said through safetext.error."""

    def broken(data):
        raise Unsayable

    monkeypatch.setattr(verify, "_cose", broken)
    e = refused(good, "malformed", ca.root_cert)
    assert e.reason == ("the document could not be verified: Unsayable (its message cannot "
                        "be shown: ValueError)")


def test_random_corruption_never_raises_anything_else(ca, good):
    rng = random.Random(7)
    for _ in range(1500):
        data = bytearray(good)
        choice = rng.random()
        if choice < 0.4:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif choice < 0.7:
            data = data[:rng.randrange(len(data))]
        else:
            i = rng.randrange(len(data))
            data[i:i] = rng.randbytes(rng.randint(1, 16))
        try:
            verify_document(bytes(data), root=ca.root_cert)
        except AttestationError as e:
            assert e.code in CODES


def test_resigned_documents_reach_the_expectation_checks(ca, good):
    # A document signed by the genuine leaf after the nonce changed: only the nonce is wrong.
    doc = resign(ca, good, lambda p: p.update(nonce=b"\x09" * 32))
    refused(doc, "nonce-mismatch", ca.root_cert, nonce=NONCE)


# -- the packaged AWS root -------------------------------------------------------------------


def test_packaged_aws_root_fingerprint():
    root = aws_root()
    der = root.public_bytes(serialization.Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == AWS_ROOT_SHA256
    assert fingerprint(root) == ("64:1A:03:21:A3:E2:44:EF:E4:56:46:31:95:D6:06:31:"
                                 "7E:D7:CD:CC:3C:17:56:E0:98:93:F3:C6:8F:79:BB:5B")
    assert root.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"


@pytest.fixture
def packaged_root(tmp_path, monkeypatch) -> Iterator[Path]:
    """The directory aws_root() reads its PEM from, in place of the installed package."""
    monkeypatch.setattr(verify, "resources", types.SimpleNamespace(files=lambda _: tmp_path))
    aws_root.cache_clear()
    yield tmp_path / verify.ROOT_RESOURCE
    aws_root.cache_clear()  # the next test gets the real one again


def test_a_packaged_root_that_is_not_awss_is_refused(ca, good, packaged_root):
    packaged_root.write_bytes(ca.root_pem)
    with pytest.raises(AttestationError) as info:
        aws_root()
    assert info.value.code == "bad-root"
    assert "does not match the pinned fingerprint" in info.value.reason
    assert "reinstall" in info.value.reason
    # Never falls back to trusting it: a document signed by that CA is refused.
    refused(good, "bad-root", None)
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE, policy=Attestation(True, PINS, 300))
    assert not v.accepted and v.detail == {"code": "bad-root"}


def test_a_packaged_root_that_is_missing_is_refused(packaged_root):
    with pytest.raises(AttestationError) as info:
        aws_root()
    assert info.value.code == "bad-root" and "reinstall" in info.value.reason


def test_the_real_packaged_root_is_accepted(packaged_root):
    real = Path(nsm.__file__).with_name(verify.ROOT_RESOURCE)
    packaged_root.write_bytes(real.read_bytes())
    assert fingerprint(aws_root()).replace(":", "").lower() == AWS_ROOT_SHA256


@pytest.mark.skipif(not SHARED_ROOT.exists(), reason="no ../shared/certs checkout")
def test_packaged_root_is_the_shared_copy():
    packaged = Path(nsm.__file__).with_name("aws-nitro-enclaves-root-g1.pem")
    assert packaged.read_bytes() == SHARED_ROOT.read_bytes()


def test_trusted_root_ignores_the_environment(ca, tmp_path, monkeypatch):
    # Issue 12, item 12: WGVSOCK_ATTESTATION_ROOT used to replace AWS's root in production.
    monkeypatch.setenv("WGVSOCK_ATTESTATION_ROOT", str(ca.write_root(tmp_path)))
    assert trusted_root() == aws_root()
    # Only the profile's attestation.test_root_ca (documented as for tests) names another.
    assert trusted_root(str(ca.write_root(tmp_path))) == ca.root_cert
    with pytest.raises(AttestationError) as info:
        trusted_root(str(tmp_path / "missing.pem"))
    assert info.value.code == "bad-root"
    assert "attestation.test_root_ca" in info.value.reason


def test_verify_enclave_ignores_the_environment_root(ca, good, tmp_path, monkeypatch):
    monkeypatch.setenv("WGVSOCK_ATTESTATION_ROOT", str(ca.write_root(tmp_path)))
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE, policy=Attestation(True, PINS, 300))
    assert not v.accepted and v.detail == {"code": "untrusted-root"}


# -- verify_enclave: the parent's verdict ----------------------------------------------------


PINS = {i: TEST_PCRS[i].hex() for i in (0, 1, 2)}


@pytest.fixture
def test_root(ca, tmp_path) -> str:
    return str(ca.write_root(tmp_path))


def policy(test_root: str, require: bool = True, pcrs: dict | None = None, max_age: int = 300,
           allow_debug: bool = False) -> Attestation:
    """The profile's attestation section, trusting the test CA through test_root_ca."""
    return Attestation(require, PINS if pcrs is None else pcrs, max_age, allow_debug, test_root)


def test_verify_enclave_accepts(ca, good, test_root):
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE, policy=policy(test_root))
    assert v == Verdict(True, attested=True, reason="", detail=v.detail, image_pinned=True)
    assert v.state == "attested"
    assert v.detail is not None
    assert v.detail["module_id"] == MODULE_ID and v.detail["digest"] == "SHA384"
    assert v.detail["pcrs"]["0"] == PINS[0]
    assert isinstance(v.detail["timestamp"], int)
    assert v.detail["debug_mode"] is False


@pytest.mark.parametrize(("doc_args", "pol", "nonce", "key", "code"), [
    ({}, {"pcrs": {0: "ab" * 48}}, NONCE, WG_KEY, "pcr-mismatch"),
    ({"pcrs": DEBUG_PCRS}, {}, NONCE, WG_KEY, "debug-enclave"),
    # Issue 12, item 5: all-zero PCRs are refused even with no PCR pinned.
    ({"pcrs": DEBUG_PCRS}, {"pcrs": {}}, NONCE, WG_KEY, "debug-enclave"),
    ({"pcrs": DEBUG_PCRS}, {"require": False, "pcrs": {}}, NONCE, WG_KEY, "debug-enclave"),
    ({}, {}, b"\x05" * 32, WG_KEY, "nonce-mismatch"),
    ({}, {}, NONCE, b"\x06" * 32, "public-key-mismatch"),
    ({"timestamp_ms": int((time.time() - 900) * 1000)}, {"pcrs": {}}, NONCE,
     WG_KEY, "too-old"),
    ({}, {"require": False, "pcrs": {0: "ab" * 48}}, NONCE, WG_KEY, "pcr-mismatch"),
], ids=["pcr", "debug", "debug-no-pcrs", "debug-not-required", "nonce", "key", "old",
        "not-required-but-presented"])
def test_verify_enclave_refuses(ca, test_root, doc_args, pol, nonce, key, code):
    doc = make_document(ca, nonce=NONCE, public_key=WG_KEY, **doc_args)
    v = verify_enclave(doc, public_key=key, nonce=nonce, policy=policy(test_root, **pol))
    assert not v.accepted and not v.attested
    assert v.detail == {"code": code}
    assert v.reason.startswith("attestation refused: ")


def test_debug_enclave_allowed_is_not_attested(ca, test_root):
    # Issue 12, item 5: allow_debug admits a debug-mode enclave, reported as "debug".
    from wgvsock.roles.parent import attestation_state

    doc = make_document(ca, nonce=NONCE, public_key=WG_KEY, pcrs=DEBUG_PCRS)
    v = verify_enclave(doc, public_key=WG_KEY, nonce=NONCE,
                       policy=policy(test_root, allow_debug=True))
    assert v.accepted and not v.attested
    assert v.detail is not None and v.detail["debug_mode"] is True
    assert attestation_state(v) == "debug"
    good = make_document(ca, nonce=NONCE, public_key=WG_KEY)
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE,
                       policy=policy(test_root, allow_debug=True))
    assert v.attested and attestation_state(v) == "true"
    # allow_debug does not loosen the PCRs of an enclave that is not in debug mode.
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE,
                       policy=policy(test_root, pcrs={0: "ab" * 48}, allow_debug=True))
    assert not v.accepted and v.detail == {"code": "pcr-mismatch"}
    assert attestation_state(Verdict(True)) == "false"


@pytest.mark.parametrize("pcrs", [{}, {1: TEST_PCRS[1].hex(), 2: TEST_PCRS[2].hex()}],
                         ids=["none", "no-pcr0"])
def test_a_genuine_enclave_without_pcr0_pinned_is_not_called_attested(ca, good, test_root,
                                                                       pcrs):
    """With require: false and no PCR0 pinned, any genuine Nitro enclave, running any image,
    passes: it used to be reported "attested" like the pinned image."""
    from wgvsock.roles.parent import attestation_state

    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE,
                       policy=policy(test_root, require=False, pcrs=pcrs))
    assert v.accepted and not v.image_pinned
    assert v.state == "genuine" and attestation_state(v) == "genuine"
    pinned = verify_enclave(good, public_key=WG_KEY, nonce=NONCE,
                            policy=policy(test_root, require=False, pcrs={0: PINS[0]}))
    assert pinned.state == "attested" and attestation_state(pinned) == "true"


def test_expired_leaf_is_refused_live_whatever_max_age(test_root_ca_at):
    # Issue 12, item 11: a document 4 h old whose leaf lived 3 h was valid at its own time;
    # a max_age of a day must not make it acceptable now.
    ca, root = test_root_ca_at
    stamp = time.time() - 4 * 3600
    doc = make_document(ca, nonce=NONCE, public_key=WG_KEY, timestamp_ms=int(stamp * 1000))
    verify_document(doc, root=ca.root_cert, max_age=86400)  # stored-document check: valid
    v = verify_enclave(doc, public_key=WG_KEY, nonce=NONCE,
                       policy=policy(root, max_age=86400))
    assert not v.accepted and v.detail == {"code": "certificate-expired"}
    assert "before now" in v.reason
    with pytest.raises(AttestationError) as info:
        verify_document(doc, root=ca.root_cert, max_age=86400, live=True)
    assert info.value.code == "certificate-expired"


@pytest.fixture
def test_root_ca_at(tmp_path) -> tuple[TestCA, str]:
    """A CA whose leaf was valid from 5 h to 2 h ago."""
    now = datetime.now(UTC)
    ca = make_test_ca(leaf_not_before=now - timedelta(hours=5),
                      leaf_not_after=now - timedelta(hours=2))
    return ca, str(ca.write_root(tmp_path))


def test_live_check_allows_small_clock_skew(ca, tmp_path):
    # A leaf that expired 30 s ago (within MAX_CLOCK_SKEW) still passes a live check; one
    # that expired 2 minutes ago does not.
    now = datetime.now(UTC)
    for seconds, ok in ((30, True), (120, False)):
        leafy = make_test_ca(leaf_not_before=now - timedelta(hours=3),
                             leaf_not_after=now - timedelta(seconds=seconds))
        doc = make_document(leafy, nonce=NONCE, public_key=WG_KEY,
                            timestamp_ms=int((now - timedelta(minutes=10)).timestamp() * 1000))
        if ok:
            verify_document(doc, root=leafy.root_cert, live=True, max_age=3600)
        else:
            with pytest.raises(AttestationError) as info:
                verify_document(doc, root=leafy.root_cert, live=True, max_age=3600)
            assert info.value.code == "certificate-expired"


def test_empty_public_key_is_genuine_but_binds_nothing(ca, test_root):
    # Issue 12, item 13: real 2022 documents carry a 0-byte public_key.
    doc = make_document(ca, nonce=NONCE, public_key=b"")
    assert verify_document(doc, root=ca.root_cert).public_key == b""
    refused(doc, "public-key-empty", ca.root_cert, public_key=WG_KEY)
    v = verify_enclave(doc, public_key=WG_KEY, nonce=NONCE, policy=policy(test_root))
    assert not v.accepted and v.detail == {"code": "public-key-empty"}
    assert "empty (0 bytes)" in v.reason


def test_verify_enclave_with_the_default_root_refuses_test_documents(good):
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE, policy=Attestation(True, {}, 300))
    assert not v.accepted and v.detail == {"code": "untrusted-root"}


def test_verify_enclave_never_raises(ca, test_root, tmp_path):
    for data in (b"", b"\xff" * 10, b"\x00" * (MAX_DOCUMENT + 1)):
        v = verify_enclave(data, public_key=WG_KEY, nonce=NONCE, policy=policy(test_root))
        assert not v.accepted
    bad_policy = policy(test_root, pcrs={0: "zz" * 48})
    good = make_document(ca, nonce=NONCE, public_key=WG_KEY)
    assert not verify_enclave(good, public_key=WG_KEY, nonce=NONCE, policy=bad_policy).accepted
    v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE,
                       policy=policy(str(tmp_path / "missing.pem")))
    assert not v.accepted and v.detail == {"code": "bad-root"}


def test_parent_judge_uses_verify_enclave(ca, test_root):
    from wgvsock.roles.parent import judge

    p = policy(test_root)
    document = make_document(ca, nonce=attested_nonce(NONCE), public_key=WG_KEY)
    assert judge(p, WG_KEY, document, NONCE).attested
    assert not judge(p, WG_KEY, None, NONCE).accepted
    # Asked again later about the same registration (a reload), as of when it was made:
    # the document's age counts from then, not from now.
    made = time.time()
    assert judge(p, WG_KEY, document, NONCE, now=made).accepted
    assert not judge(p, WG_KEY, document, NONCE, now=made + p.max_age + 60).accepted


@pytest.mark.parametrize(("index", "fix"), [
    (0, "a rebuilt enclave image has new PCRs: if this image is meant to run, pin its PCR0 "
        "(`nitro-cli describe-eif --eif-path FILE` prints them) in attestation.pcrs and run "
        "`wgvsock parent reload`"),
    (3, "if its new value is meant, pin it in attestation.pcrs and run `wgvsock parent "
        "reload`"),
])
def test_a_pcr_mismatch_says_what_to_change(ca, test_root, index, fix):
    """Before: "PCR0 is X..., expected Y..." alone, in the log and in `wgvsock status`: an
    operator learnt which value differed, not that a rebuilt image needs its new PCR0 pinned
    and how."""
    from wgvsock.roles.parent import judge

    document = make_document(ca, nonce=attested_nonce(NONCE), public_key=WG_KEY)
    v = judge(policy(test_root, pcrs={**PINS, index: "ab" * 48}), WG_KEY, document, NONCE)
    assert not v.accepted and v.detail == {"code": "pcr-mismatch"}
    assert v.reason.startswith(f"attestation refused: PCR{index} is ")
    assert v.reason.endswith(f", expected abababababababab...: {fix}"), v.reason


def test_the_parent_wants_the_attested_nonce_not_the_challenge(ca, test_root):
    """Before: the enclave had the NSM sign the control challenge itself, a nonce whoever
    answers on the control port chose. Now the document carries attested_nonce(challenge);
    one for the challenge itself (an enclave image of an older wgvsock) is refused, saying
    so."""
    from wgvsock.roles.parent import judge

    p = policy(test_root)
    old = make_document(ca, nonce=NONCE, public_key=WG_KEY)
    v = judge(p, WG_KEY, old, NONCE)
    assert not v.accepted and "nonce is the control challenge itself" in v.reason
    assert "rebuild the enclave image" in v.reason
    other = make_document(ca, nonce=bytes(32), public_key=WG_KEY)
    v = judge(p, WG_KEY, other, NONCE)
    assert not v.accepted and "a replayed document?" in v.reason


# -- the NSM client --------------------------------------------------------------------------


def test_ioctl_number_and_struct():
    assert nsm.NSM_RAW.size == 32  # two struct nsm_iovec {u64 addr; u64 len}
    assert nsm.NSM_IOCTL_RAW == 0xC0200A00  # _IOWR(0x0A, 0, struct nsm_raw)


@pytest.fixture
def fake(ca) -> FakeNSM:
    return FakeNSM(ca)


@pytest.fixture
def device(fake, tmp_path) -> str:
    return str(fake.device(tmp_path))


def test_nsm_attestation(ca, fake, device):
    with NSM(device, ioctl=fake.ioctl) as module:
        document = module.attestation(nonce=NONCE, public_key=WG_KEY, user_data=b"u")
    assert fake.requests == [{"Attestation": {"user_data": b"u", "nonce": NONCE,
                                              "public_key": WG_KEY}}]
    assert fake.ioctl_numbers == [0xC0200A00]
    doc = verify_document(document, root=ca.root_cert, nonce=NONCE, public_key=WG_KEY,
                          pcrs={0: TEST_PCRS[0]}, max_age=60)
    assert doc.user_data == b"u"


def test_nsm_attestation_sends_null_for_absent_fields(fake, device):
    NSM(device, ioctl=fake.ioctl).attestation()
    assert fake.requests == [{"Attestation": {"user_data": None, "nonce": None,
                                              "public_key": None}}]


def test_nsm_describe(fake, device):
    d = NSM(device, ioctl=fake.ioctl).describe_nsm()
    assert fake.requests == ["DescribeNSM"]  # a bare text string, as serde writes unit variants
    assert d.version == (1, 0, 0) and d.module_id == MODULE_ID and d.max_pcrs == 32
    assert d.digest == "SHA384" and d.locked_pcrs == tuple(range(16))


def test_nsm_get_random(fake, device):
    module = NSM(device, ioctl=fake.ioctl)
    random_bytes = module.get_random()
    module.close()
    assert fake.requests == ["GetRandom"]
    assert isinstance(random_bytes, bytes) and len(random_bytes) == 32


@pytest.mark.parametrize(("request_name", "call"), [
    ("Attestation", lambda m: m.attestation(nonce=NONCE)),
    ("DescribeNSM", lambda m: m.describe_nsm()),
    ("GetRandom", lambda m: m.get_random()),
])
def test_nsm_error_answers(fake, device, request_name, call):
    fake.errors[request_name] = "InvalidArgument"
    with pytest.raises(NSMError) as info:
        call(NSM(device, ioctl=fake.ioctl))
    assert info.value.code == "InvalidArgument"
    assert f"refused {request_name}: InvalidArgument (an argument was invalid)" in str(info.value)


def test_nsm_unknown_error_code(fake, device):
    fake.errors["GetRandom"] = "SomethingNew"
    with pytest.raises(NSMError, match=r"SomethingNew \(unknown error code"):
        NSM(device, ioctl=fake.ioctl).get_random()


@pytest.mark.parametrize(("answer", "match"), [
    (b"\xff\xff", "malformed CBOR"),
    (cbor2.dumps({"GetRandom": {"random": b"x"}}), "answered DescribeNSM with 'GetRandom'"),
    (cbor2.dumps("LockPCR"), "not DescribeNSM"),
    (cbor2.dumps({"DescribeNSM": {"module_id": "m"}}), "incomplete"),
])
def test_nsm_bad_answers(fake, device, answer, match):
    fake.raw_answer = answer
    with pytest.raises(NSMError, match=match):
        NSM(device, ioctl=fake.ioctl).describe_nsm()


def test_nsm_attestation_answer_without_document(fake, device):
    fake.raw_answer = cbor2.dumps({"Attestation": {"document": None}})
    with pytest.raises(NSMError, match="no document"):
        NSM(device, ioctl=fake.ioctl).attestation()


def test_nsm_ioctl_failures(fake, device):
    fake.fail_errno = errno.EMSGSIZE
    with pytest.raises(NSMError) as info:
        NSM(device, ioctl=fake.ioctl).get_random()
    assert info.value.code == "InputTooLarge"
    fake.fail_errno = errno.EIO
    with pytest.raises(NSMError, match="ioctl failed"):
        NSM(device, ioctl=fake.ioctl).get_random()


def test_nsm_request_too_large_is_not_sent(fake, device):
    with pytest.raises(NSMError) as info:
        NSM(device, ioctl=fake.ioctl).attestation(user_data=b"\x00" * 5000)
    assert info.value.code == "InputTooLarge" and fake.requests == []


def test_nsm_real_ioctl_on_a_file_that_is_not_the_device(tmp_path):
    # The unpatched path: the kernel refuses the ioctl on a regular file (ENOTTY).
    path = tmp_path / "not-nsm"
    path.touch()
    with pytest.raises(NSMError, match="ioctl failed"):
        NSM(str(path)).get_random()


def test_nsm_device_absent(tmp_path, monkeypatch):
    missing = str(tmp_path / "nsm")
    with pytest.raises(NSMError, match=f"no NSM device at {missing}"):
        NSM(missing).describe_nsm()
    assert nsm_attester(missing) is None
    monkeypatch.setenv("WGVSOCK_NSM_DEVICE", missing)
    assert nsm_attester() is None
    assert NSM().path == missing


def test_nsm_attester(ca, fake, device):
    attest = nsm_attester(device, ioctl=fake.ioctl)
    assert attest is not None
    document = attest(NONCE, WG_KEY)
    verify_document(document, root=ca.root_cert, nonce=NONCE, public_key=WG_KEY)
    fake.errors["Attestation"] = "InternalError"
    with pytest.raises(ControlError, match=r"attestation failed: .*InternalError"):
        attest(NONCE, WG_KEY)


def test_nsm_attester_from_env_with_patched_ioctl(ca, fake, device, monkeypatch, tmp_path):
    # How an end-to-end test wires it: the enclave role calls nsm_attester() with no arguments.
    monkeypatch.setattr(nsm, "system_ioctl", fake.ioctl)
    monkeypatch.setenv("WGVSOCK_NSM_DEVICE", device)
    from wgvsock.roles.enclave import attester

    attest = attester()
    assert attest is not None
    v = verify_enclave(attest(NONCE, WG_KEY), public_key=WG_KEY, nonce=NONCE,
                       policy=policy(str(ca.write_root(tmp_path))))
    assert v.accepted and v.attested


# -- `wgvsock attest` ------------------------------------------------------------------------


@pytest.fixture
def files(ca, good, tmp_path) -> dict[str, str]:
    good_path = tmp_path / "good.cose"
    good_path.write_bytes(good)
    bad_path = tmp_path / "bad.cose"
    bad_path.write_bytes(with_payload(good, lambda p: p.update(nonce=b"\x00" * 32)))
    b64_path = tmp_path / "good.b64"
    b64_path.write_text(base64.b64encode(good).decode() + "\n")
    return {"good": str(good_path), "bad": str(bad_path), "b64": str(b64_path),
            "root": str(ca.write_root(tmp_path))}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = cli.main(["attest", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_cli_verify_good(files, capsys):
    code, out, err = run(["verify", files["good"], "--root", files["root"],
                          "--pcr", f"0={TEST_PCRS[0].hex()}", "--pcr", f"PCR2={TEST_PCRS[2].hex()}",
                          "--nonce", NONCE.hex(), "--public-key",
                          base64.b64encode(WG_KEY).decode(), "--max-age", "300"], capsys)
    assert code == 0, err
    assert f"module:      {MODULE_ID}" in out
    assert "digest:      SHA384" in out
    assert f"PCR0:        {TEST_PCRS[0].hex()}" in out
    assert f"public key:  {base64.b64encode(WG_KEY).decode()} (32 bytes)" in out
    assert f"nonce:       {NONCE.hex()}" in out
    assert "user data:   aGVsbG8= (5 bytes)" in out
    assert "verified:" in out and "PCR0, PCR2, nonce, public key" in out
    assert err == ""


def test_cli_verify_base64_input(files, capsys):
    code, _, err = run(["verify", files["b64"], "--root", files["root"]], capsys)
    assert code == 0, err


def test_cli_verify_bad(files, capsys):
    code, out, err = run(["verify", files["bad"], "--root", files["root"]], capsys)
    assert code == 1
    assert err.startswith("wgvsock attest verify: REFUSED (bad-signature): ")
    assert f"module:      {MODULE_ID}" in out  # what was presented is still shown


def test_cli_verify_expectation_failures(files, capsys):
    code, _, err = run(["verify", files["good"], "--root", files["root"],
                        "--pcr", f"1={'ab' * 48}"], capsys)
    assert code == 1 and "REFUSED (pcr-mismatch): PCR1 is" in err
    code, _, err = run(["verify", files["good"], "--root", files["root"],
                        "--nonce", "00" * 32], capsys)
    assert code == 1 and "(nonce-mismatch)" in err


def test_cli_verify_prints_a_hostile_documents_words_escaped(ca, tmp_path, capsys):
    # Shown to an operator's terminal: a module_id that hides the REFUSED line (\x1b[8m) or
    # writes a line of its own must not do either.
    path = tmp_path / "hostile.cose"
    path.write_bytes(make_document(ca, module_id="i-1\nverified: yes\x1b[8m", nonce=NONCE))
    code, out, err = run(["verify", str(path), "--root", str(ca.write_root(tmp_path)),
                          "--nonce", "00" * 32], capsys)
    assert code == 1 and "REFUSED (nonce-mismatch)" in err
    assert "module:      i-1\\nverified: yes\\x1b[8m" in out
    assert "\x1b" not in out + err and "\nverified: yes" not in out


def test_cli_verify_default_root_is_aws(files, capsys, monkeypatch):
    # The environment cannot swap the root (issue 12, item 12): only --root can.
    monkeypatch.setenv("WGVSOCK_ATTESTATION_ROOT", files["root"])
    code, _, err = run(["verify", files["good"]], capsys)
    assert code == 1 and "(untrusted-root)" in err and "aws.nitro-enclaves" in err


def test_cli_verify_empty_public_key(ca, files, tmp_path, capsys):
    # Issue 12, item 13: genuine documents with a 0-byte public_key verify and show it empty.
    path = tmp_path / "empty-key.cose"
    path.write_bytes(make_document(ca, nonce=NONCE, public_key=b""))
    code, out, err = run(["verify", str(path), "--root", files["root"]], capsys)
    assert code == 0, err
    assert "public key:  (empty, 0 bytes)" in out
    code, out, _ = run(["verify", str(path), "--root", files["root"], "--json"], capsys)
    assert code == 0 and json.loads(out)["document"]["public_key"] == ""
    code, _, err = run(["verify", str(path), "--root", files["root"], "--public-key",
                        base64.b64encode(WG_KEY).decode()], capsys)
    assert code == 1 and "REFUSED (public-key-empty)" in err


def test_cli_verify_at(files, capsys):
    later = (datetime.now(UTC) + timedelta(hours=6)).isoformat()
    code, _, err = run(["verify", files["good"], "--root", files["root"], "--at", later], capsys)
    assert code == 1 and "(certificate-expired)" in err
    code, _, err = run(["verify", files["good"], "--root", files["root"],
                        "--at", str(int(time.time()))], capsys)
    assert code == 0, err


def test_cli_verify_json(files, capsys):
    code, out, _ = run(["verify", files["good"], "--root", files["root"], "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["ok"] is True
    assert data["document"]["module_id"] == MODULE_ID
    assert data["document"]["nonce"] == NONCE.hex()
    assert data["document"]["pcrs"]["0"] == TEST_PCRS[0].hex()
    assert [c["role"] for c in data["document"]["certificates"]] == \
        ["leaf", "cabundle[0]", "cabundle[1]"]
    code, out, _ = run(["verify", files["bad"], "--root", files["root"], "--json"], capsys)
    data = json.loads(out)
    assert code == 1 and data["ok"] is False and data["code"] == "bad-signature"
    assert data["reason"] and data["document"]["module_id"] == MODULE_ID


def test_cli_verify_garbage_and_usage_errors(files, tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(300))
    code, out, err = run(["verify", str(junk), "--root", files["root"], "--json"], capsys)
    assert code == 1 and json.loads(out)["document"] is None
    for argv in (["verify", str(tmp_path / "missing")],
                 ["verify", files["good"], "--pcr", "0=abc"],
                 ["verify", files["good"], "--pcr", "x=" + "00" * 48],
                 ["verify", files["good"], "--nonce", "xyz"],
                 ["verify", files["good"], "--public-key", "!!"],
                 ["verify", files["good"], "--at", "next tuesday"],
                 ["verify", files["good"], "--root", str(junk)],
                 ["verify"], ["frobnicate"], []):
        code, _, err = run(argv, capsys)
        assert code == 2, argv
        assert err


@pytest.mark.timeout(20)
def test_cli_inputs_that_are_no_regular_file_are_refused_at_once(ca, files, tmp_path, capsys):
    """A FIFO given as a document, PCR input, root or test root CA blocked in open()."""
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    said = "is a FIFO (named pipe), not a regular file (give - to read standard input)"
    for argv, what in ((["verify", str(fifo)], "document"),
                       (["verify", files["good"], "--root", str(fifo)], "--root"),
                       (["pcrs", str(fifo)], "input")):
        code, _, err = run(argv, capsys)
        assert (code, err.strip()) == (2, f"wgvsock attest {argv[0]}: {what} {fifo}: {said}")
    with pytest.raises(AttestationError, match="cannot be read: is a FIFO"):
        trusted_root(str(fifo))


_MEASUREMENTS = json.dumps({"Measurements": {
    "HashAlgorithm": "Sha384 { ... }",
    "PCR0": TEST_PCRS[0].hex(), "PCR1": TEST_PCRS[1].hex(), "PCR2": TEST_PCRS[2].hex()}},
    indent=2)
BUILD_OUTPUT = f"""Start building the Enclave Image...
Using the locally available Docker image...
Enclave Image successfully created.
{_MEASUREMENTS}
"""


def test_cli_pcrs_from_build_output(tmp_path, capsys):
    path = tmp_path / "build.txt"
    path.write_text(BUILD_OUTPUT)
    code, out, err = run(["pcrs", str(path)], capsys)
    assert code == 0, err
    assert out.splitlines()[:3] == ["attestation:", "  require: true", "  pcrs:"]
    profile = parse_profile("name: a\n" + out)
    assert profile.attestation == Attestation(True, PINS, 300)


def test_cli_pcrs_from_describe_eif_json_argument(capsys):
    described = {"EifVersion": 4, "Measurements": {
        "HashAlgorithm": "Sha384 { ... }", "PCR0": TEST_PCRS[0].hex().upper(),
        "PCR1": TEST_PCRS[1].hex(), "PCR2": TEST_PCRS[2].hex(), "PCR8": TEST_PCRS[3].hex()},
        "IsSigned": True}
    code, out, _ = run(["pcrs", json.dumps(described)], capsys)
    assert code == 0
    assert parse_profile("name: a\n" + out).attestation.pcrs == {**PINS, 8: TEST_PCRS[3].hex()}


def test_attest_verify_then_pcrs_round_trip(ca, files, tmp_path, capsys):
    # The PCRs `attest pcrs` prints are exactly what `attest verify --pcr` then accepts.
    path = tmp_path / "build.txt"
    path.write_text(BUILD_OUTPUT)
    _, out, _ = run(["pcrs", str(path)], capsys)
    pins = parse_profile("name: a\n" + out).attestation.pcrs
    argv = ["verify", files["good"], "--root", files["root"]]
    for i, v in pins.items():
        argv += ["--pcr", f"{i}={v}"]
    assert run(argv, capsys)[0] == 0


def test_cli_pcrs_errors(tmp_path, capsys):
    eif = tmp_path / "image.eif"
    eif.write_bytes(b".eif\x00\x04" + os.urandom(64))
    code, _, err = run(["pcrs", str(eif)], capsys)
    assert code == 2 and "nitro-cli describe-eif" in err
    sha256 = BUILD_OUTPUT.replace("Sha384", "Sha256")
    code, _, err = run(["pcrs", sha256], capsys)
    assert code == 2 and "SHA-384" in err
    code, _, err = run(["pcrs", '{"Measurements": {}}'], capsys)
    assert code == 2 and "no Measurements" in err
    code, _, err = run(["pcrs", '{"Measurements": {"PCR0": "abc"}}'], capsys)
    assert code == 2 and "PCR0" in err
    code, _, err = run(["pcrs", str(tmp_path / "missing.json")], capsys)
    assert code == 2


@pytest.mark.parametrize("index", ["\u00b2", "\u0660", "\uff10", "1" * 5000])
def test_cli_a_pcr_index_of_other_digits_is_a_usage_error(index, files, capsys):
    # str.isdigit() takes them all; int() refused superscript two and 5000 digits (a
    # traceback) and quietly read the Arabic-Indic and fullwidth zeros as 0.
    code, out, err = run(["verify", files["good"], "--pcr", f"{index}={'00' * 48}"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("wgvsock attest verify: --pcr ") and "N in 0..31" in err
    measurements = json.dumps({"Measurements": {"HashAlgorithm": "Sha384 { ... }",
                                                f"PCR{index}": TEST_PCRS[0].hex()}})
    code, out, err = run(["pcrs", measurements], capsys)
    assert (code, out) == (2, "")
    assert err.startswith(f"wgvsock attest pcrs: PCR{index[:20]}") and "not a PCR" in err


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-inf", "0"])
def test_cli_max_age_must_be_a_finite_number_of_seconds(value, files, capsys):
    # NaN compared false with every age, so --max-age nan let a document of any age through
    # and printed "age <= nan s" among what was verified.
    code, out, err = run(["verify", files["good"], "--root", files["root"],
                          f"--max-age={value}"], capsys)
    assert (code, out) == (2, "")
    assert "--max-age" in err and "seconds" in err


@pytest.mark.parametrize("command", ["verify", "pcrs"])
def test_cli_input_larger_than_any_document_is_refused_unread(command, tmp_path, capsys,
                                                              monkeypatch):
    # Read whole before: /dev/zero (or a disk image given by mistake) ate the memory.
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(attest_cli.MAX_INPUT + 1)
    code, out, err = run([command, str(big)], capsys)
    assert (code, out) == (2, "")
    assert f"{big}: larger than 1 MiB" in err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(
        b"{" * (attest_cli.MAX_INPUT + 1)))))
    code, out, err = run([command, "-"], capsys)
    assert (code, out) == (2, "")
    assert "-: larger than 1 MiB" in err


def test_attest_main_is_usable_directly(files, capsys):
    assert attest_cli.main(["verify", files["good"], "--root", files["root"]]) == 0
    capsys.readouterr()


def test_sign1_helper_matches_the_verifier(ca):
    # The fixture's signer and the verifier agree on the Sig_structure (guards both).
    protected = cbor2.dumps({1: -35})
    payload = cbor2.dumps({"x": 1})
    assert len(sign1(protected, payload, ca.leaf_key)) == 96


def test_huge_integers_in_a_document_are_refused_as_malformed_not_raised() -> None:
    """An int of more than 4300 digits cannot be formatted (Python's int-to-str limit): the
    error message itself raised ValueError out of the public decode_document (review)."""
    from wgvsock.attestation.verify import AttestationError, decode_document

    huge = int.from_bytes(b"\xff" * 2000, "big")
    payload = {"module_id": "m", "digest": "SHA384", "timestamp": huge,
               "pcrs": {0: b"\0" * 48}, "certificate": b"x", "cabundle": [b"x"]}
    for protected, body in (({1: -35}, payload), ({1: huge}, payload),
                            ({1: -35}, {**payload, "timestamp": 1, "pcrs": {huge: b"\0" * 48}})):
        doc = cbor2.dumps([cbor2.dumps(protected), {}, cbor2.dumps(body), b"\0" * 96])
        with pytest.raises(AttestationError, match="tag 2 ") as info:
            decode_document(doc)
        assert info.value.code == "malformed"


# -- genuine AWS documents -------------------------------------------------------------------


@pytest.mark.parametrize("year", [2022, 2026])
def test_genuine_aws_documents_verify_at_their_own_time(year):
    doc = verify_document(genuine(year))
    assert doc.digest == "SHA384" and len(doc.cabundle) == 4 and not doc.debug_mode
    assert doc.cabundle[0] == aws_root().public_bytes(serialization.Encoding.DER)
    # Long expired now, which a live check says.
    refused(genuine(year), "certificate-expired", None, live=True)


# -- hostile CBOR: bounded work before any signature is checked ------------------------------


def _head(major: int, n: int) -> bytes:
    """A CBOR item head: major type and argument, shortest form."""
    if n < 24:
        return bytes([major << 5 | n])
    for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | ai]) + n.to_bytes(size, "big")
    raise ValueError(n)


def shared_dag(n: int) -> bytes:
    """A_0 = 28([0]), A_k = 28([A_k-1, 29(A_k-1)]): ~4n bytes of CBOR value sharing that
    decode to a DAG of 2^n paths, which hashing (as a map key) or repr() walks in full."""
    out = b"\xd8\x1c\x82" * n + b"\xd8\x1c\x81\x00"
    for k in range(1, n + 1):
        out += b"\xd8\x1d" + _head(0, n - k + 1)
    return out


def raw_payload(ca: TestCA, replace: dict[str, bytes] | None = None,
                extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    """A payload encoded field by field, so that fields can be raw CBOR cbor2 would not
    write: `replace` gives a field's encoded value, `extra` more encoded (key, value) pairs."""
    replace = replace or {}
    items = [(cbor2.dumps(k), replace.get(k, cbor2.dumps(v)))
             for k, v in make_payload(ca, nonce=NONCE, public_key=WG_KEY).items()]
    items += extra or []
    return _head(5, len(items)) + b"".join(k + v for k, v in items)


def stringref_bundle(document: bytes, copies: int) -> bytes:
    """The document with its root repeated `copies` times at the head of cabundle, written
    with CBOR string references (tags 256/25) so each copy costs a few bytes."""
    protected, unprotected, payload, signature = cbor2.loads(document)
    p = cbor2.loads(payload)
    p["cabundle"] = [p["cabundle"][0]] * copies + p["cabundle"][1:]
    payload = cbor2.dumps(p, string_referencing=True)
    return cbor2.dumps([protected, unprotected, payload, signature])


def verify_in_a_subprocess(document: bytes, timeout: float = 30.0) -> str:
    """verify_document (AWS root) in a child process; its refusal code. A decoder that runs
    away holds the GIL, so no thread could stop it: the child is killed at `timeout` and the
    test fails (subprocess.TimeoutExpired) instead of hanging the run."""
    code = ("import sys\n"
            "from wgvsock.attestation import AttestationError, verify_document\n"
            "try:\n"
            "    verify_document(sys.stdin.buffer.read())\n"
            "except AttestationError as e:\n"
            "    print(e.code, e.reason)\n"
            "else:\n"
            "    print('accepted')\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-c", code], input=document, capture_output=True,
                          timeout=timeout, env=env, check=True, cwd=root)
    return done.stdout.decode().strip()


@pytest.mark.parametrize("name", ["outer-map-key", "payload-key", "digest", "timestamp",
                                  "protected-alg", "stringref-cabundle"])
def test_cbor_value_sharing_and_string_references_are_refused_at_once(ca, name):
    """Review finding: a 435-byte document froze the parent (exponential hashing or repr()
    of a value-sharing DAG, in C, GIL held) before any signature was checked; string
    references repeated a certificate thousands of times for a few bytes each."""
    dag = shared_dag(64)
    if name == "outer-map-key":  # [h'', {DAG: 0}, h'', h''], the reviewer's 435 bytes
        doc = b"\x84\x40\xa1" + dag + b"\x00\x40\x40"
    elif name == "payload-key":
        doc = make_document(ca, payload_bytes=raw_payload(ca, extra=[(dag, b"\x00")]))
    elif name in ("digest", "timestamp"):
        doc = make_document(ca, payload_bytes=raw_payload(ca, replace={name: dag}))
    elif name == "protected-alg":
        _, _, payload, signature = cbor2.loads(make_document(ca))
        doc = cbor2.dumps([b"\xa1\x01" + dag, {}, payload, signature])
    else:  # a genuine document, its real root 3000 times over: ~4 s of signature checks
        doc = stringref_bundle(genuine(2022), 3000)
        assert len(doc) < MAX_DOCUMENT
    started = time.monotonic()
    answer = verify_in_a_subprocess(doc)
    assert answer.startswith("malformed ") and "tag" in answer, answer
    assert time.monotonic() - started < 20


@pytest.mark.parametrize(("data", "what"), [
    (cbor2.dumps(cbor2.CBORTag(18, cbor2.CBORTag(18, [b"", {}, b"", b""]))), "18"),
    (cbor2.dumps([cbor2.CBORTag(18, b""), {}, b"", b""]), "18"),
    (b"\xd9\xd9\xf7" + cbor2.dumps([b"", {}, b"", b""]), "55799"),  # self-described CBOR
    (b"\xd8\x12" + cbor2.dumps([b"", {}, b"", b""]), "18"),  # 18, not in its shortest form
], ids=["18-twice", "18-inside", "self-described", "18-long-form"])
def test_no_tag_but_one_leading_18(ca, data, what):
    e = refused(data, "malformed", ca.root_cert)
    assert f"tag {what}" in e.reason


@pytest.mark.parametrize("value", [
    cbor2.CBORTag(1, 1700000000), 1 << 70, cbor2.CBORTag(4, [-2, 27315])],
    ids=["epoch-time", "bignum", "decimal"])
def test_a_tagged_payload_field_is_refused(ca, value):
    doc = make_document(ca, overrides={"timestamp": value})
    e = refused(doc, "malformed", ca.root_cert)
    assert "the payload" in e.reason and "tag" in e.reason


def test_duplicate_map_keys_are_refused(ca):
    """Review finding: a payload with two nonces was accepted, the last one winning."""
    doc = make_document(ca, payload_bytes=raw_payload(
        ca, extra=[(cbor2.dumps("nonce"), cbor2.dumps(b"\x09" * 32))]))
    e = refused(doc, "malformed", ca.root_cert)
    assert "the payload" in e.reason and "uplicate" in e.reason
    _, _, payload, signature = cbor2.loads(make_document(ca))
    twice = b"\xa2\x01\x38\x22\x01\x38\x22"  # {1: -35, 1: -35}
    refused(cbor2.dumps([twice, {}, payload, signature]), "malformed", ca.root_cert)


def test_nesting_is_limited(ca):
    def nested(depth: int) -> bytes:
        return b"\x81" * depth + b"\x00"

    ok = make_document(ca, payload_bytes=raw_payload(
        ca, extra=[(cbor2.dumps("extra"), nested(6))]))
    verify_document(ok, root=ca.root_cert)
    deep = make_document(ca, payload_bytes=raw_payload(
        ca, extra=[(cbor2.dumps("extra"), nested(9))]))
    e = refused(deep, "malformed", ca.root_cert)
    assert "nest" in e.reason


def test_indefinite_lengths_are_read_like_definite_ones(ca):
    # AWS's NSM writes the payload as an indefinite-length map now (the 2026 document).
    payload = make_payload(ca, nonce=NONCE, public_key=WG_KEY)
    body = b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v) for k, v in payload.items())
    chunked = b"\x5f" + cbor2.dumps(NONCE[:10]) + cbor2.dumps(NONCE[10:]) + b"\xff"
    body = body.replace(cbor2.dumps(NONCE), chunked) + b"\xff"
    doc = make_document(ca, payload_bytes=body)
    assert verify_document(doc, root=ca.root_cert, nonce=NONCE).nonce == NONCE
    for broken in (body[:-1], body + b"\xff", b"\xbf\x01\xff"):
        refused(make_document(ca, payload_bytes=broken), "malformed", ca.root_cert)


# -- the CA bundle: bounded, no repeats, cheap checks before signatures ----------------------


def test_cabundle_is_capped(ca):
    doc = make_document(ca, overrides={"cabundle": [ca.cabundle[0]] * 8 + [ca.cabundle[1]]})
    e = refused(doc, "invalid-field", ca.root_cert)
    assert "cabundle" in e.reason and "8" in e.reason


@pytest.mark.parametrize("bundle", [
    lambda ca: [ca.cabundle[0], ca.cabundle[0], ca.cabundle[1]],
    lambda ca: [ca.cabundle[0], ca.cabundle[1], ca.cabundle[1]],
    lambda ca: [*ca.cabundle, ca.leaf_der],
], ids=["root-twice", "intermediate-twice", "leaf-in-bundle"])
def test_a_certificate_twice_in_the_chain_is_refused(ca, bundle):
    """Review finding: [root, root, intermediate] verified (root <- root is a valid link)."""
    e = refused(make_document(ca, overrides={"cabundle": bundle(ca)}), "bad-chain",
                ca.root_cert)
    assert "twice" in e.reason


def test_validity_is_checked_before_any_chain_signature(ca, other_ca):
    """A bundle that does not chain and was not valid at the time asked about is refused for
    its dates: those cost nothing, each chain link costs an ECDSA verification."""
    doc = make_document(other_ca, overrides={"cabundle": ca.cabundle})
    refused(doc, "bad-chain", ca.root_cert)
    refused(doc, "certificate-expired", ca.root_cert, at=datetime.now(UTC) + timedelta(days=400))


# -- chain rules: ECDSA P-384 with SHA-384 throughout, no unknown critical extension ---------


def _reissued_intermediate(ca: TestCA, *, key=None, hash_alg=None, extension=None) -> TestCA:
    """The CA with its intermediate issued again (by the same root, same name) with another
    key, hash or an extra extension, and a new leaf under it."""
    from cryptography.hazmat.primitives.asymmetric import ec as ec_
    from cryptography.x509.oid import NameOID

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wgvsock tests"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    now = datetime.now(UTC)
    inter_key = key or ec_.generate_private_key(ec_.SECP384R1())
    b = (x509.CertificateBuilder().subject_name(ca.intermediate_cert.subject)
         .issuer_name(ca.root_cert.subject).public_key(inter_key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True))
    if extension is not None:
        b = b.add_extension(extension, critical=True)
    inter = b.sign(ca.root_key, hash_alg or hashes.SHA384())
    leaf_key = ec_.generate_private_key(ec_.SECP384R1())
    leaf = (x509.CertificateBuilder().subject_name(name("reissued leaf"))
            .issuer_name(inter.subject).public_key(leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(inter_key, hashes.SHA384() if isinstance(inter_key, ec_.EllipticCurvePrivateKey)
                  else hashes.SHA256()))
    return TestCA(ca.root_key, ca.root_cert, inter_key, inter, leaf_key, leaf)


@pytest.mark.parametrize(("variant", "code", "words"), [
    ({"hash_alg": hashes.SHA256()}, "bad-chain", "SHA-384"),
    ({"key": "rsa"}, "bad-certificate", "P-384"),
    ({"key": "p256"}, "bad-certificate", "P-384"),
    ({"extension": x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"),
                                              b"\x05\x00")},
     "bad-certificate", "critical extension"),
    ({"extension": x509.NameConstraints(permitted_subtrees=[x509.DNSName("example.com")],
                                        excluded_subtrees=None)},
     "bad-certificate", "critical extension"),
], ids=["sha256", "rsa-intermediate", "p256-intermediate", "unknown-critical",
        "name-constraints"])
def test_chain_rules_beyond_signatures(ca, variant, code, words):
    from cryptography.hazmat.primitives.asymmetric import ec as ec_
    from cryptography.hazmat.primitives.asymmetric import rsa

    if variant.get("key") == "rsa":
        variant = {"key": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
    elif variant.get("key") == "p256":
        variant = {"key": ec_.generate_private_key(ec_.SECP256R1())}
    other = _reissued_intermediate(ca, **variant)
    doc = make_document(other, nonce=NONCE, public_key=WG_KEY)
    e = refused(doc, code, ca.root_cert)
    assert words in e.reason and "intermediate" in e.reason, e.reason


def test_reissued_intermediate_helper_makes_a_valid_chain(ca):
    # Guards the test above: unchanged, the reissued chain verifies.
    doc = make_document(_reissued_intermediate(ca), nonce=NONCE, public_key=WG_KEY)
    verify_document(doc, root=ca.root_cert, nonce=NONCE, public_key=WG_KEY)


# -- debug mode: only the image's PCRs are zero ----------------------------------------------


def test_debug_mode_still_compares_the_pcrs_it_does_not_zero(ca, test_root):
    """Review finding: with allow_debug every pinned PCR was skipped, but debug mode zeroes
    only PCR0-2 (and PCR8): a pinned PCR3 (IAM role) or PCR4 (instance) was ignored."""
    debug = {**DEBUG_PCRS, 3: TEST_PCRS[3], 4: TEST_PCRS[4]}
    doc = make_document(ca, nonce=NONCE, public_key=WG_KEY, pcrs=debug)
    for pins, ok in (({**PINS, 3: TEST_PCRS[3].hex()}, True),
                     ({**PINS, 4: TEST_PCRS[4].hex(), 8: "ab" * 48}, True),
                     ({**PINS, 3: "ab" * 48}, False),
                     ({**PINS, 4: "ab" * 48}, False),
                     ({**PINS, 20: "ab" * 48}, False)):
        v = verify_enclave(doc, public_key=WG_KEY, nonce=NONCE,
                           policy=policy(test_root, pcrs=pins, allow_debug=True))
        assert v.accepted is ok, (pins, v.reason)
        assert v.accepted or v.detail == {"code": "pcr-mismatch"}
        assert not v.attested


# -- attestation.test_root_ca ----------------------------------------------------------------


def test_the_test_root_path_stays_on_the_parent(ca, good, tmp_path, caplog):
    """The refusal reason goes to the registering peer: it says that the test root cannot be
    read, not where it is; the path is logged on the parent."""
    where = str(tmp_path / "secret-place" / "root.pem")
    with caplog.at_level(logging.WARNING, logger="wgvsock.attestation"):
        v = verify_enclave(good, public_key=WG_KEY, nonce=NONCE, policy=policy(where))
    assert not v.accepted and v.detail == {"code": "bad-root"}
    assert "secret-place" not in v.reason and "test_root_ca" in v.reason
    assert any("secret-place" in r.getMessage() for r in caplog.records)
