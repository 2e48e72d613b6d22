"""Attestation documents without Nitro hardware: a test CA shaped like AWS's (root ->
intermediate -> leaf, P-384, ECDSA-SHA384), documents signed with it, and a fake NSM that
answers the documented CBOR messages through the real ioctl struct.

Reusable by other tests:

    ca = make_test_ca()
    doc = make_document(ca, nonce=n, public_key=k)
    verify_document(doc, root=ca.root_cert, nonce=n, public_key=k)

    fake = FakeNSM(ca)                                   # in-process NSM
    monkeypatch.setattr(nsm, "system_ioctl", fake.ioctl)  # wgvsock.attestation.nsm
    monkeypatch.setenv("WGVSOCK_NSM_DEVICE", str(fake.device(tmp_path)))
    # and the parent's profile trusts the test CA through attestation.test_root_ca:
    Attestation(require=True, pcrs=..., test_root_ca=str(ca.write_root(tmp_path)))
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from wgvsock.attestation import nsm

MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"


def pcr(label: str) -> bytes:
    """A stand-in SHA-384 measurement."""
    return hashlib.sha384(label.encode()).digest()


ZERO_PCR = bytes(48)
# Like a real document: PCR0-2 measure the image, PCR3/4 the role and instance, the rest zero.
TEST_PCRS: dict[int, bytes] = {i: ZERO_PCR for i in range(16)}
TEST_PCRS.update({0: pcr("image"), 1: pcr("kernel"), 2: pcr("application"),
                  3: pcr("iam-role"), 4: pcr("instance")})
DEBUG_PCRS: dict[int, bytes] = {i: ZERO_PCR for i in range(16)}


def _name(cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wgvsock tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool, path_length: int | None,
          not_before: datetime, not_after: datetime) -> x509.Certificate:
    b = (x509.CertificateBuilder()
         .subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=path_length), critical=True)
         .add_extension(x509.KeyUsage(
             digital_signature=not ca, content_commitment=False, key_encipherment=False,
             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
             encipher_only=False, decipher_only=False), critical=True))
    return b.sign(issuer_key, hashes.SHA384())


@dataclass
class TestCA:
    __test__ = False  # not a pytest class

    root_key: ec.EllipticCurvePrivateKey
    root_cert: x509.Certificate
    intermediate_key: ec.EllipticCurvePrivateKey
    intermediate_cert: x509.Certificate
    leaf_key: ec.EllipticCurvePrivateKey
    leaf_cert: x509.Certificate

    @property
    def root_pem(self) -> bytes:
        return self.root_cert.public_bytes(serialization.Encoding.PEM)

    @property
    def cabundle(self) -> list[bytes]:
        """Root first, as AWS orders it."""
        return [c.public_bytes(serialization.Encoding.DER)
                for c in (self.root_cert, self.intermediate_cert)]

    @property
    def leaf_der(self) -> bytes:
        return self.leaf_cert.public_bytes(serialization.Encoding.DER)

    def write_root(self, directory: Path) -> Path:
        path = Path(directory) / "test-root.pem"
        path.write_bytes(self.root_pem)
        return path

    _PARTS = ("root", "intermediate", "leaf")

    def save(self, directory: Path) -> Path:
        """Writes the CA to `directory` (keys unencrypted, 0600: test keys only), so another
        process can load it; the root's PEM goes to test-root.pem as write_root does."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for part in self._PARTS:
            key: ec.EllipticCurvePrivateKey = getattr(self, f"{part}_key")
            cert: x509.Certificate = getattr(self, f"{part}_cert")
            key_path = directory / f"{part}.key"
            key_path.touch(mode=0o600)
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
            (directory / f"{part}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return self.write_root(directory)

    @classmethod
    def load(cls, directory: Path) -> TestCA:
        """The CA that save() wrote to `directory`."""
        directory = Path(directory)
        parts: list[Any] = []
        for part in cls._PARTS:
            key = serialization.load_pem_private_key((directory / f"{part}.key").read_bytes(),
                                                     password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{directory / part}.key is not an EC key")
            parts += [key, x509.load_pem_x509_certificate((directory / f"{part}.pem").read_bytes())]
        return cls(*parts)


def make_test_ca(*, now: datetime | None = None, leaf_hours: float = 3.0,
                 leaf_not_before: datetime | None = None,
                 leaf_not_after: datetime | None = None, name: str = "test") -> TestCA:
    """A root (30 years), an intermediate (1 year) and a leaf valid for `leaf_hours` from
    `now` (default: an hour ago), like the short-lived leaves AWS issues."""
    now = now or datetime.now(UTC)
    root_key, inter_key, leaf_key = _key(), _key(), _key()
    root_name, inter_name = f"{name}.nitro-enclaves root", f"{name} intermediate"
    root = _cert(root_name, root_key, root_name, root_key, ca=True, path_length=None,
                 not_before=now - timedelta(days=365), not_after=now + timedelta(days=3650))
    inter = _cert(inter_name, inter_key, root_name, root_key, ca=True, path_length=0,
                  not_before=now - timedelta(days=30), not_after=now + timedelta(days=335))
    start = leaf_not_before or now - timedelta(hours=1)
    end = leaf_not_after or start + timedelta(hours=leaf_hours)
    leaf = _cert(f"{name} enclave leaf", leaf_key, inter_name, inter_key, ca=False,
                 path_length=None, not_before=start, not_after=end)
    return TestCA(root_key, root, inter_key, inter, leaf_key, leaf)


def sign1(protected: bytes, payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """An ES384 signature over the COSE Sig_structure, raw r||s."""
    der = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]),
                   ec.ECDSA(hashes.SHA384()))
    r, s = decode_dss_signature(der)
    return r.to_bytes(48, "big") + s.to_bytes(48, "big")


