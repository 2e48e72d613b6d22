"""Text from the other side of a trust boundary, made fit for a log line, an error message or
a terminal.

An enclave's attestation document, a parent's refusal, a certificate's subject, an AWS error
body: each may carry line breaks (a forged log line after ours), terminal escapes (a cleared
screen, hidden text in the operator's terminal) or 64 KiB where a word was expected. Two forms,
one for each kind of value:

- `quote(value)`: a value (a type, a field, a number) as Python writes it, cut short.
- `prose(value)`: a sentence (a reason, a name) as it reads, with every control or otherwise
  unprintable character escaped, cut short.

A third, `error(exc)`, is an exception as "Type: message" in the same way, whatever its
`__str__` does: a check or a library of ours may raise one whose message cannot be made (its
`__str__` raises), and a refusal or a log line built from it must still be one line, not a
second exception where the first was being handled. `message(exc)` is its message alone,
as it is, for a line that has always shown that (an error of our own, worded for the user),
with error's words only when it cannot be made.

`shell(word)` is a word (a path) of a command a message gives to copy and run, quoted so the
shell takes it as that one word: a path with a blank, a quote or a `;` in it would otherwise
make another command, one that chmods the wrong file, say.

A fifth, `without_userinfo(text)`, cuts the user name and password out of every URL in a
text (https://user:pass@host/ is shown https://***@host/): an endpoint the operator set may
carry them, and a message naming it goes to the terminal and the journal.

Both keep the length of what was cut, so a log still shows that something was long. A
container (list, tuple, dict, set, any mapping or sequence) is written only as far as
_WALK characters and _DEPTH levels, never repr()'d whole: a structure that shares its parts
(a few hundred bytes of CBOR value sharing decode to 2^64 paths) or contains itself would
otherwise take forever; past that, the length is given as "more than".
"""

from __future__ import annotations

import datetime
import decimal
import enum
import fractions
import ipaddress
import re
import shlex
import uuid
from collections.abc import Callable, Mapping, Sequence, Set

__all__ = ["error", "message", "prose", "quote", "shell", "without_userinfo"]

# How much of a container is written before it is cut, in characters and levels.
_WALK = 4096
_DEPTH = 6
_SCALARS = frozenset({str, bytes, bytearray, int, float, complex, bool, type(None)})
# Other types whose repr() is short and cheap whatever the value.
_SMALL = (
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    fractions.Fraction,
    uuid.UUID,
    ipaddress.IPv4Address,
    ipaddress.IPv6Address,
    ipaddress.IPv4Network,
    ipaddress.IPv6Network,
    enum.Enum,
)


def _cut(text: str, limit: int, whole: bool = True) -> str:
    if whole:
        return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"
    return f"{text[:limit]}... (more than {max(limit, _WALK)} chars)"


