"""Verifying Nitro Enclave attestation documents.

A document is a COSE_Sign1 (RFC 8152), tagged (CBOR tag 18) or not, whose payload is the CBOR
map AWS documents in aws-nitro-enclaves-nsm-api/docs/attestation_process.md. It is trusted only
after, in this order:

1. its CBOR is plain data: walked before it is decoded, it holds no tag but COSE_Sign1's
   leading 18 (no value sharing, string references, bignums or dates), nests at most 8 deep,
   and no map has a key twice;
2. its structure and every payload field check out (sizes and types as AWS specifies them;
   at most 8 certificates in the CA bundle);
3. the CA bundle starts with the pinned root (by exact DER), no certificate is in the chain
   twice, every one holds an ECDSA P-384 key, is signed with ECDSA and SHA-384 and carries no
   critical extension but basicConstraints and keyUsage;
4. every certificate of the chain was valid at the document's own timestamp (or a time given)
   and, when verifying live (the parent's verdict), is valid now too, within MAX_CLOCK_SKEW;
5. every link of leaf <- cabundle[-1] <- ... <- cabundle[0] is signed by the next one, whose
   certificate is a CA allowed to issue it (checks 1-4 cost no signature verification);
6. the ES384 signature over the COSE Sig_structure verifies with the leaf certificate's key;
7. the caller's expectations hold: debug mode, PCRs (in debug mode all but the zeroed 0-2
   and 8), nonce, public key, maximum age.

Every failure is an AttestationError with a stable `code` and a human `reason`; hostile input
(malformed or oversized CBOR, wrong types, broken certificates) never raises anything else.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from ..conn.bind import RateLimitedLog
from ..regular import read_regular
from ..safetext import error, prose, quote
from ..services.control import Verdict

log = logging.getLogger("wgvsock.attestation")

# The NSM hands documents back in a 0x3000-byte buffer (real ones are ~4.5 KB), and AWS caps
# the payload at 16 KiB; anything beyond this is not a document and is refused before any CBOR
# is decoded.
MAX_DOCUMENT = 16 * 1024
COSE_SIGN1_TAG = 18
ES384 = -35
ROOT_RESOURCE = "aws-nitro-enclaves-root-g1.pem"
# SHA-256 of the DER of AWS_NitroEnclaves_Root-G1, as AWS publishes it.
AWS_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
# A document dated this far past the verifier's clock means one of the two clocks is wrong.
MAX_CLOCK_SKEW = 60.0
# Documents come from anyone who reaches the control port, on every connection they open.
_unexpected_log = RateLimitedLog(10.0, logger=log, burst=5)

# Field limits from AWS's specification. Its prose says 512 bytes for user_data and nonce while
# its CDDL says 1024; the looser one is used so that no genuine document is refused.
_CERT_MAX = 1024
# AWS's bundles hold the root and 3 intermediates (regional, zonal, instance); the spec sets no
# bound, but each entry beyond the root costs an ECDSA verification.
_CABUNDLE_MAX = 8
_OPTIONAL_MAX = 1024
_PCR_SIZES = (32, 48, 64)
_PCR_COUNT = 32
# The PCRs Nitro reports as zeros for an enclave started with --debug-mode.
_DEBUG_ZEROED = frozenset({0, 1, 2, 8})

# Stable codes, one per distinct way a document can be refused (tests and --json rely on them).
CODES = (
    "too-large", "malformed", "unsupported-algorithm", "missing-field", "invalid-field",
    "bad-certificate", "untrusted-root", "bad-chain", "certificate-expired",
    "certificate-not-yet-valid", "bad-signature", "debug-enclave", "pcr-mismatch",
    "nonce-mismatch", "public-key-mismatch", "too-old", "from-the-future", "bad-root",
    "public-key-empty",
)


class AttestationError(Exception):
    """A document was refused. `code` is one of CODES; `document` is the decoded (unverified)
    document when decoding got that far, so tools can still show what was presented."""

    def __init__(self, code: str, reason: str, document: Document | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.document = document


@dataclass(frozen=True)
class Document:
    """The payload of an attestation document. Unverified unless verify_document returned it."""

    module_id: str
    digest: str
    timestamp: int  # milliseconds since the Unix epoch, UTC
    pcrs: dict[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def time(self) -> datetime:
        return datetime.fromtimestamp(self.timestamp / 1000, UTC)

    @property
    def debug_mode(self) -> bool:
        """Whether this looks like a debug-mode enclave: Nitro reports zeros for the image
        measurements (PCR0-2) of an enclave started with --debug-mode."""
        image = [self.pcrs[i] for i in (0, 1, 2) if i in self.pcrs] or list(self.pcrs.values())
        return all(not any(v) for v in image)

    def pcrs_hex(self) -> dict[int, str]:
        return {i: v.hex() for i, v in sorted(self.pcrs.items())}

    def summary(self) -> dict[str, Any]:
        """What the parent records about an accepted enclave."""
        return {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp,
            "time": iso_time(self.time),
            "pcrs": {str(i): v for i, v in self.pcrs_hex().items()},
            "debug_mode": self.debug_mode,
        }

    def to_json(self) -> dict[str, Any]:
        """Everything in the document, JSON-friendly (bytes as hex or base64)."""
        certs = []
        for role, der in [("leaf", self.certificate),
                          *((f"cabundle[{i}]", c) for i, c in enumerate(self.cabundle))]:
            entry: dict[str, Any] = {"role": role, "sha256": hashlib.sha256(der).hexdigest()}
            try:
                cert = x509.load_der_x509_certificate(der)
                entry.update(subject=cert.subject.rfc4514_string(),
                             not_before=iso_time(cert.not_valid_before_utc),
                             not_after=iso_time(cert.not_valid_after_utc))
            except Exception:  # shown as unparsable; verification says why
                entry["subject"] = None
            certs.append(entry)
        return {
            **self.summary(),
            "public_key": _b64(self.public_key),
            "nonce": self.nonce.hex() if self.nonce is not None else None,
            "user_data": _b64(self.user_data),
            "certificates": certs,
        }


def _b64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode() if data is not None else None


def iso_time(t: datetime) -> str:
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _name(cert: x509.Certificate) -> str:
    # The document's own certificates name themselves: their subject goes into reasons that
    # are logged and sent back, so it is escaped (rfc4514_string lets line breaks through).
    return prose(cert.subject.rfc4514_string(), 200) or "(empty subject)"


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER, in the colon form AWS and openssl print."""
    digest = cert.fingerprint(hashes.SHA256()).hex().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


