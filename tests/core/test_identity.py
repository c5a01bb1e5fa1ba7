import base64
import re

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.identity import (
    Identity,
    decode_public_id,
    encode_public_id,
    format_key_file,
    parse_key_file,
    verify_signature,
)
from tunnel.errors import ConfigError, InvalidPublicId, KeyFileError

SEED = bytes(range(32))
# RFC 8032 test 1: secret key (seed) and public key.
RFC8032_SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")
RFC8032_PUBLIC = bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
RFC8032_SIGNATURE = bytes.fromhex(
    "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e06522490155"
    "5fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
)

keys = st.binary(min_size=32, max_size=32)


# --- public IDs -------------------------------------------------------------------------------


@given(keys)
def test_public_id_round_trip(key):
    text = encode_public_id(key)
    assert len(text) == 52
    assert re.fullmatch(r"[a-z2-7]{52}", text)
    assert decode_public_id(text) == key
    assert decode_public_id(text.upper()) == key
    assert decode_public_id(f"  {text}\n") == key


def test_public_id_is_unpadded_rfc4648_base32():
    assert encode_public_id(RFC8032_PUBLIC) == (
        base64.b32encode(RFC8032_PUBLIC).decode().rstrip("=").lower()
    )


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "a" * 32])
def test_encode_public_id_rejects_wrong_size(bad):
    with pytest.raises(ValueError):
        encode_public_id(bad)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must be 52 characters, got 0"),
        ("a" * 51, "must be 52 characters, got 51"),
        ("a" * 53, "must be 52 characters, got 53"),
        ("a" * 56, "must be 52 characters, got 56"),
        ("a" * 51 + "1", "is not base32"),
        ("a" * 51 + "=", "is not base32"),
        ("a" * 51 + "é", "is not base32"),
        ("a" * 25 + " " + "a" * 26, "is not base32"),
        # the last character carries 1 bit of the key and 4 spare bits that must be zero
        ("a" * 51 + "b", "not decode to 32 bytes"),
    ],
)
def test_decode_public_id_says_what_is_wrong(text, fragment):
    with pytest.raises(InvalidPublicId, match=re.escape(fragment)):
        decode_public_id(text)


def test_invalid_public_id_is_a_config_error():
    assert issubclass(InvalidPublicId, ConfigError)


@given(st.text())
def test_decode_public_id_any_text_gives_key_or_invalid_public_id(text):
    try:
        key = decode_public_id(text)
    except InvalidPublicId:
        return
    assert len(key) == 32
    assert encode_public_id(key) == text.strip().lower()


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ234567 \t\n"))
def test_decode_public_id_base32_like_text(text):
    try:
        key = decode_public_id(text)
    except InvalidPublicId:
        return
    assert encode_public_id(key) == text.strip().lower()


# --- identities -------------------------------------------------------------------------------


def test_rfc8032_vector():
    identity = Identity.from_seed(RFC8032_SEED)
    assert identity.public_key == RFC8032_PUBLIC
    assert identity.public_id == encode_public_id(RFC8032_PUBLIC)
    assert identity.sign(b"") == RFC8032_SIGNATURE
    assert verify_signature(RFC8032_PUBLIC, b"", RFC8032_SIGNATURE)


def test_generate_gives_distinct_identities():
    a, b = Identity.generate(), Identity.generate()
    assert a.seed != b.seed
    assert a.public_key != b.public_key
    assert len(a.seed) == 32 and len(a.public_key) == 32


def test_repr_hides_the_seed():
    identity = Identity.from_seed(SEED)
    text = repr(identity)
    assert identity.public_id in text
    assert SEED.hex() not in text
    assert repr(SEED) not in text
    assert base64.b32encode(SEED).decode().rstrip("=").lower() not in text
    assert "seed" not in text.lower()


def test_identity_is_frozen_and_compares_by_seed():
    identity = Identity.from_seed(SEED)
    assert identity == Identity.from_seed(SEED)
    assert hash(identity) == hash(Identity.from_seed(SEED))
    assert identity != Identity.from_seed(bytes(32))
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        identity.seed = bytes(32)


@pytest.mark.parametrize("seed", [b"", b"x" * 31, b"x" * 33, "x" * 32, bytearray(32)])
def test_from_seed_rejects_wrong_seed(seed):
    with pytest.raises(ValueError):
        Identity.from_seed(seed)


@given(keys, st.binary())
def test_sign_then_verify(seed, message):
    identity = Identity.from_seed(seed)
    signature = identity.sign(message)
    assert len(signature) == 64
    assert verify_signature(identity.public_key, message, signature)
    assert not verify_signature(identity.public_key, message + b"x", signature)
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert not verify_signature(identity.public_key, message, tampered)


