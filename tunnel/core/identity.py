"""Ed25519 identities, their public IDs and the key-file format.

A public ID is the 32-byte public key in lowercase RFC 4648 base32 without padding (52
characters from ``a-z2-7``). Decoding is strict: 52 characters of the alphabet (either case)
whose unused trailing bits are zero, so every key has exactly one spelling.

A key file is text holding exactly one ``ed25519-seed <base32 seed>`` line; blank lines and
``#`` comment lines are ignored (see docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import base64

import attrs
import nacl.exceptions
import nacl.signing
import nacl.utils

from tunnel.errors import InvalidPublicId, KeyFileError

__all__ = [
    "KEY_LENGTH",
    "PUBLIC_ID_LENGTH",
    "SIGNATURE_LENGTH",
    "Identity",
    "decode_public_id",
    "encode_public_id",
    "format_key_file",
    "parse_key_file",
    "verify_signature",
]

KEY_LENGTH = 32
"""Length in bytes of an Ed25519 seed and of an Ed25519 public key."""

PUBLIC_ID_LENGTH = 52
"""Length in characters of the base32 text of a 32-byte key."""

SIGNATURE_LENGTH = 64
"""Length in bytes of an Ed25519 detached signature."""

_SEED_KEYWORD = "ed25519-seed"
_KEY_FILE_HEADER = "# tunnel identity key: keep this file secret (mode 0600)"
_B32_ALPHABET = frozenset("abcdefghijklmnopqrstuvwxyz234567ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _encode_key(key: bytes) -> str:
    return base64.b32encode(key).decode("ascii").rstrip("=").lower()


def _decode_key(text: str) -> bytes:
    """Decode the strict base32 spelling of a 32-byte key; ValueError names what is wrong.

    Never echoes the text: the same routine decodes secret seeds.
    """
    if len(text) != PUBLIC_ID_LENGTH:
        raise ValueError(f"must be {PUBLIC_ID_LENGTH} characters, got {len(text)}")
    # Check the alphabet before any case folding: str.upper() can change the length of
    # non-ASCII text, and b32decode would reject it with a less useful message.
    if not _B32_ALPHABET.issuperset(text):
        raise ValueError("is not base32 (allowed characters: a-z and 2-7)")
    key = base64.b32decode(text.upper() + "====")
    if len(key) != KEY_LENGTH:  # pragma: no cover - 52 base32 characters are always 32 bytes
        raise ValueError(f"does not decode to {KEY_LENGTH} bytes")
    # 52 characters carry 260 bits for 256: the 4 spare bits must be zero, or two
    # different strings would name the same key.
    if _encode_key(key) != text.lower():
        raise ValueError(f"does not decode to {KEY_LENGTH} bytes (non-zero trailing bits)")
    return key


def encode_public_id(public_key: bytes) -> str:
    """Return the public ID of a 32-byte Ed25519 public key: 52 lowercase base32 characters.

    Raises ValueError if ``public_key`` is not 32 bytes (a programming error, not bad input).
    """
    if not isinstance(public_key, bytes) or len(public_key) != KEY_LENGTH:
        raise ValueError(f"a public key is {KEY_LENGTH} bytes")
    return _encode_key(public_key)


def decode_public_id(text: str) -> bytes:
    """Decode a public ID into the 32-byte public key.

    Surrounding whitespace is ignored and either case is accepted. Raises
    :class:`tunnel.errors.InvalidPublicId` (and nothing else, for any input) naming what is
    wrong: the length, the alphabet or the decoded size.
    """
    if not isinstance(text, str):
        raise InvalidPublicId(f"public ID must be a string, got {type(text).__name__}")
    try:
        return _decode_key(text.strip())
    except ValueError as exc:
        raise InvalidPublicId(f"public ID {exc}") from None


def _checked_seed(value: bytes) -> bytes:
    # A converter, not a validator: attrs runs validators after the defaults below, which
    # would hand a bad seed to nacl first.
    if not isinstance(value, bytes) or len(value) != KEY_LENGTH:
        raise ValueError(f"an Ed25519 seed is {KEY_LENGTH} bytes")
    return value


@attrs.frozen(repr=False)
class Identity:
    """An Ed25519 key pair, held as its 32-byte seed.

    The repr shows the public ID only, never the seed. Equal seeds make equal identities.
    """

    seed: bytes = attrs.field(converter=_checked_seed)
    """The 32-byte secret seed: keep it secret."""

    # Deriving the key pair costs a scalar multiplication; do it once. A default computed
    # from the seed works on a frozen slotted class where cached_property does not.
    _signing_key: nacl.signing.SigningKey = attrs.field(
        init=False,
        eq=False,
        default=attrs.Factory(lambda self: nacl.signing.SigningKey(self.seed), takes_self=True),
    )
    _public_key: bytes = attrs.field(
        init=False,
        eq=False,
        default=attrs.Factory(lambda self: bytes(self._signing_key.verify_key), takes_self=True),
    )

    @classmethod
    def generate(cls) -> Identity:
        """Return a new identity from a fresh random seed."""
        return cls(nacl.utils.random(KEY_LENGTH))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """Return the identity of a 32-byte seed; ValueError if it is not 32 bytes."""
        return cls(seed)

    @property
    def public_key(self) -> bytes:
        """The 32-byte Ed25519 public key."""
        return self._public_key

    @property
    def public_id(self) -> str:
        """The public key as a public ID (52 lowercase base32 characters)."""
        return _encode_key(self._public_key)

    def sign(self, message: bytes) -> bytes:
        """Return the 64-byte Ed25519 detached signature of ``message``."""
        return self._signing_key.sign(message).signature

    def __repr__(self) -> str:
        return f"Identity(public_id={self.public_id!r})"


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Return True if ``signature`` is a valid Ed25519 signature of ``message`` by
    ``public_key``.

    Any bad input (wrong types or lengths, an invalid key, a forged signature) gives False;
    this never raises.
    """
    if not (
        isinstance(public_key, bytes)
        and isinstance(message, bytes)
        and isinstance(signature, bytes)
        and len(public_key) == KEY_LENGTH
        and len(signature) == SIGNATURE_LENGTH
    ):
        return False
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except (nacl.exceptions.CryptoError, ValueError, TypeError):
        # BadSignatureError is a CryptoError; libsodium also refuses small-order keys.
        return False
    return True