# -- the trusted root ------------------------------------------------------------------------


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes; AttestationError("bad-root") otherwise."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as e:
        raise AttestationError("bad-root", f"the trusted root is not a certificate: {e}") from None


@functools.cache
def aws_root() -> x509.Certificate:
    """AWS Nitro Enclaves Root G1, shipped inside the package (never fetched at run time),
    and refused unless it is the one AWS publishes (AWS_ROOT_SHA256)."""
    try:
        data = resources.files(__package__).joinpath(ROOT_RESOURCE).read_bytes()
    except OSError as e:
        raise AttestationError("bad-root", f"the packaged AWS root {ROOT_RESOURCE} cannot be "
                                           f"read ({e.strerror or e}); reinstall wgvsock") from None
    root = load_certificate(data)
    # Whoever can write the installed package could otherwise make any CA "AWS".
    digest = hashlib.sha256(root.public_bytes(serialization.Encoding.DER)).hexdigest()
    if digest != AWS_ROOT_SHA256:
        raise AttestationError("bad-root", f"the packaged AWS root {ROOT_RESOURCE} "
                                           f"('{_name(root)}', SHA-256 {digest}) does not match "
                                           f"the pinned fingerprint {AWS_ROOT_SHA256}; the "
                                           "package was altered or damaged: reinstall wgvsock")
    return root


def trusted_root(test_root_ca: str | None = None) -> x509.Certificate:
    """The root the parent pins: AWS's, unless the profile's attestation.test_root_ca names a
    PEM file, which exists so tests can sign documents with their own CA. Nothing in the
    environment can change it: a root swapped that way would let anyone on the host forge
    "attested" enclaves."""
    if not test_root_ca:
        return aws_root()
    try:
        data = read_regular(test_root_ca, 64 * 1024)
    except OSError as e:
        # The reason goes to the registering peer: where the root lives stays in the log.
        log.error("attestation: attestation.test_root_ca %s cannot be read: %s", test_root_ca,
                  e.strerror or e)
        raise AttestationError("bad-root", "the test root CA (attestation.test_root_ca) "
                                           f"cannot be read: {e.strerror or 'error'}") from None
    log.warning("attestation: trusting the test root %s instead of AWS's "
                "(attestation.test_root_ca; for tests only)", test_root_ca)
    return load_certificate(data)


