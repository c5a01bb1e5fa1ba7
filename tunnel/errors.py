"""The whole exception vocabulary of tunnel.

Every error carries the process exit code a supervisor should see if it ends the daemon:
100 means "permanent, do not restart me" (bad config, rejected credentials), 111 means
"temporary, try again" (daemontools convention).
"""

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_PERMANENT = 100
EXIT_TEMPORARY = 111


class TunnelError(Exception):
    """Root of every error tunnel raises on purpose."""

    exit_code = EXIT_TEMPORARY


class ConfigError(TunnelError):
    """Invalid configuration or input file; the message names the file, key or flag."""

    exit_code = EXIT_PERMANENT


class KeyFileError(ConfigError):
    """A key file is missing, unreadable or malformed."""


class TokenError(ConfigError):
    """An auth token is malformed; the message says what is wrong (length, prefix, encoding,
    checksum)."""


class InvalidPublicId(ConfigError):
    """A public ID string does not decode to an Ed25519 public key."""


class PoolExhausted(TunnelError):
    """The address pool has no free address left."""


class ProtocolError(TunnelError):
    """The peer broke the protocol (remote misbehaviour)."""


class ProtocolViolation(ProtocolError):
    """The peer sent something the protocol does not allow in this state; the connection is
    closed with ``close_code`` (an application error code) and the message as its reason."""

    def __init__(self, reason: str, close_code: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.close_code = close_code


class DecodeError(ProtocolError):
    """Bytes from the network could not be decoded. The one error type every ``*_untrusted``
    decoder may raise."""


class HandshakeError(TunnelError):
    """The tunnel handshake did not complete."""


class PeerRejected(HandshakeError):
    """The server, its identity verified, refused or revoked our credentials on the control
    stream. The one failure from the network that is permanent: nothing else that arrives can
    be told apart from a forgery by someone on the path."""

    exit_code = EXIT_PERMANENT


class TemporaryRejection(HandshakeError):
    """The server refused us for now (server full, no free address, too many sessions)."""


class IdentityMismatch(HandshakeError):
    """The server's identity key is not the pinned ``server_id``. Temporary: whoever answers
    on the path can present another key, so this is retried (and logged as an error)."""


class NameNotResolved(TunnelError):
    """A host name did not resolve (now: DNS may come back)."""


class HandshakeTimeout(HandshakeError):
    """The handshake did not finish in time."""


class SessionLost(TunnelError):
    """An established session ended: heartbeat timeout, QUIC connection closed, path lost."""


class SystemSetupError(TunnelError):
    """The host refused something we need: TUN device, address, route, socket."""

    exit_code = EXIT_PERMANENT