def format_key_file(identity: Identity) -> str:
    """Return the text of a key file holding ``identity``."""
    return f"{_KEY_FILE_HEADER}\n{_SEED_KEYWORD} {_encode_key(identity.seed)}\n"


def parse_key_file(text: str, *, source: str) -> Identity:
    """Parse the text of a key file into an :class:`Identity`.

    ``source`` (usually the file name) starts every error message. Raises
    :class:`tunnel.errors.KeyFileError` and nothing else for malformed text: no seed line,
    two seed lines, an unknown line, a seed that is not base32 or not 32 bytes. Messages never
    quote file content, which is secret.
    """
    if not isinstance(text, str):
        raise KeyFileError(f"{source}: key file is not text")
    seed: bytes | None = None
    seed_lineno = 0
    for lineno, raw_line in enumerate(text.splitlines(), start=1):
        line = raw_line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if parts[0] != _SEED_KEYWORD:
            raise KeyFileError(
                f"{source}:{lineno}: unknown line (expected '{_SEED_KEYWORD} <base32 seed>')"
            )
        if seed is not None:
            raise KeyFileError(
                f"{source}:{lineno}: second {_SEED_KEYWORD} line (the first is on line "
                f"{seed_lineno})"
            )
        if len(parts) != 2:
            raise KeyFileError(
                f"{source}:{lineno}: expected '{_SEED_KEYWORD} <base32 seed>', "
                f"got {len(parts)} words"
            )
        try:
            seed = _decode_key(parts[1])
        except ValueError as exc:
            raise KeyFileError(f"{source}:{lineno}: {_SEED_KEYWORD} {exc}") from None
        seed_lineno = lineno
    if seed is None:
        raise KeyFileError(f"{source}: no {_SEED_KEYWORD} line")
    return Identity(seed)
