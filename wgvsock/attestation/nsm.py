"""A client for the Nitro Secure Module, the enclave's only source of attestation documents.

The NSM is a character device (/dev/nsm) with one ioctl, NSM_IOCTL_RAW =
_IOWR(0x0A, 0, struct nsm_raw), where (linux/include/uapi/linux/nsm.h)

    struct nsm_iovec { __u64 addr; __u64 len; };
    struct nsm_raw   { struct nsm_iovec request; struct nsm_iovec response; };

The request is CBOR of at most 0x1000 bytes, the answer CBOR of at most 0x3000; the driver
rewrites response.len to the answer's length. Messages follow serde's externally tagged enums
(aws-nitro-enclaves-nsm-api, src/api/mod.rs): a request without fields is the bare text
"DescribeNSM" / "GetRandom", one with fields is {"Attestation": {"user_data": ..., "nonce": ...,
"public_key": ...}} (absent ones null), and answers are {"Attestation": {"document": bstr}},
{"GetRandom": {"random": bstr}}, {"DescribeNSM": {...}} or {"Error": "InvalidArgument"}.

Tests replace the ioctl, not the device: pass `ioctl=` (or monkeypatch `system_ioctl`) with a
function that answers through the same struct, and point WGVSOCK_NSM_DEVICE (or `path=`) at
any file that can be opened read-write. tests/attest_fixtures.py has such a fake.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import cbor2

NSM_DEVICE = "/dev/nsm"
DEVICE_ENV = "WGVSOCK_NSM_DEVICE"
NSM_IOCTL_MAGIC = 0x0A
REQUEST_MAX = 0x1000
RESPONSE_MAX = 0x3000
NSM_RAW = struct.Struct("=QQQQ")  # request.addr, request.len, response.addr, response.len

_IOC_READ_WRITE = 3


def _iowr(kind: int, number: int, size: int) -> int:
    # The generic Linux ioctl encoding (x86 and arm64 alike): dir:2 size:14 type:8 nr:8.
    return (_IOC_READ_WRITE << 30) | (size << 16) | (kind << 8) | number


NSM_IOCTL_RAW = _iowr(NSM_IOCTL_MAGIC, 0, NSM_RAW.size)  # 0xC0200A00

# What the NSM's ErrorCode variants mean, for messages a person can act on.
ERRORS = {
    "InvalidArgument": "an argument was invalid",
    "InvalidIndex": "a PCR index is out of range",
    "InvalidResponse": "the answer did not match the request",
    "ReadOnlyIndex": "the PCR is locked",
    "InvalidOperation": "the module cannot do this (missing capability)",
    "BufferTooSmall": "the answer did not fit the buffer",
    "InputTooLarge": "the request is too large",
    "InternalError": "the module failed internally",
}

Ioctl = Callable[[int, int, bytearray], int]


def system_ioctl(fd: int, request: int, arg: bytearray) -> int:
    """The real ioctl; the kernel rewrites `arg` (the nsm_raw struct) in place."""
    return fcntl.ioctl(fd, request, arg, True)


class NSMError(Exception):
    """The NSM is absent, failed, or answered with an error. `code` is the NSM's ErrorCode
    name when it answered with one."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class NSMDescription:
    version: tuple[int, int, int]
    module_id: str
    max_pcrs: int
    locked_pcrs: tuple[int, ...]
    digest: str


def _device_path(path: str | None) -> str:
    return path or os.environ.get(DEVICE_ENV) or NSM_DEVICE