def quote(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut at `limit` characters."""
    text, whole = _repr(value, max(limit, _WALK))
    return _cut(text, limit, whole)


def _scalar(value: object) -> str:
    try:
        return repr(value)
    except ValueError:  # an int of more than 4300 digits (sys.set_int_max_str_digits)
        return f"<a {type(value).__name__} too large to show>"


class _Full(Exception):
    pass


def _repr(value: object, room: int) -> tuple[str, bool]:
    """repr(value) and True, or its first `room`-odd characters and False. A scalar is
    written whole (its repr is as long as it is); a container never beyond `room`."""
    if type(value) in _SCALARS:
        return _scalar(value), True
    out: list[str] = []
    left = [room]

    def emit(text: str) -> None:
        out.append(text)
        left[0] -= len(text)
        if left[0] < 0:
            raise _Full

    def walk(v: object, depth: int) -> None:
        kind = type(v)
        if kind in _SCALARS:
            if isinstance(v, str | bytes | bytearray) and len(v) > left[0]:
                v = v[: left[0] + 1]  # still longer than the room left once quoted
            emit(_scalar(v))
        elif isinstance(v, _SMALL):
            emit(repr(v))
        elif depth >= _DEPTH:
            emit("...")
        elif isinstance(v, Mapping):
            emit("{" if kind is dict else f"{kind.__name__}({{")
            for i, (k, item) in enumerate(v.items()):
                emit(", " if i else "")
                walk(k, depth + 1)
                emit(": ")
                walk(item, depth + 1)
            emit("}" if kind is dict else "})")
        elif isinstance(v, Sequence | Set):
            if kind is list:
                opening, closing = "[", "]"
            elif kind is tuple:
                opening, closing = "(", ",)" if len(v) == 1 else ")"
            elif kind is set:
                opening, closing = ("{", "}") if v else ("set(", ")")
            elif kind is frozenset:
                opening, closing = ("frozenset({", "})") if v else ("frozenset(", ")")
            else:
                opening, closing = f"{kind.__name__}([", "])"
            emit(opening)
            for i, item in enumerate(v):
                emit(", " if i else "")
                walk(item, depth + 1)
            emit(closing)
        elif kind.__name__ == "CBORTag" and hasattr(v, "tag") and hasattr(v, "value"):
            emit(f"CBORTag({_scalar(v.tag)}, ")
            walk(v.value, depth + 1)
            emit(")")
        else:  # its repr() might be anything, of any length
            emit(f"<{kind.__name__} object>")

    try:
        walk(value, 0)
    except _Full:
        return "".join(out), False
    except Exception as e:  # a mapping or sequence whose iteration fails
        return f"<{type(value).__name__} that cannot be shown: {type(e).__name__}>", True
    return "".join(out), True


def prose(value: object, limit: int = 300) -> str:
    """`value` (repr'd unless it is a str) with control characters, line breaks and other
    unprintable ones escaped as Python escapes them, cut at `limit` characters."""
    if isinstance(value, str):
        text, whole = value, True
    else:
        text, whole = _repr(value, max(limit, _WALK))
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return _cut(text, limit, whole)


def error(exc: BaseException, limit: int = 300, *,
          clean: Callable[[str], str] | None = None) -> str:
    """`EXC` as "Type: message" (its `str()` through `prose`), or "Type" when the message is
    empty; "Type (its message cannot be shown: Other)" when `str(exc)` itself raises Other.
    CLEAN, given, is applied to the message before it is escaped and cut: `without_userinfo`
    would not know a password cut in half for one."""
    name = prose(type(exc).__name__, 80)  # (a class made with type() may be named anything)
    try:
        text = str(exc)
    except Exception as e:
        return f"{name} (its message cannot be shown: {prose(type(e).__name__, 80)})"
    if clean is not None:
        text = clean(text)
    return f"{name}: {prose(text, limit)}" if text else name


def message(exc: BaseException) -> str:
    """`str(EXC)` as it is, or its type's name when that is empty; `error(EXC)` when
    `str(EXC)` raises."""
    try:
        text = str(exc)
    except Exception:
        return error(exc)
    return text or prose(type(exc).__name__, 80)


_SHELL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", "'": "\\'"}


def shell(word: str) -> str:
    """WORD as one word of a shell command to copy: bare when it needs no quoting, else in
    single quotes (shlex.quote). One holding what cannot be printed (a carriage return, a
    byte that is not UTF-8, as os.fsdecode gives it) is written $'...' with that escaped, as
    bash, zsh, ksh and busybox's sh read it: printed raw, it would break the message's line
    and never be copied right."""
    if word.isprintable():
        return shlex.quote(word)
    out = []
    for c in word:
        n = ord(c)
        if c in _SHELL_ESCAPES:
            out.append(_SHELL_ESCAPES[c])
        elif c.isprintable():
            out.append(c)
        elif 0xDC80 <= n <= 0xDCFF:  # surrogateescape: the byte itself
            out.append(f"\\x{n - 0xDC00:02x}")
        else:
            out.append(f"\\x{n:02x}" if n < 0x80 else f"\\u{n:04x}" if n < 0x10000
                       else f"\\U{n:08x}")
    return "$'" + "".join(out) + "'"


# A URL's scheme and authority up to the last "@" before its path, query or fragment: the
# user info (RFC 3986 3.2.1), a raw "@" in a password included, as urlsplit takes it. Not
# urlsplit itself: the URLs sit inside messages, and some (an "http://[::1" botocore refused)
# do not parse.
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/?#]*@")


def without_userinfo(text: str) -> str:
    """TEXT with the user name and password of each URL in it replaced by ***."""
    return _USERINFO.sub(r"\1***@", text) if "@" in text else text