def _as_certificate(root: x509.Certificate | bytes | None) -> x509.Certificate:
    if root is None:
        return aws_root()
    if isinstance(root, x509.Certificate):
        return root
    return load_certificate(bytes(root))


# -- decoding --------------------------------------------------------------------------------


# What a document's CBOR may contain. AWS documents use no tag but COSE_Sign1's leading 18 and
# nest 3 levels deep; cbor2 would otherwise decode every tag it knows, value sharing (28/29:
# a few hundred bytes that decode to 2^64 paths, which hashing a map key or repr() walks in
# full, in C, with the GIL held) and string references (256/25: a certificate repeated for
# 2 bytes a copy) among them, before any signature is checked.
_MAX_DEPTH = 8
_TAG_18 = 0xD2  # tag 18 in its one-byte head, as AWS writes it
_INDEFINITE = -1  # stack marks: an indefinite-length array or map, a chunked byte or text
_CHUNKS = {2: -2, 3: -3}  # string (its chunks must be definite strings of its own type)


def _scan(data: bytes, what: str, tag18: bool = False) -> None:
    """Walk the first CBOR item of `data` without decoding it, and refuse it (malformed) if it
    holds any tag (but a leading 18 where `tag18`), nests deeper than _MAX_DEPTH or is cut
    short. One step per item head: what passes decodes to plain values, linear in size."""
    def refuse(why: str) -> AttestationError:
        return AttestationError("malformed", f"{what} {why}")

    pos, end = 0, len(data)
    if tag18 and data[:1] == bytes([_TAG_18]):
        pos = 1
    stack: list[int] = []  # per open container: items still to come, or a mark above
    while True:
        if pos >= end:
            raise refuse("ends inside a CBOR item")
        start, head = pos, data[pos]
        major, info = head >> 5, head & 31
        pos += 1
        if head == 0xFF:  # "break": closes the innermost indefinite-length item
            if not stack or stack[-1] > 0:
                raise refuse("has a CBOR break outside an indefinite-length item")
            stack.pop()
        else:
            if info < 24:
                arg = info
            elif info < 28:
                size = 1 << (info - 24)
                if pos + size > end:
                    raise refuse("ends inside a CBOR item")
                arg = int.from_bytes(data[pos:pos + size], "big")
                pos += size
            elif info == 31 and major in (2, 3, 4, 5):
                arg = _INDEFINITE
            else:
                raise refuse(f"has a CBOR item head that CBOR does not define (0x{head:02x})")
            if stack and stack[-1] < _INDEFINITE and (stack[-1] != _CHUNKS.get(major)
                                                      or arg == _INDEFINITE):
                raise refuse("has a chunked CBOR string with a chunk of another kind")
            if major == 6:
                raise refuse(f"has CBOR tag {arg} (at byte {start}); attestation documents "
                             "use no tag but COSE_Sign1's leading 18")
            if major in (2, 3) and arg != _INDEFINITE:  # a string: skipped
                if pos + arg > end:
                    raise refuse("ends inside a CBOR item")
                pos += arg
            elif arg == _INDEFINITE or (major in (4, 5) and arg):  # a container opens
                if len(stack) >= _MAX_DEPTH:
                    raise refuse(f"nests CBOR items more than {_MAX_DEPTH} deep")
                if arg == _INDEFINITE:
                    stack.append(_CHUNKS.get(major, _INDEFINITE))
                else:
                    stack.append(arg * 2 if major == 5 else arg)
                continue  # complete once its last item is
        # An item is complete: count it in the containers it completes.
        while stack and stack[-1] > 0:
            stack[-1] -= 1
            if stack[-1]:
                break
            stack.pop()
        if not stack:
            return


def _cbor(data: bytes, what: str, tag18: bool = False) -> Any:
    _scan(data, what, tag18)
    fp = io.BytesIO(data)
    try:
        value = cbor2.CBORDecoder(fp, max_depth=_MAX_DEPTH + 1,
                                  allow_duplicate_keys=False).decode()
    except Exception as e:  # cbor2 raises decode, value, overflow and recursion errors alike
        raise AttestationError("malformed", f"{what} is not valid CBOR: {e}") from None
    if fp.tell() != len(data):
        raise AttestationError("malformed",
                               f"{what} has {len(data) - fp.tell()} bytes after its CBOR item")
    return value


def _is_array(value: Any) -> bool:
    # cbor2 hands back tuples for arrays inside tags (it makes tag contents hashable).
    return isinstance(value, Sequence) and not isinstance(value, str | bytes | bytearray)


