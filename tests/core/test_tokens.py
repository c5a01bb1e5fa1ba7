import base64
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tunnel.core.tokens import (
    TOKEN_LENGTH,
    TokenSet,
    crc16_ccitt_false,
    format_token,
    new_token,
    parse_token_file,
    validate_token,
)
from tunnel.errors import ConfigError, TokenError

secrets32 = st.binary(min_size=32, max_size=32)
B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

TOKEN = format_token(bytes(range(32)))


def _crc16_bitwise(data):
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


# --- CRC --------------------------------------------------------------------------------------


def test_crc16_check_value():
    assert crc16_ccitt_false(b"123456789") == 0x29B1


def test_crc16_known_values():
    assert crc16_ccitt_false(b"") == 0xFFFF
    assert crc16_ccitt_false(b"A") == 0xB915


@given(st.binary())
def test_crc16_matches_bitwise_definition(data):
    assert crc16_ccitt_false(data) == _crc16_bitwise(data)


# --- format -----------------------------------------------------------------------------------


@given(secrets32)
def test_format_token_layout(secret):
    token = format_token(secret)
    assert len(token) == TOKEN_LENGTH == 47
    assert token[0] == "v"
    raw = base64.urlsafe_b64decode(token[1:] + "==")
    assert raw[:32] == secret
    assert raw[32:] == crc16_ccitt_false(secret).to_bytes(2, "big")
    assert "=" not in token


@given(secrets32)
def test_token_round_trip(secret):
    token = format_token(secret)
    assert validate_token(token) == token
    assert validate_token(f" \t{token}\r\n") == token


@pytest.mark.parametrize("bad", [b"", b"x" * 31, b"x" * 33, "x" * 32])
def test_format_token_rejects_wrong_secret(bad):
    with pytest.raises(ValueError):
        format_token(bad)


def test_new_token_is_valid_and_fresh():
    tokens = {new_token() for _ in range(20)}
    assert len(tokens) == 20
    for token in tokens:
        assert validate_token(token) == token


# --- validation -------------------------------------------------------------------------------


def _with_char(token, index, char):
    return token[:index] + char + token[index + 1 :]


def _other_char(char):
    return "A" if char != "A" else "B"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "must be 47 characters, got 0"),
        (TOKEN[:-1], "must be 47 characters, got 46"),
        (TOKEN + "A", "must be 47 characters, got 48"),
        (TOKEN + "==", "must be 47 characters, got 49"),
        ("w" + TOKEN[1:], "must start with 'v'"),
        ("V" + TOKEN[1:], "must start with 'v'"),
        (_with_char(TOKEN, 10, "+"), "is not base64url"),
        (_with_char(TOKEN, 10, "/"), "is not base64url"),
        (_with_char(TOKEN, 10, "="), "is not base64url"),
        (_with_char(TOKEN, 10, " "), "is not base64url"),
        (_with_char(TOKEN, 10, "é"), "is not base64url"),
        (_with_char(TOKEN, 10, _other_char(TOKEN[10])), "checksum mismatch"),
        (_with_char(TOKEN, 45, _other_char(TOKEN[45])), "checksum mismatch"),
    ],
)
def test_validate_token_says_what_is_wrong(text, fragment):
    with pytest.raises(TokenError, match=re.escape(fragment)):
        validate_token(text)


def test_validate_token_rejects_non_canonical_trailing_bits():
    # The last of 46 base64 characters carries 2 bits of the CRC and 4 spare bits.
    last = TOKEN[-1]
    index = B64URL.index(last)
    assert index % 16 == 0
    with pytest.raises(TokenError, match="is not base64url"):
        validate_token(TOKEN[:-1] + B64URL[index + 1])


@pytest.mark.parametrize("index", [1, 20, 46])
def test_error_messages_never_contain_the_token(index):
    bad = _with_char(TOKEN, index, _other_char(TOKEN[index]))
    with pytest.raises(TokenError) as info:
        validate_token(bad)
    message = str(info.value)
    assert bad not in message
    assert bad[1:20] not in message


def test_token_error_is_a_config_error():
    assert issubclass(TokenError, ConfigError)


@given(st.text())
def test_validate_any_text_gives_token_or_token_error(text):
    try:
        token = validate_token(text)
    except TokenError:
        return
    assert token == text.strip()


@given(st.text(alphabet="v" + B64URL + "=+/ ", min_size=45, max_size=49))
def test_validate_token_like_text(text):
    try:
        token = validate_token(text)
    except TokenError as exc:
        if len(text.strip()) >= 10:
            assert text.strip() not in str(exc)
        return
    raw = base64.urlsafe_b64decode(token[1:] + "==")
    assert format_token(raw[:32]) == token


