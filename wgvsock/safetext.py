"""Text from the other side of a trust boundary, made fit for a log line, an error message or
a terminal.

An enclave's attestation document, a parent's refusal, a certificate's subject, an AWS error
body: each may carry line breaks (a forged log line after ours), terminal escapes (a cleared
screen, hidden text in the operator's terminal) or 64 KiB where a word was expected. Two forms,
one for each kind of value:

- `quote(value)`: a value (a type, a field, a number) as Python writes it, cut short.
- `prose(value)`: a sentence (a reason, a name) as it reads, with every control or otherwise
  unprintable character escaped, cut short.

Both keep the length of what was cut, so a log still shows that something was long.
"""

from __future__ import annotations

__all__ = ["prose", "quote"]


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def quote(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut at `limit` characters."""
    return _cut(_repr(value), limit)


def _repr(value: object) -> str:
    try:
        return repr(value)
    except ValueError:  # an int of more than 4300 digits (sys.set_int_max_str_digits)
        return f"<a {type(value).__name__} too large to show>"


def prose(value: object, limit: int = 300) -> str:
    """`value` (repr'd unless it is a str) with control characters, line breaks and other
    unprintable ones escaped as Python escapes them, cut at `limit` characters."""
    text = value if isinstance(value, str) else _repr(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return _cut(text, limit)
