"""Targets `control-parent` and `control-enclave`: hostile peers on the control channel.

`control-parent` runs a real ControlServer in this process on a Unix socket in a private
directory, with a constant nonce so that inputs can echo it and get past the nonce check, and
plays a hostile enclave: each input is the whole byte stream one connection sends. Whatever
the stream, the server must answer with well-formed frames only and end the connection without
an exception escaping its thread, and what it does must follow from the first message as
`read_messages` reads it: a register whose fields all parse but whose nonce is not this
connection's (a replay) is refused without asking the verifier; with the right nonce the
verifier is asked about exactly the register's key, document and the nonce, and the key it
accepts is the one installed, before a welcome; anything else gets no answer at all.

`control-enclave` plays a hostile parent over a socketpair: the input is what the parent
sends; the enclave runs register() and, once welcomed, hold_connection(). ControlError and
OSError are what the enclave's caller expects; anything else is a crash. What it does must
follow from the input as `read_messages` reads it: without a challenge carrying a 32-byte
nonce it neither attests nor sends anything; with one, it has exactly attested_nonce(that
nonce) and its own key attested (never the nonce itself, which the parent chose) and sends a
register echoing the nonce with that key and document (an enclave
attesting or echoing any other nonce would make a recorded registration replayable); it
accepts exactly a well-formed welcome as the next message, and then sends only pings.
"""

from __future__ import annotations

import base64
import contextlib
import json
import random
import socket
import struct
import threading
from pathlib import Path
from typing import Any

from wgvsock.services.control import (
    MAX_MESSAGE,
    NONCE_LEN,
    ControlError,
    ControlServer,
    Verdict,
    Welcome,
    attested_nonce,
    hold_connection,
    register,
)
from wgvsock.services.control import log as control_log

from .harness import Hang, Target, quiet
from .mutate import TEXT_VALUES, havoc, mutate_text, random_bytes

NONCE = bytes(range(NONCE_LEN))
ENCLAVE_KEY = b"\x05" * 32
KEYS = ("v", "type", "nonce", "public_key", "attestation", "wg_port", "attested", "reason",
        "profile")