@dataclass(frozen=True)
class _Signed:
    protected: bytes
    payload: bytes
    signature: bytes
    document: Document


def _cose(data: bytes) -> _Signed:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise AttestationError("malformed", "the document is not a byte string")
    data = bytes(data)
    if len(data) > MAX_DOCUMENT:
        raise AttestationError("too-large",
                               f"the document is {len(data)} bytes; at most {MAX_DOCUMENT} "
                               "are accepted")
    if not data:
        raise AttestationError("malformed", "the document is empty")
    obj = _cbor(data, "the document", tag18=True)
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != COSE_SIGN1_TAG:
            raise AttestationError("malformed", f"the document has CBOR tag {obj.tag}, not "
                                                f"{COSE_SIGN1_TAG} (COSE_Sign1)")
        obj = obj.value
    if not _is_array(obj) or len(obj) != 4:
        raise AttestationError("malformed", "the document is not a COSE_Sign1 (an array of "
                                            "protected, unprotected, payload, signature)")
    protected, unprotected, payload, signature = obj
    for name, value, kind in (("protected header", protected, bytes),
                              ("unprotected header", unprotected, Mapping),
                              ("payload", payload, bytes), ("signature", signature, bytes)):
        if not isinstance(value, kind):
            want = "a map" if kind is Mapping else "a byte string"
            raise AttestationError("malformed", f"the COSE_Sign1 {name} is "
                                                f"{type(value).__name__}, not {want}")
    header = _cbor(protected, "the protected header") if protected else {}
    if not isinstance(header, Mapping):
        raise AttestationError("malformed", "the protected header is not a map")
    alg = header.get(1)
    if alg is None:
        raise AttestationError("unsupported-algorithm",
                               "the protected header names no signature algorithm")
    if type(alg) is not int or alg != ES384:
        raise AttestationError("unsupported-algorithm",
                               f"the signature algorithm is {quote(alg)}, not ES384 ({ES384})")
    return _Signed(protected, payload, signature, _payload(payload))


def _bytes_field(p: Mapping, name: str, lo: int, hi: int, optional: bool) -> bytes | None:
    value = p.get(name)
    if value is None:
        if optional:
            return None
        raise AttestationError("missing-field", f"the payload has no {name}")
    if not isinstance(value, bytes):
        raise AttestationError("invalid-field",
                               f"{name} is {type(value).__name__}, not a byte string")
    if not lo <= len(value) <= hi:
        raise AttestationError("invalid-field",
                               f"{name} is {len(value)} bytes, outside {lo}..{hi}")
    return value


def _payload(raw: bytes) -> Document:
    p = _cbor(raw, "the payload")
    if not isinstance(p, Mapping):
        raise AttestationError("malformed", "the payload is not a CBOR map")
    for name in ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"):
        if p.get(name) is None:
            raise AttestationError("missing-field", f"the payload has no {name}")

    module_id = p["module_id"]
    if not isinstance(module_id, str) or not module_id:
        raise AttestationError("invalid-field", "module_id is not a non-empty text string")
    digest = p["digest"]
    if digest != "SHA384":
        raise AttestationError("invalid-field", f"digest is {quote(digest)}, not 'SHA384'")
    timestamp = p["timestamp"]
    if not isinstance(timestamp, int) or isinstance(timestamp, bool) or timestamp <= 0:
        raise AttestationError("invalid-field", f"timestamp {quote(timestamp)} is not a positive "
                                                "integer")
    try:
        datetime.fromtimestamp(timestamp / 1000, UTC)
    except (OverflowError, OSError, ValueError):
        raise AttestationError("invalid-field",
                               f"timestamp {quote(timestamp)} is out of range") from None

    raw_pcrs = p["pcrs"]
    if not isinstance(raw_pcrs, Mapping) or not 1 <= len(raw_pcrs) <= _PCR_COUNT:
        raise AttestationError("invalid-field", f"pcrs is not a map of 1..{_PCR_COUNT} entries")
    pcrs: dict[int, bytes] = {}
    for index, value in raw_pcrs.items():
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < _PCR_COUNT:
            raise AttestationError("invalid-field", f"pcrs has an entry {quote(index)} that is not "
                                                    f"an index 0..{_PCR_COUNT - 1}")
        if not isinstance(value, bytes) or len(value) not in _PCR_SIZES:
            raise AttestationError("invalid-field", f"PCR{index} is not a byte string of 32, "
                                                    "48 or 64 bytes")
        pcrs[index] = value

    certificate = _bytes_field(p, "certificate", 1, _CERT_MAX, optional=False)
    assert certificate is not None
    cabundle = p["cabundle"]
    if not _is_array(cabundle) or not cabundle:
        raise AttestationError("invalid-field", "cabundle is not a non-empty array")
    if len(cabundle) > _CABUNDLE_MAX:
        raise AttestationError("invalid-field", f"cabundle has {len(cabundle)} certificates; "
                                                f"at most {_CABUNDLE_MAX} are accepted")
    for i, c in enumerate(cabundle):
        if not isinstance(c, bytes) or not 1 <= len(c) <= _CERT_MAX:
            raise AttestationError("invalid-field", f"cabundle[{i}] is not a byte string of "
                                                    f"1..{_CERT_MAX} bytes")
    known = {"module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle",
             "public_key", "user_data", "nonce"}
    return Document(
        module_id=module_id,
        digest=digest,
        timestamp=timestamp,
        pcrs=dict(sorted(pcrs.items())),
        certificate=certificate,
        cabundle=tuple(cabundle),
        # AWS's spec says 1..1024, but genuine documents (2022) carry an empty public_key: it
        # is read as such, and key binding refuses it with its own reason.
        public_key=_bytes_field(p, "public_key", 0, _OPTIONAL_MAX, optional=True),
        user_data=_bytes_field(p, "user_data", 0, _OPTIONAL_MAX, optional=True),
        nonce=_bytes_field(p, "nonce", 0, _OPTIONAL_MAX, optional=True),
        # Keys are the document's own: an int of thousands of digits cannot be str()'d.
        extra={k if isinstance(k, str) else quote(k): v for k, v in p.items() if k not in known},
    )