def make_payload(ca: TestCA, *, module_id: str = MODULE_ID, timestamp_ms: int | None = None,
                 pcrs: Mapping[int, bytes] | None = None, public_key: bytes | None = None,
                 nonce: bytes | None = None, user_data: bytes | None = None,
                 overrides: Mapping[str, Any] | None = None,
                 drop: Iterable[str] = ()) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "module_id": module_id,
        "digest": "SHA384",
        "timestamp": int(time.time() * 1000) if timestamp_ms is None else timestamp_ms,
        "pcrs": dict(TEST_PCRS if pcrs is None else pcrs),
        "certificate": ca.leaf_der,
        "cabundle": ca.cabundle,
        # The NSM writes absent optional fields as null.
        "public_key": public_key,
        "user_data": user_data,
        "nonce": nonce,
    }
    payload.update(overrides or {})
    for name in drop:
        payload.pop(name, None)
    return payload


def make_document(ca: TestCA, *, tagged: bool = False, alg: int = -35,
                  sign_key: ec.EllipticCurvePrivateKey | None = None,
                  payload_bytes: bytes | None = None, **fields: Any) -> bytes:
    """A COSE_Sign1 attestation document signed by the CA's leaf key (or `sign_key`).
    `fields` go to make_payload; `payload_bytes` replaces the encoded payload outright."""
    payload = payload_bytes if payload_bytes is not None else cbor2.dumps(
        make_payload(ca, **fields))
    protected = cbor2.dumps({1: alg})
    signature = sign1(protected, payload, sign_key or ca.leaf_key)
    body = [protected, {}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(18, body) if tagged else body)


def resign(ca: TestCA, document: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The document with its payload changed by `change`, signed again by the CA's leaf."""
    protected, _, payload, _ = cbor2.loads(document)
    p = cbor2.loads(payload)
    change(p)
    payload = cbor2.dumps(p)
    return cbor2.dumps([protected, {}, payload, sign1(protected, payload, ca.leaf_key)])


@dataclass
class FakeNSM:
    """Answers NSM requests like /dev/nsm would, through the same struct nsm_raw, so the
    client's ioctl packing is exercised too. `errors` maps a request name to the ErrorCode it
    answers with; `raw_answer` replaces the next answer's bytes; `fail_errno` makes the ioctl
    fail with that errno."""

    ca: TestCA | None = None
    pcrs: Mapping[int, bytes] = field(default_factory=lambda: dict(TEST_PCRS))
    module_id: str = MODULE_ID
    clock: Callable[[], float] = time.time
    errors: dict[str, str] = field(default_factory=dict)
    raw_answer: bytes | None = None
    fail_errno: int | None = None
    requests: list[Any] = field(default_factory=list)
    ioctl_numbers: list[int] = field(default_factory=list)

    def device(self, directory: Path) -> Path:
        """A file to stand for /dev/nsm: the client only opens it and passes the fd on."""
        path = Path(directory) / "fake-nsm"
        path.touch()
        return path

    def answer(self, request: Any) -> Any:
        name = request if isinstance(request, str) else next(iter(request), None)
        if name in self.errors:
            return {"Error": self.errors[name]}
        if name == "DescribeNSM":
            return {"DescribeNSM": {
                "version_major": 1, "version_minor": 0, "version_patch": 0,
                "module_id": self.module_id, "max_pcrs": 32,
                "locked_pcrs": sorted(self.pcrs), "digest": "SHA384"}}
        if name == "GetRandom":
            return {"GetRandom": {"random": hashlib.sha256(str(self.clock()).encode()).digest()}}
        if name == "Attestation" and isinstance(request, Mapping):
            args = request["Attestation"]
            if self.ca is None:
                return {"Error": "InternalError"}
            doc = make_document(self.ca, module_id=self.module_id, pcrs=self.pcrs,
                                timestamp_ms=int(self.clock() * 1000),
                                public_key=args.get("public_key"), nonce=args.get("nonce"),
                                user_data=args.get("user_data"))
            return {"Attestation": {"document": doc}}
        return {"Error": "InvalidOperation"}

    def ioctl(self, fd: int, request: int, arg: bytearray) -> int:
        self.ioctl_numbers.append(request)
        if request != nsm.NSM_IOCTL_RAW or len(arg) != nsm.NSM_RAW.size:
            raise OSError(errno.ENOTTY, "inappropriate ioctl for device")
        if self.fail_errno is not None:
            raise OSError(self.fail_errno, "fake NSM failure")
        req_addr, req_len, resp_addr, resp_cap = nsm.NSM_RAW.unpack(bytes(arg))
        request_body = ctypes.string_at(req_addr, req_len)
        decoded = cbor2.loads(request_body)
        self.requests.append(decoded)
        if self.raw_answer is not None:
            body, self.raw_answer = self.raw_answer, None
        else:
            body = cbor2.dumps(self.answer(decoded))
        if len(body) > resp_cap:
            raise OSError(errno.EMSGSIZE, "answer larger than the buffer")
        ctypes.memmove(resp_addr, body, len(body))
        arg[:] = nsm.NSM_RAW.pack(req_addr, req_len, resp_addr, len(body))
        return 0
