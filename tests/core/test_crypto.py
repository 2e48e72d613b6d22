"""Known answers for the primitives, from their specifications' own vectors."""

import hashlib
import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from wgvsock.core import crypto, noise

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
x = bytes.fromhex
KDF1_ANSWER = "5f3acb1d6f9bd7c78f08a82c21e0f6dba2c3843a670d2984b1adea58cfc77e75"


def test_keyed_blake2s_mac_and_hash_known_answers():
    # blake2s-kat.txt from the BLAKE2 reference: key 00..1f, inputs "" and "\x00".
    key = bytes(range(32))
    assert hashlib.blake2s(b"", key=key).hexdigest() == (
        "48a8997da407876b3d79c0d92325ad3b89cbb754d86ab71aee047ad345fd2c49"
    )
    assert hashlib.blake2s(b"\x00", key=key).hexdigest() == (
        "40d15fee7c328830166ac3f918650f807e7e01e177258cdc0a39b11f598066f1"
    )
    # RFC 7693 appendix B: BLAKE2s-256("abc").
    assert crypto.hash_(b"a", b"bc").hex() == (
        "508c5e8c327c14e2e1a72ba34eeb452f37458b209ed63a294d999b4c86675982"
    )
    assert len(crypto.mac(key, b"data")) == 16
    assert crypto.mac(key, b"data") == hashlib.blake2s(b"data", key=key, digest_size=16).digest()


def test_hchacha20_draft_vector():
    # draft-irtf-cfrg-xchacha-03 §2.2.1
    out = crypto.hchacha20(bytes(range(32)), x("000000090000004a0000000031415927"))
    assert out.hex() == "82413b4227b27bfed30e42508a877d73a0f9e4d58a74a853c12ec41326d3ecdc"