def decode_document(data: bytes) -> Document:
    """The payload, checked for structure only: nothing about it is trusted yet."""
    return _cose(data).document


# -- verification ----------------------------------------------------------------------------


def _parse_cert(der: bytes, role: str) -> x509.Certificate:
    try:
        cert = x509.load_der_x509_certificate(der)
        # Touch the fields used later, so a certificate that parses lazily fails here.
        _ = cert.subject, cert.issuer, cert.not_valid_before_utc, cert.not_valid_after_utc
        cert.public_key()
    except Exception as e:  # cryptography raises ValueError, InvalidVersion, Unsupported...
        raise AttestationError("bad-certificate", f"{role} is not a usable X.509 certificate: "
                                                  f"{e}") from None
    return cert


def _extension(cert: x509.Certificate, kind: type) -> Any:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    except Exception as e:  # a duplicated or undecodable extension
        raise AttestationError("bad-certificate",
                               f"'{_name(cert)}' has a malformed extension: {e}") from None


# The critical extensions a chain's certificate may carry: the ones _check_chain acts on. Any
# other critical one must be refused (RFC 5280 4.2); AWS's certificates carry no other.
_KNOWN_CRITICAL = frozenset({ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE})


def _check_form(chain: list[tuple[str, x509.Certificate]]) -> None:
    """What costs no signature verification: every certificate once, signed with ECDSA and
    SHA-384 and holding a P-384 key (as AWS's whole PKI is), no unknown critical extension."""
    seen: dict[bytes, str] = {}
    for role, cert in chain:
        der = cert.public_bytes(serialization.Encoding.DER)
        if der in seen:
            raise AttestationError("bad-chain", f"{role} '{_name(cert)}' is in the chain twice "
                                                f"(also as {seen[der]})")
        seen[der] = role
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise AttestationError("bad-certificate", f"{role} '{_name(cert)}' holds "
                                                      f"{_key_kind(key)}, not an ECDSA P-384 "
                                                      "key")
        try:
            extensions = list(cert.extensions)
        except Exception as e:  # a duplicated or undecodable extension
            raise AttestationError("bad-certificate", f"{role} '{_name(cert)}' has a malformed"
                                                      f" extension: {e}") from None
        for ext in extensions:
            if ext.critical and ext.oid not in _KNOWN_CRITICAL:
                raise AttestationError("bad-certificate",
                                       f"{role} '{_name(cert)}' has a critical extension this "
                                       f"verifier does not apply "
                                       f"({type(ext.value).__name__}, "
                                       f"{ext.oid.dotted_string})")
    for role, cert in chain:  # after the keys: a certificate signed by an RSA key says RSA
        if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
            raise AttestationError("bad-chain", f"{role} '{_name(cert)}' is signed with "
                                                f"{_algorithm(cert)}, not ECDSA with SHA-384")


