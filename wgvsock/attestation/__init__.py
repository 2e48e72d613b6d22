"""Nitro Enclave attestation: the NSM client (enclave side) and the verifier (parent side).

The enclave asks its NSM for a document whose `public_key` is its WireGuard public key and whose
`nonce` is the parent's challenge; the parent verifies it against the AWS Nitro root shipped in
this package and the profile's `attestation` section. See README, "Attestation and the trust
model".
"""

from __future__ import annotations

from .nsm import NSM, NSMDescription, NSMError, nsm_attester
from .verify import (
    AttestationError,
    Document,
    aws_root,
    decode_document,
    trusted_root,
    verify_document,
    verify_enclave,
)

__all__ = [
    "NSM",
    "AttestationError",
    "Document",
    "NSMDescription",
    "NSMError",
    "aws_root",
    "decode_document",
    "nsm_attester",
    "trusted_root",
    "verify_document",
    "verify_enclave",
]
