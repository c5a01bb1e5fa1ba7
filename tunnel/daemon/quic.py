"""Our QUIC settings: certificates from identities, aioquic configurations, session tickets,
stateless reset tokens, and the sizes and timeouts every connection uses.

Nothing here reads aioquic's private state (:mod:`tunnel.daemon.aioquic_private` does) or
imports trio (:mod:`tunnel.daemon.driver` runs a connection).
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import hmac
import secrets
import ssl
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.tls import SessionTicket
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from tunnel.core.identity import Identity
from tunnel.core.messages import ALPN, PEER_ALPN

# 1500-byte path minus IPv6 (40) and UDP (8) headers: fits IPv4 and IPv6 underlays. The
# largest UDP payload path MTU discovery tries (tunnel.daemon.pathmtu).
MAX_DATAGRAM_SIZE = 1452
# What every connection starts with, the handshake included: QUIC's smallest size, which every
# path must carry (RFC 9000 14), so a handshake over a 1280-byte link is never a black hole.
INITIAL_DATAGRAM_SIZE = 1200
# Bytes a DATAGRAM frame costs inside a 1-RTT packet with 8-byte connection IDs: short header
# (1 + 8 + 2-byte packet number), AEAD tag (16), frame type (1) and a 2-byte length.
DATAGRAM_OVERHEAD = 30
MAX_DATAGRAM_PAYLOAD = MAX_DATAGRAM_SIZE - DATAGRAM_OVERHEAD
# We accept DATAGRAM frames of any size the peer can fit in a packet.
MAX_DATAGRAM_FRAME_SIZE = 65535
IDLE_TIMEOUT = 60.0
# The longest burst the pacer allows (aioquic_private.state.BurstPacer), in packets.
BURST_PACKETS = 64

Address = Any  # (host, port) or (host, port, flowinfo, scope_id), exactly as the socket reports


def certificate_for(identity: Identity) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    """A self-signed X.509 certificate over the identity's Ed25519 key. Nobody checks its names
    or dates: the client pins the key itself."""
    key = Ed25519PrivateKey.from_private_bytes(identity.seed)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.public_id)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, None)
    )
    return cert, key


def server_configuration(identity: Identity) -> QuicConfiguration:
    cert, key = certificate_for(identity)
    config = QuicConfiguration(
        is_client=False,
        alpn_protocols=[ALPN],
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=INITIAL_DATAGRAM_SIZE,
        idle_timeout=IDLE_TIMEOUT,
    )
    config.certificate = cert
    config.private_key = key
    return config


class TicketStore:
    """The server's session tickets, so a returning client resumes without a full handshake.
    Bounded: the oldest ticket goes when it is full. In memory only, so a restart forgets them."""

    def __init__(self, capacity: int = 4096) -> None:
        self._tickets: collections.OrderedDict[bytes, SessionTicket] = collections.OrderedDict()
        self.capacity = capacity

    def add(self, ticket: SessionTicket) -> None:
        self._tickets[ticket.ticket] = ticket
        while len(self._tickets) > self.capacity:
            self._tickets.popitem(last=False)

    def pop(self, label: bytes) -> SessionTicket | None:
        # Single use: a ticket resumes one connection (and the new one brings its own).
        return self._tickets.pop(label, None)

    def __len__(self) -> int:
        return len(self._tickets)


def client_configuration(
    server_name: str | None = None, session_ticket: SessionTicket | None = None
) -> QuicConfiguration:
    # CERT_NONE: the certificate chain means nothing to us; the TLS handshake signature is still
    # verified, and the key it proves is compared with the pinned server_id after the handshake.
    return QuicConfiguration(
        is_client=True,
        alpn_protocols=[ALPN],
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=INITIAL_DATAGRAM_SIZE,
        idle_timeout=IDLE_TIMEOUT,
        server_name=server_name,
        session_ticket=session_ticket,
    )


def peer_configuration(identity: Identity, *, initiator: bool) -> QuicConfiguration:
    """A direct connection between two clients: both present a certificate over their
    identity key (the initiator's key is proven again by its PeerAuth, over the connection's
    channel binding); each pins the key the server introduced."""
    cert, key = certificate_for(identity)
    config = QuicConfiguration(
        is_client=initiator,
        alpn_protocols=[PEER_ALPN],
        verify_mode=ssl.CERT_NONE,
        max_datagram_frame_size=MAX_DATAGRAM_FRAME_SIZE,
        max_datagram_size=INITIAL_DATAGRAM_SIZE,
        idle_timeout=IDLE_TIMEOUT,
    )
    config.certificate = cert
    config.private_key = key
    return config


class ResetTokens:
    """Stateless reset tokens derived from a secret that survives restarts (RFC 9000 10.3).

    A restarted server has forgotten every connection; a client still sending to it would only
    notice at its heartbeat timeout. With tokens computed from the server's identity key and
    the connection ID, the new process can answer such a packet with a stateless reset that the
    client recognises at once. aioquic draws its tokens at random and has no hook for this, so
    :class:`tunnel.daemon.aioquic_private.state.ResettableConnection` replaces them before they
    are ever sent.
    """

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"tunnel stateless reset\0" + secret).digest()

    def token(self, cid: bytes) -> bytes:
        return hmac.new(self._key, cid, hashlib.sha256).digest()[:16]

    def reset_packet(self, cid: bytes, trigger_size: int) -> bytes | None:
        """A stateless reset for a packet of ``trigger_size`` bytes to ``cid``, or None if that
        packet was too small to answer without risking a reset loop."""
        size = min(trigger_size - 1, 43)
        if size < 21:
            return None
        # Short-header form, fixed bit set, unpredictable bits, then the token.
        first = 0x40 | (secrets.randbits(6))
        return bytes((first,)) + secrets.token_bytes(size - 17) + self.token(cid)