class NSM:
    """One open NSM device. Opened on first use; close() or `with` releases it."""

    def __init__(self, path: str | None = None, *, ioctl: Ioctl | None = None) -> None:
        self.path = _device_path(path)
        self._ioctl = ioctl
        self._fd: int | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> NSM:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self._fd is not None:
            return
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NSMError(f"no NSM device at {self.path} (not inside a Nitro Enclave?)") from None
        except OSError as e:
            raise NSMError(f"cannot open the NSM device {self.path}: {e.strerror}") from None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def call(self, request: Any) -> Any:
        """Send one CBOR request, return the decoded answer (an Error answer raises)."""
        body = cbor2.dumps(request)
        if len(body) > REQUEST_MAX:
            raise NSMError(f"the request is {len(body)} bytes; the NSM takes at most "
                           f"{REQUEST_MAX}", "InputTooLarge")
        with self._lock:
            self.open()
            assert self._fd is not None
            req = ctypes.create_string_buffer(body, len(body))
            resp = ctypes.create_string_buffer(RESPONSE_MAX)
            arg = bytearray(NSM_RAW.pack(ctypes.addressof(req), len(body),
                                         ctypes.addressof(resp), RESPONSE_MAX))
            ioctl = self._ioctl or system_ioctl
            try:
                ioctl(self._fd, NSM_IOCTL_RAW, arg)
            except OSError as e:
                if e.errno == errno.EMSGSIZE:
                    raise NSMError("the NSM refused the request as too large",
                                   "InputTooLarge") from None
                raise NSMError(f"the NSM ioctl failed: {e.strerror or e}") from None
            length = NSM_RAW.unpack(bytes(arg))[3]
            if length > RESPONSE_MAX:
                raise NSMError(f"the NSM reported a {length}-byte answer in a {RESPONSE_MAX}-"
                               "byte buffer")
            answer = resp.raw[:length]
        try:
            return cbor2.loads(answer)
        except Exception as e:  # cbor2 raises several error types on garbage
            raise NSMError(f"the NSM answered with malformed CBOR: {e}") from None

    def _expect(self, request: Any, variant: str) -> Mapping:
        name = request if isinstance(request, str) else next(iter(request))
        answer = self.call(request)
        if isinstance(answer, Mapping) and len(answer) == 1:
            (got, value), = answer.items()
        else:
            got, value = answer, None
        if got == "Error":
            code = str(value)
            raise NSMError(f"the NSM refused {name}: {code} "
                           f"({ERRORS.get(code, 'unknown error code')})", code)
        if got != variant or not isinstance(value, Mapping):
            raise NSMError(f"the NSM answered {name} with {str(got)[:40]!r}, not {variant}")
        return value

    def attestation(self, *, user_data: bytes | None = None, nonce: bytes | None = None,
                    public_key: bytes | None = None) -> bytes:
        """A signed attestation document (COSE_Sign1 bytes) carrying these fields."""
        value = self._expect({"Attestation": {"user_data": user_data, "nonce": nonce,
                                              "public_key": public_key}}, "Attestation")
        document = value.get("document")
        if not isinstance(document, bytes) or not document:
            raise NSMError("the NSM's Attestation answer has no document")
        return document

    def describe_nsm(self) -> NSMDescription:
        v = self._expect("DescribeNSM", "DescribeNSM")
        try:
            version = (int(v["version_major"]), int(v["version_minor"]),
                       int(v["version_patch"]))
            locked = tuple(sorted(int(i) for i in v.get("locked_pcrs") or ()))
            return NSMDescription(version, str(v["module_id"]), int(v["max_pcrs"]), locked,
                                  str(v["digest"]))
        except (KeyError, TypeError, ValueError) as e:
            raise NSMError(f"the NSM's DescribeNSM answer is incomplete: {e}") from None

    def get_random(self) -> bytes:
        value = self._expect("GetRandom", "GetRandom")
        random = value.get("random")
        if not isinstance(random, bytes) or not random:
            raise NSMError("the NSM's GetRandom answer has no random bytes")
        return random


def nsm_attester(path: str | None = None, *, ioctl: Ioctl | None = None,
                 ) -> Callable[[bytes, bytes], bytes] | None:
    """The enclave's attestation function for the control exchange, or None without an NSM
    device (then the enclave registers unattested and the parent's policy decides).

    The device is WGVSOCK_NSM_DEVICE, default /dev/nsm. The function opens it per call: it
    runs once per registration, and a fresh open survives a device that was reset meanwhile.
    """
    device = _device_path(path)
    if not os.path.exists(device):
        return None

    def attest(nonce: bytes, public_key: bytes) -> bytes:
        from ..services.control import ControlError

        try:
            with NSM(device, ioctl=ioctl) as nsm:
                return nsm.attestation(nonce=nonce, public_key=public_key)
        except NSMError as e:
            # The enclave's control loop retries on ControlError; any other type would end it.
            raise ControlError(f"attestation failed: {e}") from None

    return attest