def _algorithm(cert: x509.Certificate) -> str:
    try:
        digest = cert.signature_hash_algorithm
        named = f" ({digest.name})" if digest else ""
    except Exception:  # UnsupportedAlgorithm
        named = ""
    return f"algorithm {cert.signature_algorithm_oid.dotted_string}{named}"


def _key_kind(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an ECDSA {key.curve.name} key"
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA key"
    return f"a {type(key).__name__.removesuffix('PublicKey')} key"


def _check_chain(chain: list[tuple[str, x509.Certificate]]) -> None:
    """chain is [(role, cert)] from the leaf up to the root."""
    for j in range(1, len(chain)):
        child_role, child = chain[j - 1]
        role, issuer = chain[j]
        try:
            child.verify_directly_issued_by(issuer)
        except InvalidSignature:
            raise AttestationError("bad-chain", f"the signature on {child_role} "
                                                f"'{_name(child)}' does not verify with the key "
                                                f"of {role} '{_name(issuer)}'") from None
        except Exception as e:  # ValueError (names differ), TypeError, UnsupportedAlgorithm
            raise AttestationError("bad-chain", f"{child_role} '{_name(child)}' is not issued "
                                                f"by {role} '{_name(issuer)}': {e}") from None
        constraints = _extension(issuer, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise AttestationError("bad-chain", f"{role} '{_name(issuer)}' is not a CA "
                                                "certificate (basicConstraints CA:FALSE or "
                                                "absent)")
        # CA certificates between this issuer and the leaf, which pathLenConstraint bounds.
        below = j - 1
        if constraints.path_length is not None and below > constraints.path_length:
            raise AttestationError("bad-chain", f"{role} '{_name(issuer)}' allows "
                                                f"{constraints.path_length} CA certificates "
                                                f"below it, the chain has {below}")
        usage = _extension(issuer, x509.KeyUsage)
        if usage is not None and not usage.key_cert_sign:
            raise AttestationError("bad-chain", f"{role} '{_name(issuer)}' may not sign "
                                                "certificates (keyUsage lacks keyCertSign)")
    leaf_role, leaf = chain[0]
    usage = _extension(leaf, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise AttestationError("bad-certificate", f"{leaf_role} '{_name(leaf)}' may not sign "
                                                  "(keyUsage lacks digitalSignature)")


def _check_validity(chain: list[tuple[str, x509.Certificate]], at: datetime, what: str) -> None:
    for role, cert in chain:
        if at < cert.not_valid_before_utc:
            raise AttestationError("certificate-not-yet-valid",
                                   f"{role} '{_name(cert)}' is valid only from "
                                   f"{iso_time(cert.not_valid_before_utc)}, after {what} "
                                   f"({iso_time(at)})")
        if at > cert.not_valid_after_utc:
            raise AttestationError("certificate-expired",
                                   f"{role} '{_name(cert)}' expired at "
                                   f"{iso_time(cert.not_valid_after_utc)}, before {what} "
                                   f"({iso_time(at)})")


def _check_valid_now(chain: list[tuple[str, x509.Certificate]], now: datetime) -> None:
    """Live verification: every certificate must be valid now as well, give or take
    MAX_CLOCK_SKEW, so that a long max_age cannot admit an expired (or future) certificate."""
    skew = timedelta(seconds=MAX_CLOCK_SKEW)
    for role, cert in chain:
        if now + skew < cert.not_valid_before_utc:
            raise AttestationError("certificate-not-yet-valid",
                                   f"{role} '{_name(cert)}' is valid only from "
                                   f"{iso_time(cert.not_valid_before_utc)}, after this host's "
                                   f"clock ({iso_time(now)}; is the clock right?)")
        if now - skew > cert.not_valid_after_utc:
            raise AttestationError("certificate-expired",
                                   f"{role} '{_name(cert)}' expired at "
                                   f"{iso_time(cert.not_valid_after_utc)}, before now "
                                   f"({iso_time(now)})")


def _check_signature(signed: _Signed, leaf: x509.Certificate) -> None:
    key = leaf.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise AttestationError("bad-certificate",
                               "the signing certificate's key is not an ECDSA P-384 key")
    sig = signed.signature
    if len(sig) != 96:
        raise AttestationError("bad-signature",
                               f"the signature is {len(sig)} bytes; ES384 signatures are 96")
    der = encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    # RFC 8152 §4.4: what was signed is this array, not the payload alone.
    to_be_signed = cbor2.dumps(["Signature1", signed.protected, b"", signed.payload])
    try:
        key.verify(der, to_be_signed, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature:
        raise AttestationError("bad-signature", "the signature does not verify with the "
                                                "signing certificate's key (the document was "
                                                "altered, or signed by another key)") from None


def _to_datetime(t: datetime | float | None) -> datetime | None:
    if t is None or isinstance(t, datetime):
        return t if t is None or t.tzinfo else t.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(t), UTC)


def _short(hex_value: str) -> str:
    return hex_value if len(hex_value) <= 16 else hex_value[:16] + "..."


def _expected_pcrs(pcrs: Mapping[int, str | bytes]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for i, v in pcrs.items():
        out[int(i)] = v if isinstance(v, bytes) else bytes.fromhex(v.lower().removeprefix("0x"))
    return out


def _check_expectations(doc: Document, *, pcrs: dict[int, bytes],
                        nonce: bytes | None, public_key: bytes | None,
                        max_age: float | None, now: datetime,
                        allow_debug: bool | None) -> None:
    # allow_debug None: a debug-mode document is refused only when PCRs are expected. False:
    # always refused. True: accepted, its zeroed PCRs (0-2, 8) not compared, which callers
    # must report as "debug", never as attested.
    if doc.debug_mode and (allow_debug is False or (allow_debug is None and pcrs)):
        raise AttestationError("debug-enclave",
                               "the enclave runs in debug mode (its PCRs are all zeros), so "
                               "it cannot prove which image it runs (attestation.allow_debug "
                               "admits it, for development only)")
    # Debug mode zeroes the image's measurements (PCR0-2) and its signer's (PCR8) only: a
    # pinned IAM role (PCR3) or instance (PCR4) is compared all the same.
    skipped = _DEBUG_ZEROED if doc.debug_mode else frozenset()
    if pcrs:
        for i, want in sorted(pcrs.items()):
            if i in skipped:
                continue
            got = doc.pcrs.get(i)
            if got is None:
                raise AttestationError("pcr-mismatch", f"PCR{i} is not in the document")
            if got != want:
                raise AttestationError("pcr-mismatch",
                                       f"PCR{i} is {_short(got.hex())}, expected "
                                       f"{_short(want.hex())}")
    if nonce is not None:
        if doc.nonce is None:
            raise AttestationError("nonce-mismatch", "the document carries no nonce")
        if doc.nonce != nonce:
            raise AttestationError("nonce-mismatch", "the document's nonce is not the one "
                                                     "expected (a replayed document?)")
    if public_key is not None:
        if doc.public_key is None:
            raise AttestationError("public-key-mismatch", "the document carries no public key")
        if not doc.public_key:
            raise AttestationError("public-key-empty",
                                   "the document's public key is empty (0 bytes), so it does "
                                   "not bind this enclave's WireGuard key")
        if doc.public_key != public_key:
            raise AttestationError("public-key-mismatch",
                                   f"the document binds public key {_b64(doc.public_key)}, "
                                   f"not {_b64(public_key)}")
    if max_age is not None:
        age = (now - doc.time).total_seconds()
        if age > max_age:
            raise AttestationError("too-old", f"the document is {age:.0f} s old; at most "
                                              f"{max_age:g} s is accepted")
        if age < -MAX_CLOCK_SKEW:
            raise AttestationError("from-the-future",
                                   f"the document is dated {-age:.0f} s after this host's "
                                   "clock (is the clock right?)")


def verify_document(
    data: bytes,
    *,
    root: x509.Certificate | bytes | None = None,
    at: datetime | float | None = None,
    now: datetime | float | None = None,
    pcrs: Mapping[int, str | bytes] | None = None,
    nonce: bytes | None = None,
    public_key: bytes | None = None,
    max_age: float | None = None,
    live: bool = False,
    allow_debug: bool | None = None,
) -> Document:
    """Verify an attestation document and return its payload; AttestationError otherwise.

    root: the pinned root (certificate, PEM or DER); default AWS Nitro Enclaves Root G1.
    at: when the certificates must have been valid; default the document's own timestamp
        (leaf certificates live ~3 hours, so stored documents stay checkable).
    now: the reference for max_age; default the current time.
    pcrs: index -> expected value (hex or bytes); non-empty also refuses debug-mode enclaves.
    nonce, public_key: must equal the document's fields exactly.
    live: the document is being presented now: the chain must also be valid at `now`.
    allow_debug: True accepts debug-mode documents (PCR0-2 and 8 not compared), False refuses them
        always; None (default) refuses them only when `pcrs` is given.
    """
    # The caller's expectations are checked first: a bad one is the caller's bug (ValueError),
    # not the document's fault.
    expected_pcrs = _expected_pcrs(pcrs or {})
    when = _to_datetime(at)
    reference = _to_datetime(now) or datetime.now(UTC)
    try:
        return _verify(data, _as_certificate(root), when, reference, expected_pcrs, nonce,
                       public_key, max_age, live, allow_debug)
    except AttestationError:
        raise
    except Exception as e:
        # Every check above names its own failure; this only keeps the promise that hostile
        # input yields AttestationError, should a library raise something unforeseen.
        # (safetext.error: a message that cannot be made must not escape as a ValueError,
        # which verify_enclave would take for its policy's.)
        why = error(e)
        _unexpected_log(logging.WARNING, "attestation: unexpected %s while verifying", why)
        raise AttestationError("malformed", f"the document could not be verified: {why}") from None


def _verify(data: bytes, trusted: x509.Certificate, when: datetime | None, now: datetime,
            pcrs: dict[int, bytes], nonce: bytes | None, public_key: bytes | None,
            max_age: float | None, live: bool, allow_debug: bool | None) -> Document:
    signed = _cose(data)
    doc = signed.document
    try:
        leaf = _parse_cert(doc.certificate, "the signing certificate")
        n = len(doc.cabundle)
        bundle = [_parse_cert(der, f"cabundle[{i}]") for i, der in enumerate(doc.cabundle)]
        if doc.cabundle[0] != trusted.public_bytes(serialization.Encoding.DER):
            raise AttestationError("untrusted-root",
                                   f"the CA bundle's root '{_name(bundle[0])}' (SHA-256 "
                                   f"{fingerprint(bundle[0])}) is not the pinned root "
                                   f"'{_name(trusted)}' (SHA-256 {fingerprint(trusted)})")
        chain = [("the signing certificate", leaf)]
        chain += [(f"intermediate cabundle[{i}]", bundle[i]) for i in range(n - 1, 0, -1)]
        chain.append(("the root", bundle[0]))
        # Cheap checks first: a document that fails them costs no signature verification.
        _check_form(chain)
        _check_validity(chain, when or doc.time,
                        "the time given" if when else "the document's timestamp")
        if live:
            _check_valid_now(chain, now)
        _check_chain(chain)
        _check_signature(signed, leaf)
        _check_expectations(doc, pcrs=pcrs, nonce=nonce, public_key=public_key,
                            max_age=max_age, now=now, allow_debug=allow_debug)
    except AttestationError as e:
        e.document = doc
        raise
    return doc


def verify_enclave(
    document: bytes,
    *,
    public_key: bytes,
    nonce: bytes,
    policy: Any,
    root: x509.Certificate | bytes | None = None,
    now: datetime | float | None = None,
) -> Verdict:
    """The parent's decision on a registering enclave's document (see wgvsock.services.control).

    policy has `require`, `pcrs` ({index: hex}), `max_age` (seconds), `allow_debug` and
    `test_root_ca`. A presented document is always verified, live (its certificates valid
    now), and a failing one is refused whatever `require` says: `require` only decides about
    enclaves that present no document, which the caller handles. A debug-mode document is
    refused unless allow_debug; accepted, it is not "attested" and detail["debug_mode"] says so.
    Without PCR0 in the policy the verdict's image_pinned is False: the enclave is genuine,
    its image unproven.
    """
    pcrs = dict(policy.pcrs or {})
    try:
        if root is None:
            trusted = trusted_root(getattr(policy, "test_root_ca", None))
        else:
            trusted = _as_certificate(root)
        doc = verify_document(document, root=trusted, pcrs=pcrs,
                              nonce=nonce, public_key=public_key,
                              max_age=policy.max_age,
                              now=time.time() if now is None else now, live=True,
                              allow_debug=bool(getattr(policy, "allow_debug", False)))
    except AttestationError as e:
        return Verdict(False, attested=False, reason=f"attestation refused: {e.reason}",
                       detail={"code": e.code})
    except ValueError as e:  # a PCR in the policy that is not hex: the caller's bug, not fatal
        return Verdict(False, attested=False, reason=f"attestation policy is invalid: {e}",
                       detail={"code": "bad-policy"})
    return Verdict(True, attested=not doc.debug_mode, detail=doc.summary(),
                   image_pinned=0 in pcrs)
