"""Host-name entries of `parent.egress.allow`/`deny` and how query names match them.

A pattern is an exact name (``api.stripe.com``) or ``*.`` followed by a name, which matches
every name *below* it at any depth (``a.s3.amazonaws.com``, ``x.y.s3.amazonaws.com``) but not
the name itself; that is how S3's dotted bucket names stay reachable. Matching is on
lowercase A-labels: Unicode names in the profile are converted with IDNA, a trailing dot is
ignored, and case never matters (DNS names are case-insensitive, and resolvers randomise case).

Pure Python on purpose (with `idna` for Unicode names): the enclave parses the same profile
and needs no dnspython for it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import idna

Protocol = Literal["tcp", "udp"]
Labels = tuple[str, ...]

MAX_NAME = 253
MAX_LABEL = 63
# Letters, digits, '-' and '_' (the latter for names like _acme-challenge); no leading or
# trailing '-'.
_LABEL_RE = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?")


# Letters typed for digits by mistake (after lowercasing): O for 0, l and I for 1.
_DIGIT_LOOKALIKES = str.maketrans("oli", "011")


def _mistyped_ipv4(labels: Labels) -> str | None:
    """LABELS with look-alike letters read as digits, when they have an IPv4 address's
    shape: at most four labels, at least two all digits, each of 1-3 digits or look-alikes.
    A letter O in 10.0.0.O would otherwise make the entry a host name, quietly switching
    the profile to the DNS forwarder."""
    if len(labels) > 4 or sum(label.isdigit() for label in labels) < 2:
        return None
    fixed = [label.translate(_DIGIT_LOOKALIKES) for label in labels]
    if not all(len(f) <= 3 and f.isdigit() for f in fixed):
        return None
    return ".".join(fixed)


class NameRuleError(ValueError):
    """A pattern that is not a host name; str() says why, .hint how to fix it."""

    def __init__(self, reason: str, hint: str = "") -> None:
        self.reason, self.hint = reason, hint
        super().__init__(f"{reason} — {hint}" if hint else reason)


def looks_like_name(host: str) -> bool:
    """Whether an egress entry's host part is meant as a name rather than a CIDR: it has no
    '/' and its last label is not a number (IPv4 ends in digits, IPv6 needs two colons)."""
    text = host.strip().rstrip(".")
    if not text or "/" in text or ":" in text or text.startswith("["):
        return False
    return not text.rsplit(".", 1)[-1].isdigit()


def _a_label(label: str, whole: str) -> str:
    if not label:
        raise NameRuleError(f"{whole!r} has an empty label (two dots in a row)",
                            "write it like api.example.com")
    if label.isascii():
        out = label.lower()
    else:
        # Non-transitional UTS 46, as resolvers and browsers encode names: ß and ς stay
        # themselves (IDNA 2003 made faß.de fass.de, another domain), a stray joiner is an
        # error rather than silently dropped.
        try:
            out = idna.encode(label, uts46=True, transitional=False).decode("ascii").lower()
        except (idna.IDNAError, UnicodeError):
            raise NameRuleError(f"{whole!r}: label {label!r} is not a valid IDNA label",
                                "write the name as your browser shows it, or its xn-- form"
                                ) from None
    if len(out) > MAX_LABEL:
        raise NameRuleError(f"{whole!r}: label {label!r} is longer than {MAX_LABEL} "
                            "characters")
    if not _LABEL_RE.fullmatch(out):
        raise NameRuleError(f"{whole!r}: {label!r} is not a valid label",
                            "use letters, digits, '-' and '_', not starting or ending with '-'")
    return out


@dataclass(frozen=True)
class NamePattern:
    labels: Labels  # lowercase A-labels, without the root
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str) -> NamePattern:
        whole = text
        s = text.strip()
        if s.endswith("."):
            s = s[:-1]
        wildcard = s.startswith("*.") or s == "*"
        if wildcard:
            s = s[2:]
        if not s:
            raise NameRuleError(f"{whole!r} names nothing",
                                "write a name such as api.example.com or *.example.com; "
                             "to allow everything use 0.0.0.0/0")
        if "*" in s:
            raise NameRuleError(f"{whole!r}: '*' is only allowed as the whole first label",
                             "write *.example.com")
        labels = tuple(_a_label(label, whole) for label in s.split("."))
        if (fixed := _mistyped_ipv4(labels)) is not None:
            try:
                hint = f"did you mean {ipaddress.IPv4Address(fixed)}?"
            except ValueError:
                hint = "write an IPv4 address with digits only, as a CIDR such as 10.0.0.0/8"
            raise NameRuleError(f"{whole!r} looks like a mistyped IPv4 address, not a host "
                                "name", hint)
        if len(".".join(labels)) > MAX_NAME:
            raise NameRuleError(f"{whole!r} is longer than {MAX_NAME} characters")
        if labels[-1].isdigit():
            raise NameRuleError(f"{whole!r} ends in a number, so it is not a host name",
                             "write an IP network as a CIDR, e.g. 10.0.0.0/8")
        return cls(labels, wildcard)

    def matches(self, name: Labels) -> bool:
        """NAME: a query name's labels, lowercase, without the root (see :func:`labels_of`)."""
        n = len(self.labels)
        if self.wildcard:
            return len(name) > n and name[-n:] == self.labels
        return name == self.labels

    def __str__(self) -> str:
        text = ".".join(self.labels)
        return f"*.{text}" if self.wildcard else text


def labels_of(raw: Sequence[bytes]) -> Labels:
    """A query name's wire labels (dnspython's Name.labels) as matchable labels: ASCII
    lowercased (as DNS compares them), the empty root label dropped. Other bytes stay as they
    are (latin-1), so they can never equal an A-label."""
    return tuple(label.lower().decode("latin-1") for label in raw if label)


@dataclass(frozen=True)
class NameRule:
    """An allow/deny entry written as a name: a pattern, optionally ports and a protocol, as
    for CIDR rules (``api.stripe.com:443/tcp``)."""

    pattern: NamePattern
    ports: tuple[int, int] | None = None
    protocol: Protocol | None = None

    def __str__(self) -> str:
        text = str(self.pattern)
        if self.ports is not None:
            lo, hi = self.ports
            text += f":{lo}" if lo == hi else f":{lo}-{hi}"
        if self.protocol is not None:
            text += "/" + self.protocol
        return text


class NamePolicy:
    """The profile's name rules. deny wins over allow; a name no allow rule matches is not
    allowed either, unless RESOLVE_UNLISTED: the profile allows every address anyway, so
    refusing such a name would protect nothing, and deny rules are then a block list."""

    def __init__(self, allow: Sequence[NameRule], deny: Sequence[NameRule], *,
                 resolve_unlisted: bool = False) -> None:
        self.allow = tuple(allow)
        self.deny = tuple(deny)
        self.resolve_unlisted = resolve_unlisted

    def denied(self, name: Labels) -> bool:
        return any(r.pattern.matches(name) for r in self.deny)

    def resolves(self, name: Labels) -> bool:
        """Whether a query for NAME is forwarded rather than refused."""
        if self.denied(name):
            return False
        return self.resolve_unlisted or any(r.pattern.matches(name) for r in self.allow)

    def allowed_by(self, name: Labels) -> list[int]:
        """Indexes of the allow rules NAME matches; empty when it is denied or not allowed."""
        if self.denied(name):
            return []
        return [i for i, r in enumerate(self.allow) if r.pattern.matches(name)]
