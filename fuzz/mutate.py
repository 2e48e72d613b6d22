"""Mutators shared by the targets: havoc on bytes, line- and token-level changes on text.

Everything draws from the `random.Random` it is given, so a seed replays a run exactly.
"""

from __future__ import annotations

import random
import struct

# Values that sit on the edges parsers get wrong: zero, sign bits, all ones, off-by-one.
_INTERESTING_U8 = (0, 1, 0x7F, 0x80, 0xFF)
_INTERESTING_U16 = (0, 1, 0x20, 0x7FFF, 0x8000, 0xFFFF, 1280, 1420, 65535)
_INTERESTING_U32 = (0, 1, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0x10000, 65536)

# Scalars that tend to break text formats (YAML, JSON, UAPI values).
TEXT_VALUES = (
    "", " ", "0", "-0", "-1", "1", "65535", "65536", "4294967294", "4294967295",
    "4294967296", "18446744073709551616", "9" * 40, "1e999", "-1e999", "nan", ".inf", "0x10",
    "0o17", "1_000", "true", "false", "null", "~", "yes", "no", "[]", "{}", "[", "{", "]", "}",
    "&a", "*a", "*b", "!!binary", "!!python/object:os.system", "!!set", "? ", ": ", "- ", "'",
    '"', "\\", "\t", "\r", "\0", "\x7f", "\u00e9", "\u202e", "\U0001f600", "\ufffd",
    "::", "::/0", "0.0.0.0/0", "0.0.0.0/33", "10.0.0.1", "10.0.0.1/30", "fd00::1/126",
    "[::1]:1", "1.2.3.4:5", "/", "/tmp/x", "ssm:", "ssm:x", "a" * 300, "%s%n", "${HOME}",
)


def _pos(rng: random.Random, n: int) -> int:
    return rng.randrange(n) if n else 0


def havoc(rng: random.Random, data: bytes, *, max_len: int = 4096,
          pool: tuple[bytes, ...] = ()) -> bytes:
    """1-8 stacked byte-level mutations, as AFL's havoc stage does. `pool` feeds splices."""
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 2, 3, 4, 8))):
        n = len(b)
        op = rng.randrange(12)
        if op == 0 and n:  # flip one bit
            b[_pos(rng, n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:  # random byte
            b[_pos(rng, n)] = rng.randrange(256)
        elif op == 2 and n:
            b[_pos(rng, n)] = rng.choice(_INTERESTING_U8)
        elif op == 3 and n >= 2:
            fmt = rng.choice(("<H", ">H"))
            i = rng.randrange(n - 1)
            b[i:i + 2] = struct.pack(fmt, rng.choice(_INTERESTING_U16))
        elif op == 4 and n >= 4:
            fmt = rng.choice(("<I", ">I"))
            i = rng.randrange(n - 3)
            b[i:i + 4] = struct.pack(fmt, rng.choice(_INTERESTING_U32))
        elif op == 5 and n:  # delete a range
            i = _pos(rng, n)
            del b[i:i + rng.randint(1, max(1, min(n - i, 32)))]
        elif op == 6:  # insert random bytes
            i = _pos(rng, n + 1)
            b[i:i] = rng.randbytes(rng.randint(1, 16))
        elif op == 7 and n:  # duplicate a range
            i = _pos(rng, n)
            j = min(n, i + rng.randint(1, 64))
            k = _pos(rng, n + 1)
            b[k:k] = b[i:j]
        elif op == 8 and n:  # truncate
            del b[rng.randrange(n):]
        elif op == 9:  # append random bytes
            b += rng.randbytes(rng.randint(1, 32))
        elif op == 10 and pool:  # splice in part of another sample
            other = rng.choice(pool)
            if other:
                i = rng.randrange(len(other))
                piece = other[i:i + rng.randint(1, 64)]
                k = _pos(rng, n + 1)
                b[k:k + len(piece)] = piece
        elif op == 11 and n:  # add or subtract a small number at a byte
            i = _pos(rng, n)
            b[i] = (b[i] + rng.randint(-35, 35)) & 0xFF
    return bytes(b[:max_len])


def random_bytes(rng: random.Random, max_len: int = 300) -> bytes:
    # Short inputs are the interesting ones for headers; a long tail still gets tried.
    n = rng.choice((rng.randrange(8), rng.randrange(64), rng.randrange(max_len + 1)))
    return rng.randbytes(n)


def mutate_text(rng: random.Random, text: str, *, values: tuple[str, ...] = TEXT_VALUES,
                max_len: int = 1 << 16) -> str:
    """1-4 stacked line, token or byte changes to `text`."""
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        lines = text.split("\n")
        op = rng.randrange(10)
        i = _pos(rng, len(lines))
        if op == 0 and len(lines) > 1:  # delete a line
            del lines[i]
        elif op == 1:  # duplicate a line somewhere
            lines.insert(_pos(rng, len(lines) + 1), lines[i])
        elif op == 2 and len(lines) > 1:  # swap two lines
            j = _pos(rng, len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op in (3, 4, 5):  # replace the value after "key:" / "key=" / a token
            line = lines[i]
            sep = max(line.find(": "), line.find("="))
            new = rng.choice(values)
            if sep >= 0 and rng.random() < 0.7:
                lines[i] = line[: sep + (2 if line[sep] == ":" else 1)] + new
            else:
                words = line.split(" ")
                words[_pos(rng, len(words))] = new
                lines[i] = " ".join(words)
        elif op == 6:  # change the indentation
            lines[i] = " " * rng.choice((0, 1, 2, 3, 4, 8)) + lines[i].lstrip(" ")
        elif op == 7:  # insert a new line made of tokens
            lines.insert(i, " ".join(rng.choice(values) for _ in range(rng.randint(1, 3))))
        elif op == 8:  # blow one line up
            lines[i] = lines[i] * rng.randint(2, 50)
        else:  # byte-level havoc, decoded back leniently
            raw = havoc(rng, "\n".join(lines).encode("utf-8", "surrogatepass"), max_len=max_len)
            lines = raw.decode("utf-8", "replace").split("\n")
        text = "\n".join(lines)
    return text[:max_len]