TYPES = ("challenge", "register", "welcome", "refused", "ping", "", "REGISTER", "x" * 100)
PEER_TIMEOUT = 5.0  # the fuzzer's wait for the other side to finish; the exchange's is 1 s less
_LEN = struct.Struct(">I")


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def random_json(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice((
            None, True, False, 0, 1, -1, 2**32, 2**64, 10**400, 1.5, float("inf"),
            rng.choice(TEXT_VALUES), b64(rng.randbytes(rng.choice((0, 31, 32, 33, 100)))),
            rng.choice(TYPES),
        ))
    if r < 0.75:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice((*KEYS, "")): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def bad_b64(rng: random.Random, good: str) -> Any:
    return rng.choice((
        good[:-1], good + "=", good + "A", " " + good, good.replace("+", "-"), good.upper(),
        b64(rng.randbytes(rng.choice((0, 1, 31, 33, 64)))), "====", "\u00e9" * 4, 0, None, [good],
        random_json(rng),
    ))


def mutate_message(rng: random.Random, msg: dict[str, Any]) -> dict[str, Any]:
    msg = dict(msg)
    for _ in range(rng.randint(1, 3)):
        r = rng.random()
        key = rng.choice(list(msg) or ["v"])
        if r < 0.2:
            msg.pop(key, None)
        elif r < 0.45 and isinstance(msg.get(key), str):
            msg[key] = bad_b64(rng, msg[key])
        elif r < 0.6:
            msg["v"] = rng.choice((0, 2, "1", 1.0, True, None, [1]))
        elif r < 0.7:
            msg["type"] = rng.choice((*TYPES, None, 1, ["register"]))
        else:
            msg[rng.choice(KEYS)] = random_json(rng)
    return msg


def encode_stream(rng: random.Random, messages: list[dict[str, Any]]) -> bytes:
    """Frames the messages, sometimes with broken JSON, lengths or bytes."""
    out = bytearray()
    for msg in messages:
        body = json.dumps(msg, separators=(",", ":"), allow_nan=True).encode()
        r = rng.random()
        if r < 0.1:
            body = mutate_text(rng, body.decode(), max_len=4096).encode("utf-8", "surrogatepass")
        elif r < 0.15:
            body = rng.choice((b"", b"[]", b"1", b'"x"', b"[" * 5000, b"\xff\xfe", b"{" * 100,
                               b'{"v":1,"type":"ping"}' * 2, b"\x00" * 10))
        if r > 0.97:  # a length that lies
            out += _LEN.pack(rng.choice((0, len(body) + 1, max(0, len(body) - 1), MAX_MESSAGE + 1,
                                         2**32 - 1))) + body
        else:
            out += frame(body)
    if rng.random() < 0.1:
        return havoc(rng, bytes(out), max_len=100_000)
    return bytes(out)


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    """What one of our own sides sent: it must be whole, well-formed frames."""
    out = []
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 4, "a truncated frame header"
        (n,) = _LEN.unpack_from(data, pos)
        assert 0 < n <= MAX_MESSAGE, f"frame length {n}"
        body = data[pos + 4:pos + 4 + n]
        assert len(body) == n, "a truncated frame"
        msg = json.loads(body)
        assert isinstance(msg, dict) and msg.get("v") == 1, f"bad message {body[:100]!r}"
        out.append(msg)
        pos += 4 + n
    return out


def read_messages(data: bytes, limit: int, any_version: bool = False) -> list[dict[str, Any]]:
    """The first `limit` messages at the start of `data` that the receiving side accepts (the
    rules of control.read_message: a length of 1..MAX_MESSAGE, a whole body, a JSON object, an
    integer version 1 (ANY_VERSION: 1..2**31-1) and a string type), up to the first it does
    not."""
    out: list[dict[str, Any]] = []
    pos = 0
    while len(data) - pos >= 4 and len(out) < limit:
        (n,) = _LEN.unpack_from(data, pos)
        body = data[pos + 4:pos + 4 + n]
        if not 0 < n <= MAX_MESSAGE or len(body) < n:
            break
        try:
            msg = json.loads(body)
        except (ValueError, RecursionError):
            break
        if not (isinstance(msg, dict) and type(msg.get("v")) is int
                and (msg["v"] == 1 or (any_version and 0 < msg["v"] < 2**31))
                and isinstance(msg.get("type"), str)):
            break
        out.append(msg)
        pos += 4 + n
    return out


def strict_b64(value: object, length: int | None = None) -> bytes | None:
    """`value` decoded if it is base64 the control protocol takes (of `length` bytes), else
    None."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error, and non-ASCII text
        return None
    return raw if length is None or len(raw) == length else None


def registration(msg: dict[str, Any]) -> tuple[bytes, bytes, bytes | None] | None:
    """(nonce, public key, document or None) of a register whose fields all parse."""
    if msg.get("type") != "register":
        return None
    nonce = strict_b64(msg.get("nonce"), NONCE_LEN)
    key = strict_b64(msg.get("public_key"), 32)
    document = msg.get("attestation")
    raw = None if document is None else strict_b64(document)
    if nonce is None or key is None or (document is not None and raw is None):
        return None
    return nonce, key, raw


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise Hang(f"the other side neither finished nor closed in {PEER_TIMEOUT} s") from None
        if not chunk:
            return bytes(out)
        out += chunk
    return bytes(out)


class ControlParentTarget(Target):
    name = "control-parent"
    count = 20_000
    shard_size = 5_000

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        super().__init__(rng, workdir)
        self.escaped: list[str] = []
        self._quiet = quiet(control_log.name)
        self._quiet.__enter__()
        self._old_hook = threading.excepthook
        threading.excepthook = self._hook
        self.verified: list[tuple[bytes, bytes | None, bytes]] = []
        self.installed: list[bytes] = []
        self.path = str(workdir / "control.sock")
        with contextlib.suppress(FileNotFoundError):
            Path(self.path).unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(self.path)
        listener.listen(16)
        self.server = ControlServer(
            listener, profile="fuzz", public_key=b"\x07" * 32, wg_port=51820,
            verify=self._verify, install=self._install, rng=lambda n: NONCE[:n],
            timeout=PEER_TIMEOUT - 1,
            # Every input is a connection from this one process: the per-peer limit on
            # registrations would refuse nearly all of them before the verifier, which the
            # model checks is asked. The limit has tests of its own (tests/test_control.py).
            register_burst=1 << 30,
        )
        self.server.start()

    def close(self) -> None:
        self.server.close()
        threading.excepthook = self._old_hook
        self._quiet.__exit__(None, None, None)

    def _hook(self, args: threading.ExceptHookArgs) -> None:
        self.escaped.append(f"{args.exc_type.__name__}: {args.exc_value} in {args.thread}")

    @staticmethod
    def accepts(attestation: bytes | None) -> bool:
        """The fake verifier's decision: documents beginning 0x00 are refused, 0xFF ones make
        it raise, anything else (and no document) passes."""
        return not attestation or attestation[0] not in (0, 0xFF)

    def _verify(self, public_key: bytes, attestation: bytes | None, nonce: bytes) -> Verdict:
        # Recorded, not asserted here: the server turns a verifier's exception into a refusal.
        self.verified.append((public_key, attestation, nonce))
        if attestation and attestation[0] == 0xFF:
            raise RuntimeError("a verifier bug")  # the server must refuse, not die
        if not self.accepts(attestation):
            return Verdict(False, reason="attestation refused")
        # An odd first byte stands for a document that matched a pinned PCR0.
        return Verdict(True, attested=attestation is not None,
                       image_pinned=bool(attestation and attestation[0] & 1))

    def _install(self, public_key: bytes, verdict: Verdict) -> None:
        self.installed.append(public_key if verdict.accepted else b"not accepted")

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.1:
            return "random", random_bytes(rng, 400)
        nonce = NONCE
        r_nonce = rng.random()
        if r_nonce < 0.1:  # a replay: another connection's nonce
            nonce = rng.randbytes(NONCE_LEN)
        elif r_nonce < 0.2:  # one bit off
            bit = rng.randrange(8 * NONCE_LEN)
            nonce = (int.from_bytes(NONCE) ^ 1 << bit).to_bytes(NONCE_LEN)
        register_msg = {"v": 1, "type": "register", "nonce": b64(nonce),
                        "public_key": b64(rng.randbytes(32)),
                        "attestation": rng.choice((
                            None, b64(rng.randbytes(rng.randint(1, 64))),
                            # what the fake verifier refuses, and what makes it raise
                            b64(b"\x00" + rng.randbytes(8)), b64(b"\xff" + rng.randbytes(8))))}
        if r < 0.6:
            messages = [mutate_message(rng, register_msg)]
            kind = "register-mutated"
        elif r < 0.75:
            messages = [random_json(rng) for _ in range(rng.randint(1, 3))]
            kind = "json"
        else:
            messages = [register_msg]
            kind = "register-then"
        if rng.random() < 0.5:
            pings = [{"v": 1, "type": "ping"} for _ in range(rng.randint(1, 3))]
            messages += [mutate_message(rng, p) if rng.random() < 0.5 else p for p in pings]
        return kind, encode_stream(rng, messages)

    def run(self, data: bytes) -> None:
        self.escaped.clear()
        self.verified.clear()
        self.installed.clear()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(PEER_TIMEOUT)
            s.connect(self.path)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            reply = _read_all(s)
        # The server closes the socket before an escaping exception reaches the thread hook:
        # wait for its connection threads to end before looking.
        for t in threading.enumerate():
            if t.name.endswith("(_serve)"):
                t.join(PEER_TIMEOUT)
                if t.is_alive():
                    raise Hang("a control connection thread did not end")
        for text in self.escaped:
            raise AssertionError(f"exception escaped the control server: {text}")
        messages = parse_frames(reply)
        types = [m.get("type") for m in messages]
        assert types[:1] == ["challenge"], f"server began with {types[:1]}"
        assert messages[0]["nonce"] == b64(NONCE), "a challenge with another nonce"
        # The first message is read in any version: a refusal (an enclave that speaks no
        # version of this parent's) ends the exchange unanswered; another version than 1 is
        # answered with a refusal that names both.
        first = read_messages(data, 1, any_version=True)
        if first and first[0]["type"] == "refused":
            assert types == ["challenge"], f"{types} for an enclave's refusal"
            assert not self.verified and not self.installed, "verified or installed anyway"
            return
        if first and first[0]["v"] != 1:
            assert types == ["challenge", "refused"], f"{types} for version {first[0]['v']}"
            assert not self.verified and not self.installed, "verified or installed anyway"
            return
        reg = registration(first[0]) if first else None
        if reg is None:
            assert types == ["challenge"], f"{types} for a first message that is no register"
            assert not self.verified and not self.installed, "verified or installed anyway"
            return
        nonce, key, document = reg
        if nonce != NONCE:
            assert not self.verified, "a register with a wrong nonce went to the verifier"
            assert not self.installed, "a register with a wrong nonce was installed"
            assert types == ["challenge", "refused"], f"{types} for a wrong nonce"
            return
        assert self.verified == [(key, document, NONCE)], (
            "the verifier was not asked exactly once, about the register's key and document "
            f"and this connection's nonce ({len(self.verified)} calls)")
        if not self.accepts(document):
            assert not self.installed, "installed what the verifier refused"
            assert types == ["challenge", "refused"], f"{types} after the verifier refused"
            return
        assert self.installed == [key], (
            f"installed {[k.hex()[:16] for k in self.installed]}, registered {key.hex()[:16]}")
        assert types[:2] == ["challenge", "welcome"], f"{types} for an accepted enclave"
        assert set(types[2:]) <= {"ping"}, f"unexpected messages {types}"
        welcome = messages[1]
        assert (welcome.get("public_key"), welcome.get("wg_port"), welcome.get("attested"),
                welcome.get("attestation")) == (
            b64(b"\x07" * 32), 51820, document is not None,
            "unattested" if document is None
            else "attested" if document[:1] and document[0] & 1 else "genuine"), (
            f"welcome {welcome}")


class ControlEnclaveTarget(Target):
    name = "control-enclave"
    count = 20_000
    shard_size = 10_000
    allowed = (ControlError, OSError)

    def __init__(self, rng: random.Random, workdir: Path) -> None:
        super().__init__(rng, workdir)
        self._quiet = quiet(control_log.name)
        self._quiet.__enter__()

    def close(self) -> None:
        self._quiet.__exit__(None, None, None)

    def generate(self, rng: random.Random) -> tuple[str, bytes]:
        r = rng.random()
        if r < 0.1:
            return "random", random_bytes(rng, 400)
        challenge = {"v": 1, "type": "challenge", "nonce": b64(rng.randbytes(32)),
                     "profile": "fuzz"}
        answer: dict[str, Any] = rng.choice((
            {"v": 1, "type": "welcome", "public_key": b64(rng.randbytes(32)),
             "wg_port": rng.choice((51820, 1, 2**32 - 1)),
             "attested": rng.random() < 0.5 if rng.random() < 0.9 else rng.choice(
                 ("false", "true", 0, 1, None))},
            {"v": 1, "type": "refused", "reason": rng.choice(TEXT_VALUES)},
        ))
        if answer["type"] == "welcome" and rng.random() < 0.5:  # newer parents say the state
            answer["attestation"] = rng.choice(
                ("attested", "genuine", "debug", "unattested", "Genuine", 1, None,
                 rng.choice(TEXT_VALUES)))
        if r < 0.35:
            kind, messages = "challenge-mutated", [mutate_message(rng, challenge), answer]
        elif r < 0.75:
            kind, messages = "answer-mutated", [challenge, mutate_message(rng, answer)]
        elif r < 0.85:
            kind, messages = "json", [random_json(rng) for _ in range(rng.randint(1, 3))]
        else:
            kind, messages = "welcome-then", [challenge, answer]
        if rng.random() < 0.5:
            messages += [rng.choice(({"v": 1, "type": "ping"}, random_json(rng)))
                         for _ in range(rng.randint(1, 3))]
        return kind, encode_stream(rng, messages)

    @staticmethod
    def document(nonce: bytes, public_key: bytes) -> bytes | None:
        """The fake NSM's attestation: none for a quarter of the nonces (no NSM device), else
        bytes that name what was attested."""
        return None if nonce[0] < 64 else b"doc:" + nonce + public_key

    def run(self, data: bytes) -> None:
        attested: list[tuple[bytes, bytes]] = []

        def attest(nonce: bytes, public_key: bytes) -> bytes | None:
            attested.append((nonce, public_key))
            return self.document(nonce, public_key)

        parent, enclave = socket.socketpair()
        with parent, enclave:
            parent.settimeout(PEER_TIMEOUT)
            parent.sendall(data)
            parent.shutdown(socket.SHUT_WR)
            refusal: ControlError | None = None
            try:
                welcome = register(enclave, ENCLAVE_KEY, attest, timeout=PEER_TIMEOUT - 1)
            except ControlError as e:
                refusal = e
            else:
                why = hold_connection(enclave, threading.Event())
                assert isinstance(why, str)
            enclave.shutdown(socket.SHUT_WR)
            sent = parse_frames(_read_all(parent))

        # The challenge and the answer, read in any version: a challenge of any version whose
        # "versions" (else its own version) holds 1 is taken; one that does not is refused,
        # saying so to the parent; an answer that is no refusal must be of version 1.
        messages = read_messages(data, 2, any_version=True)
        nonce = None
        if messages and messages[0]["type"] == "challenge":
            versions = messages[0].get("versions")
            if not (isinstance(versions, list) and versions
                    and all(type(v) is int for v in versions)):
                versions = [messages[0]["v"]]
            if 1 not in versions:
                assert not attested, "attested for a parent of another version"
                assert [m.get("type") for m in sent] == ["refused"], (
                    f"{[m.get('type') for m in sent]} to a parent of versions {versions}")
                assert refusal is not None, "registered with a parent of another version"
                raise refusal
            nonce = strict_b64(messages[0].get("nonce"), NONCE_LEN)
        if nonce is None:
            assert not attested and not sent, "attested or sent without a challenge"
            assert refusal is not None, "registered without a challenge"
            raise refusal
        assert attested == [(attested_nonce(nonce), ENCLAVE_KEY)], (
            "attest was not called exactly once with the challenge's attested nonce and the "
            f"enclave's key ({len(attested)} calls)")
        document = self.document(attested_nonce(nonce), ENCLAVE_KEY)
        assert sent[:1] == [{"v": 1, "type": "register", "nonce": b64(nonce),
                             "public_key": b64(ENCLAVE_KEY),
                             "attestation": None if document is None else b64(document)}], (
            f"the register is not the challenge's nonce, the key and the document: {sent[:1]}")
        expected = messages[1] if len(messages) > 1 and messages[1]["v"] == 1 else {}
        parent_key = strict_b64(expected.get("public_key"), 32)
        port, verdict = expected.get("wg_port"), expected.get("attested")
        if (expected.get("type") != "welcome" or parent_key is None or type(port) is not int
                or not 0 < port < 2**32 or type(verdict) is not bool):
            assert refusal is not None, f"registered on a malformed welcome {str(expected)[:200]}"
            assert [m.get("type") for m in sent] == ["register"], "sent more after no welcome"
            raise refusal
        assert refusal is None, f"refused a well-formed welcome: {refusal}"
        # The state word, when it is one of the four; else what `attested` says (an older
        # parent's welcome has no state).
        state = expected.get("attestation")
        if state not in ("attested", "genuine", "debug", "unattested"):
            state = "attested" if verdict else "unattested"
        assert welcome == Welcome(parent_key, port, verdict, state), (
            f"{welcome} from {expected}")
        assert {m.get("type") for m in sent[1:]} == {"ping"}, "not only pings after the welcome"