@given(secrets32, st.integers(min_value=1, max_value=46), st.sampled_from(B64URL))
def test_any_single_substitution_is_caught(secret, index, char):
    token = format_token(secret)
    bad = _with_char(token, index, char)
    if bad == token:
        return
    with pytest.raises(TokenError):
        validate_token(bad)


# --- token files ------------------------------------------------------------------------------


def test_parse_token_file():
    a, b, c = (format_token(bytes([i]) * 32) for i in range(3))
    text = f"# tokens\n\n{a}\n  {b}   # laptop\n#{c}\n\t{c}\n\n"
    assert parse_token_file(text, source="tokens.txt") == (a, b, c)


def test_parse_token_file_empty():
    assert parse_token_file("", source="t") == ()
    assert parse_token_file("# nothing\n\n   \n", source="t") == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{TOKEN}\nshort\n", "tokens.txt:2: auth token must be 47 characters, got 5"),
        (f"# c\n\n{TOKEN} {TOKEN}\n", "tokens.txt:3: auth token must be 47 characters, got 95"),
        ("w" + TOKEN[1:] + "  # c\n", "tokens.txt:1: auth token must start with 'v'"),
        (
            f"{TOKEN}\n{_with_char(TOKEN, 3, _other_char(TOKEN[3]))}\n",
            "tokens.txt:2: auth token checksum mismatch",
        ),
    ],
)
def test_parse_token_file_errors(text, message):
    with pytest.raises(TokenError) as info:
        parse_token_file(text, source="tokens.txt")
    assert str(info.value).startswith(message)
    assert TOKEN not in str(info.value)


@given(st.lists(secrets32, max_size=5), st.lists(st.sampled_from(["", "# x", "  "]), max_size=3))
def test_token_file_round_trip(secrets_list, extra):
    tokens = [format_token(s) for s in secrets_list]
    text = "\n".join(extra + [f"{t}  # device {i}" for i, t in enumerate(tokens)] + extra)
    assert parse_token_file(text, source="t") == tuple(tokens)


@given(st.text())
def test_parse_token_file_any_text(text):
    try:
        tokens = parse_token_file(text, source="t")
    except TokenError as exc:
        assert str(exc).startswith("t:")
        return
    assert all(validate_token(t) == t for t in tokens)


# --- token sets -------------------------------------------------------------------------------


def test_token_set_membership():
    a, b, c = (format_token(bytes([i]) * 32) for i in range(3))
    tokens = TokenSet([a, b])
    assert a in tokens
    assert b in tokens
    assert c not in tokens
    assert len(tokens) == 2


def test_token_set_membership_is_exact():
    tokens = TokenSet([TOKEN])
    assert TOKEN in tokens
    assert f" {TOKEN}" not in tokens
    assert TOKEN.upper() not in tokens
    assert "" not in tokens
    assert None not in tokens
    assert TOKEN.encode() not in tokens
    assert "\ud800" not in tokens  # a lone surrogate cannot break hashing


def test_empty_token_set_accepts_nothing():
    tokens = TokenSet([])
    assert len(tokens) == 0
    assert TOKEN not in tokens
    assert len(TokenSet()) == 0


def test_token_set_validates_and_deduplicates():
    assert len(TokenSet([TOKEN, f"  {TOKEN}\n", TOKEN])) == 1
    with pytest.raises(TokenError):
        TokenSet([TOKEN, "nope"])


def test_token_set_accepts_any_iterable():
    tokens = TokenSet(format_token(bytes([i]) * 32) for i in range(4))
    assert len(tokens) == 4
    assert format_token(bytes([3]) * 32) in tokens


def test_token_set_repr_hides_tokens():
    tokens = TokenSet([TOKEN])
    assert TOKEN not in repr(tokens)
    assert "1" in repr(tokens)


def test_token_set_compares_every_digest(monkeypatch):
    # No early exit: membership costs one comparison per stored token, whichever matched.
    import tunnel.core.tokens as module

    tokens_list = [format_token(bytes([i]) * 32) for i in range(5)]
    tokens = TokenSet(tokens_list)
    calls = []
    real = module.hmac.compare_digest

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(module.hmac, "compare_digest", counting)
    for candidate in [*tokens_list, TOKEN]:
        calls.clear()
        candidate in tokens  # noqa: B015
        assert len(calls) == 5


@given(st.lists(secrets32, max_size=6), secrets32)
def test_token_set_agrees_with_a_plain_set(secrets_list, probe):
    tokens = [format_token(s) for s in secrets_list]
    token_set = TokenSet(tokens)
    assert len(token_set) == len(set(tokens))
    for token in tokens:
        assert token in token_set
    assert (format_token(probe) in token_set) == (format_token(probe) in set(tokens))