def test_verify_rejects_another_key():
    message = b"hello"
    signature = Identity.from_seed(SEED).sign(message)
    assert not verify_signature(Identity.from_seed(bytes(32)).public_key, message, signature)


@pytest.mark.parametrize(
    ("public_key", "message", "signature"),
    [
        (RFC8032_PUBLIC[:31], b"", RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, b"", RFC8032_SIGNATURE[:63]),
        (RFC8032_PUBLIC, b"", RFC8032_SIGNATURE + b"\0"),
        (None, b"", RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, None, RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, "", RFC8032_SIGNATURE),
        (RFC8032_PUBLIC, b"", None),
        (RFC8032_PUBLIC.hex(), b"", RFC8032_SIGNATURE),
        # small-order point (the identity element): libsodium refuses it
        (bytes([1]) + bytes(31), b"", bytes(64)),
        (bytes(32), b"", bytes(64)),
    ],
)
def test_verify_bad_input_is_false(public_key, message, signature):
    assert verify_signature(public_key, message, signature) is False


@given(st.binary(), st.binary(), st.binary())
def test_verify_never_raises(public_key, message, signature):
    assert verify_signature(public_key, message, signature) is False


@given(keys, st.binary(min_size=64, max_size=64), st.binary(max_size=64))
def test_verify_random_signature_never_raises(public_key, signature, message):
    assert verify_signature(public_key, message, signature) is False


# --- key files --------------------------------------------------------------------------------


def test_key_file_format():
    text = format_key_file(Identity.from_seed(SEED))
    lines = text.splitlines()
    assert lines[0].startswith("# ")
    assert "0600" in lines[0]
    assert lines[1] == "ed25519-seed " + base64.b32encode(SEED).decode().rstrip("=").lower()
    assert len(lines) == 2
    assert text.endswith("\n")


@given(keys)
def test_key_file_round_trip(seed):
    identity = Identity.from_seed(seed)
    assert parse_key_file(format_key_file(identity), source="k") == identity


def test_key_file_accepts_comments_blank_lines_and_spacing():
    seed_text = base64.b32encode(SEED).decode().rstrip("=")
    text = f"\n# a comment\n   \n  # indented comment\n\ted25519-seed   {seed_text}  \r\n\n"
    assert parse_key_file(text, source="k").seed == SEED


SEED_TEXT = base64.b32encode(SEED).decode().rstrip("=").lower()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "id.key: no ed25519-seed line"),
        ("# only a comment\n\n", "id.key: no ed25519-seed line"),
        (
            f"ed25519-seed {SEED_TEXT}\n\ned25519-seed {SEED_TEXT}\n",
            "id.key:3: second ed25519-seed line (the first is on line 1)",
        ),
        (f"ed25519-sed {SEED_TEXT}\n", "id.key:1: unknown line"),
        (f"{SEED_TEXT}\n", "id.key:1: unknown line"),
        (f"# c\nED25519-SEED {SEED_TEXT}\n", "id.key:2: unknown line"),
        ("ed25519-seed\n", "id.key:1: expected 'ed25519-seed <base32 seed>', got 1 words"),
        (f"ed25519-seed {SEED_TEXT} x\n", "id.key:1: expected 'ed25519-seed <base32 seed>'"),
        (f"ed25519-seed {SEED_TEXT[:-1]}\n", "id.key:1: ed25519-seed must be 52 characters"),
        (f"ed25519-seed {SEED_TEXT}aaaa\n", "id.key:1: ed25519-seed must be 52 characters"),
        (f"ed25519-seed {SEED_TEXT[:-1]}1\n", "id.key:1: ed25519-seed is not base32"),
        (f"ed25519-seed {SEED.hex()}\n", "id.key:1: ed25519-seed must be 52 characters, got 64"),
    ],
)
def test_key_file_errors_name_source_and_problem(text, message):
    with pytest.raises(KeyFileError) as info:
        parse_key_file(text, source="id.key")
    assert str(info.value).startswith(message)
    assert SEED_TEXT not in str(info.value)


def test_key_file_error_is_a_config_error():
    assert issubclass(KeyFileError, ConfigError)


@given(st.text())
def test_parse_key_file_any_text_gives_identity_or_key_file_error(text):
    try:
        identity = parse_key_file(text, source="k")
    except KeyFileError as exc:
        assert str(exc).startswith("k:")
        return
    assert isinstance(identity, Identity)


@given(
    st.lists(
        st.one_of(
            st.just("ed25519-seed"),
            st.just(f"ed25519-seed {SEED_TEXT}"),
            st.just("# comment"),
            st.just(""),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz234567- \t#"),
        ),
        max_size=6,
    )
)
def test_parse_key_file_structured_garbage(lines):
    try:
        identity = parse_key_file("\n".join(lines), source="k")
    except KeyFileError:
        return
    assert isinstance(identity, Identity)
