"""Auth tokens, token files and a constant-time token set.

A token is ``v`` + base64url without padding of (32 random bytes + CRC16-CCITT-FALSE of those
bytes, big-endian): 47 characters, compatible with the reference system. The CRC catches
typos; the secrecy is in the 32 random bytes.

Tokens are secrets: no error message here ever quotes one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Iterable

from tunnel.errors import TokenError

__all__ = [
    "TOKEN_LENGTH",
    "TokenSet",
    "crc16_ccitt_false",
    "format_token",
    "new_token",
    "parse_token_file",
    "token_digest",
    "validate_token",
]

TOKEN_LENGTH = 47
"""Length in characters of a token."""

_SECRET_LENGTH = 32
_PREFIX = "v"
_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC16_TABLE = _crc16_table()


def crc16_ccitt_false(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of ``data``: poly 0x1021, init 0xFFFF, no reflection, xorout 0.

    The check value (CRC of ``b"123456789"``) is 0x29B1.
    """
    crc = 0xFFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _CRC16_TABLE[(crc >> 8) ^ byte]
    return crc


def format_token(secret: bytes) -> str:
    """Return the token text of a 32-byte secret; ValueError if it is not 32 bytes."""
    if not isinstance(secret, bytes) or len(secret) != _SECRET_LENGTH:
        raise ValueError(f"a token secret is {_SECRET_LENGTH} bytes")
    raw = secret + crc16_ccitt_false(secret).to_bytes(2, "big")
    return _PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def new_token() -> str:
    """Return a fresh random token."""
    return format_token(secrets.token_bytes(_SECRET_LENGTH))


def validate_token(text: str) -> str:
    """Return ``text`` stripped of surrounding whitespace if it is a well-formed token.

    Otherwise raise :class:`tunnel.errors.TokenError` (and nothing else, for any input) whose
    message says what is wrong, checked in this order: the length ("must be 47 characters, got
    N"), the prefix ("must start with 'v'"), the encoding ("is not base64url"), the checksum
    ("checksum mismatch"). The message never contains the token.
    """
    if not isinstance(text, str):
        raise TokenError(f"auth token must be a string, got {type(text).__name__}")
    token = text.strip()
    if len(token) != TOKEN_LENGTH:
        raise TokenError(f"auth token must be {TOKEN_LENGTH} characters, got {len(token)}")
    if not token.startswith(_PREFIX):
        raise TokenError(f"auth token must start with {_PREFIX!r}")
    body = token[len(_PREFIX) :]
    # urlsafe_b64decode silently drops characters outside the alphabet: check first.
    if not _B64URL_ALPHABET.issuperset(body):
        raise TokenError("auth token is not base64url (bad character)")
    try:
        raw = base64.urlsafe_b64decode(body + "==")
    except binascii.Error:  # pragma: no cover - 46 alphabet characters always decode
        raise TokenError("auth token is not base64url") from None
    # 46 characters carry 276 bits for 272: the spare bits must be zero so that a secret has
    # one spelling (the token set compares spellings).
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != body:
        raise TokenError("auth token is not base64url (non-zero trailing bits)")
    secret, crc = raw[:_SECRET_LENGTH], raw[_SECRET_LENGTH:]
    if crc16_ccitt_false(secret).to_bytes(2, "big") != crc:
        raise TokenError("auth token checksum mismatch (mistyped token?)")
    return token


def parse_token_file(text: str, *, source: str) -> tuple[str, ...]:
    """Parse a token file: one token a line, blank lines ignored, ``#`` starts a comment
    (full-line or inline).

    Returns the tokens in file order. Raises :class:`tunnel.errors.TokenError` naming
    ``source`` and the line number for any malformed token.
    """
    if not isinstance(text, str):
        raise TokenError(f"{source}: token file is not text")
    tokens = []
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        # '#' is not in the base64url alphabet, so it cannot be part of a token.
        line = raw_line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            tokens.append(validate_token(line))
        except TokenError as exc:
            raise TokenError(f"{source}:{lineno}: {exc}") from None
    return tuple(tokens)


def token_digest(token: str) -> bytes:
    """SHA-256 of a token, the only form in which tokens are kept."""
    # surrogatepass: any str can be hashed, even one that is not valid UTF-8.
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenSet:
    """An immutable set of accepted tokens with a constant-time membership test.

    Built from an iterable of tokens, each checked with :func:`validate_token` (so
    construction raises :class:`tunnel.errors.TokenError` for a malformed one). Only SHA-256
    digests are kept. ``token in tokenset`` compares the candidate's digest with every stored
    digest using :func:`hmac.compare_digest` and never exits early, so its timing does not
    depend on which token matched. An empty set accepts no token.
    """

    __slots__ = ("_digests",)

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        digests = dict.fromkeys(token_digest(validate_token(token)) for token in tokens)
        self._digests: tuple[bytes, ...] = tuple(digests)

    def __contains__(self, token: object) -> bool:
        if not isinstance(token, str):
            return False
        return self.has_digest(token_digest(token))

    def has_digest(self, candidate: bytes) -> bool:
        """Like ``in``, for a token known only by its SHA-256 digest (of a live session)."""
        found = False
        for digest in self._digests:
            # Non-short-circuiting OR: every digest is compared whatever the outcome.
            found |= hmac.compare_digest(digest, candidate)
        return found

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"<TokenSet of {len(self._digests)} tokens>"