def test_xchacha20poly1305_draft_vector():
    # draft-irtf-cfrg-xchacha-03 appendix A.3.1
    pt = (
        b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for "
        b"the future, sunscreen would be it."
    )
    key = x("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
    nonce = x("404142434445464748494a4b4c4d4e4f5051525354555657")
    ad = x("50515253c0c1c2c3c4c5c6c7")
    expected = x(
        "bd6d179d3e83d43b9576579493c0e939572a1700252bfaccbed2902c21396cbb731c7f1b0b4aa6440bf3a8"
        "2f4eda7e39ae64c6708c54c216cb96b72e1213b4522f8c9ba40db5d945b11b69b982c1bb9e3f3fac2bc3"
        "69488f76b2383565d3fff921f9664c97637da9768812f615c68b13b52e"
        "c0875924c1c7987947deafd8780acf49"
    )
    assert crypto.xaead_encrypt(key, nonce, pt, ad) == expected
    assert crypto.xaead_decrypt(key, nonce, expected, ad) == pt
    tampered = bytearray(expected)
    tampered[3] ^= 1
    with pytest.raises(crypto.AEADError):
        crypto.xaead_decrypt(key, nonce, bytes(tampered), ad)
    with pytest.raises(crypto.AEADError):
        crypto.xaead_decrypt(key, nonce, expected, ad + b"x")


def test_kdf_is_hkdf_with_empty_info():
    # Noise's HKDF is RFC 5869 HKDF (salt = chaining key, empty info); check ours against
    # an independent implementation for all three output counts.
    ck, ikm = b"\x07" * 32, b"input key material"
    ref = HKDF(hashes.BLAKE2s(32), 96, salt=ck, info=b"").derive(ikm)
    assert crypto.kdf1(ck, ikm) == ref[:32]
    assert b"".join(crypto.kdf2(ck, ikm)) == ref[:64]
    assert b"".join(crypto.kdf3(ck, ikm)) == ref
    # A fixed answer, so a change in both implementations at once is still caught.
    assert crypto.kdf1(ck, ikm).hex() == ref[:32].hex() == KDF1_ANSWER


def test_aead_nonce_layout():
    key = b"k" * 32
    sealed = crypto.aead_encrypt(key, 5, b"hello", b"ad")
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    nonce = bytes(4) + (5).to_bytes(8, "little")
    assert sealed == ChaCha20Poly1305(key).encrypt(nonce, b"hello", b"ad")
    assert crypto.aead_decrypt(key, 5, sealed, b"ad") == b"hello"
    with pytest.raises(crypto.AEADError):
        crypto.aead_decrypt(key, 6, sealed, b"ad")


def test_keys_encodings_and_public_key():
    # RFC 7748 §6.1 X25519 key pair.
    priv = x("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    pub = x("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    assert crypto.public_key(priv) == pub
    assert crypto.key_from_base64(crypto.key_to_base64(pub)) == pub
    assert crypto.key_from_hex(crypto.key_to_hex(pub)) == pub
    gen = crypto.generate_private_key()
    assert gen[0] & 7 == 0 and gen[31] & 0xC0 == 0x40
    # Non-ASCII raised a bare ValueError whose context held the whole text (the key).
    for bad in ["", "abc", "A" * 43, crypto.key_to_base64(pub)[:-4] + "!!!=",
                "k\u00e9" + crypto.key_to_base64(pub)[2:]]:
        with pytest.raises(crypto.KeyFormatError) as e:
            crypto.key_from_base64(bad)
        assert e.value.__context__ is None or e.value.__suppress_context__
    # "00 00 " + 29 bytes is 64 characters that fromhex reads as 31 bytes.
    for bad in ["", "zz" * 32, "00" * 31, "00 00 " + "11" * 29]:
        with pytest.raises(crypto.KeyFormatError):
            crypto.key_from_hex(bad)


def test_dh_rejects_low_order_points():
    priv = crypto.generate_private_key()
    assert crypto.dh(priv, bytes(32)) is None
    assert crypto.dh(priv, (1).to_bytes(32, "little")) is None
    other = crypto.generate_private_key()
    assert crypto.dh(priv, crypto.public_key(other)) == crypto.dh(other, crypto.public_key(priv))


def test_tai64n_layout_and_order():
    t = crypto.tai64n(1_700_000_000.5)
    assert len(t) == 12
    assert int.from_bytes(t[:8], "big") == (1 << 62) + 10 + 1_700_000_000
    nanos = int.from_bytes(t[8:], "big")
    assert nanos % (1 << 24) == 0 and abs(nanos - 500_000_000) < (1 << 24)
    assert crypto.tai64n(1_700_000_001.0) > t


def test_noise_ikpsk2_known_answer_vector():
    v = json.loads((VECTORS / "noise-ikpsk2-25519-chachapoly-blake2s.json").read_text())["vector"]
    assert v["protocol_name"].encode() == noise.CONSTRUCTION
    msgs = v["messages"]
    r_pub = crypto.public_key(x(v["resp_static"]))
    psk = x(v["init_psks"][0])
    assert x(v["init_remote_static"]) == r_pub

    ck_i, h_i = noise.initial_state(x(v["init_prologue"]), r_pub)
    ck_i, h_i, e, enc_s, enc_p = noise.initiator_write(
        ck_i, h_i, x(v["init_ephemeral"]), x(v["init_static"]), r_pub, x(msgs[0]["payload"])
    )
    assert (e + enc_s + enc_p).hex() == msgs[0]["ciphertext"]

    ck_r, h_r = noise.initial_state(x(v["resp_prologue"]), r_pub)
    ck_r, h_r, i_pub, payload = noise.responder_read(
        ck_r, h_r, x(v["resp_static"]), e, enc_s, enc_p
    )
    assert payload == x(msgs[0]["payload"])
    assert i_pub == crypto.public_key(x(v["init_static"]))

    ck_r, h_r, re, enc = noise.responder_write(
        ck_r, h_r, x(v["resp_ephemeral"]), e, i_pub, psk, x(msgs[1]["payload"])
    )
    assert (re + enc).hex() == msgs[1]["ciphertext"]
    ck_i, h_i, payload = noise.initiator_read(
        ck_i, h_i, x(v["init_ephemeral"]), x(v["init_static"]), re, psk, enc
    )
    assert payload == x(msgs[1]["payload"])
    assert h_i.hex() == v["handshake_hash"] == h_r.hex()

    i_to_r, r_to_i = noise.split(ck_i)
    assert (i_to_r, r_to_i) == noise.split(ck_r)
    counters = {True: 0, False: 0}
    for n, m in enumerate(msgs[2:]):
        from_initiator = n % 2 == 0
        key = i_to_r if from_initiator else r_to_i
        sealed = crypto.aead_encrypt(key, counters[from_initiator], x(m["payload"]), b"")
        assert sealed.hex() == m["ciphertext"]
        counters[from_initiator] += 1


def test_noise_rejects_wrong_psk_and_tampering():
    v = json.loads((VECTORS / "noise-ikpsk2-25519-chachapoly-blake2s.json").read_text())["vector"]
    r_pub = crypto.public_key(x(v["resp_static"]))
    ck, h = noise.initial_state(b"p", r_pub)
    ck, h, e, enc_s, enc_p = noise.initiator_write(
        ck, h, x(v["init_ephemeral"]), x(v["init_static"]), r_pub, b"ts"
    )
    ck_r, h_r = noise.initial_state(b"p", r_pub)
    with pytest.raises(noise.HandshakeError):
        noise.responder_read(ck_r, h_r, x(v["resp_static"]), e, enc_s[:-1] + b"\x00", enc_p)
    with pytest.raises(noise.HandshakeError):
        noise.responder_read(ck_r, h_r, x(v["resp_static"]), bytes(32), enc_s, enc_p)
    ck_r, h_r, i_pub, _ = noise.responder_read(ck_r, h_r, x(v["resp_static"]), e, enc_s, enc_p)
    ck_r, h_r, re, enc = noise.responder_write(
        ck_r, h_r, x(v["resp_ephemeral"]), e, i_pub, b"a" * 32, b""
    )
    with pytest.raises(noise.HandshakeError):
        noise.initiator_read(ck, h, x(v["init_ephemeral"]), x(v["init_static"]), re, b"b" * 32, enc)


def test_responder_stops_at_an_unknown_initiator_before_the_static_dh():
    """As wireguard-go and the kernel: once the initiator's static key is decrypted and names
    no peer, reading stops. Before, a second X25519 was spent on it first, so a flood of
    initiations from unknown keys (mac1 needs only our public key) cost twice the work."""
    v = json.loads((VECTORS / "noise-ikpsk2-25519-chachapoly-blake2s.json").read_text())["vector"]
    r_pub = crypto.public_key(x(v["resp_static"]))
    ck, h = noise.initial_state(b"p", r_pub)
    _, _, e, enc_s, enc_p = noise.initiator_write(
        ck, h, x(v["init_ephemeral"]), x(v["init_static"]), r_pub, b"ts"
    )
    asked = []

    def unknown(key: bytes) -> None:
        asked.append(key)

    ck_r, h_r = noise.initial_state(b"p", r_pub)
    with pytest.raises(noise.HandshakeError):
        noise.responder_read(ck_r, h_r, x(v["resp_static"]), e, enc_s, enc_p, unknown)
    assert asked == [crypto.public_key(x(v["init_static"]))]
