"""aioquic glue: certificates from identities, configurations, and the per-connection driver.

aioquic is sans-IO. A :class:`QuicDriver` owns one ``QuicConnection`` and does the three things
every user of it must: after any input, hand the produced events to their handler and send the
produced datagrams; keep exactly one timer armed at ``get_timer()``; never let a remote error
escape as an exception (aioquic already turns them into ``ConnectionTerminated``).
"""

from __future__ import annotations

import collections
import datetime
import enum
import hashlib
import hmac
import logging
import math
import secrets
import ssl
from collections.abc import Callable
from typing import Any

import trio
from aioquic import tls
from aioquic._crypto import AEAD as _AeadPrimitive
from aioquic._crypto import HeaderProtection as _HeaderProtection
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import (
    END_STATES,
    Limit,
    QuicConnection,
    QuicConnectionError,
    QuicConnectionState,
    QuicReceiveContext,
)
from aioquic.quic.crypto import CryptoError, CryptoPair, KeyUnavailableError
from aioquic.quic.events import DatagramFrameReceived, QuicEvent
from aioquic.quic.packet import (
    PACKET_SPIN_BIT,
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    decode_packet_number,
)
from aioquic.quic.packet_builder import QuicSentPacket
from aioquic.quic.recovery import K_MICRO_SECOND, K_SECOND, MAX_ACK_RANGES, QuicPacketPacer
from aioquic.tls import SessionTicket
from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from tunnel.core.identity import Identity
from tunnel.core.messages import ALPN, BINDING_SIZE, CLOSE_INTERNAL

log = logging.getLogger("tunnel.quic")

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


def peer_public_key(quic: QuicConnection) -> bytes | None:
    """The raw Ed25519 key of the peer's certificate, or None (no certificate, or not Ed25519).

    aioquic keeps the peer certificate in a private attribute of its TLS context; this is the
    one place that reaches for it.
    """
    cert = getattr(quic.tls, "_peer_certificate", None)
    if cert is None:
        return None
    try:
        return cert.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    except (ValueError, TypeError):
        return None


def smoothed_rtt(quic: QuicConnection) -> float | None:
    """QUIC's smoothed RTT estimate in seconds (None before the first sample)."""
    loss = getattr(quic, "_loss", None)
    if loss is None or not getattr(loss, "_rtt_initialized", False):
        return None
    return float(loss._rtt_smoothed)


class BurstPacer(QuicPacketPacer):
    """aioquic's pacer lets at most 16 packets (or a quarter of the window) go in one burst, so a
    busy sender wakes its timer every few packets, and each wake-up costs a trip through trio
    and aioquic's send loop. This one allows bursts of up to 64 packets (or half the window):
    still paced at the congestion window per RTT, with a quarter of the wake-ups. Measured with
    scripts/bench: about 10 % less CPU per GB on both sides (docs/PERFORMANCE.md)."""

    def update_rate(self, congestion_window: int, smoothed_rtt: float) -> None:
        rate = congestion_window / max(smoothed_rtt, K_MICRO_SECOND)
        self.packet_time = max(K_MICRO_SECOND, min(self._max_datagram_size / rate, K_SECOND))
        burst = min(congestion_window // 2, BURST_PACKETS * self._max_datagram_size)
        self.bucket_max = max(2 * self._max_datagram_size, burst) / rate
        if self.bucket_time > self.bucket_max:
            self.bucket_time = self.bucket_max


def tune(quic: QuicConnection) -> QuicConnection:
    """Apply our settings to a new connection, before it sends its transport parameters: our
    pacer, and stream limits that allow the peer exactly the streams the protocol uses (the
    client one bidirectional stream, the server one unidirectional stream), so a peer that
    opens more gets aioquic's STREAM_LIMIT_ERROR instead of our memory. Both live in private
    state."""
    quic._loss._pacer = BurstPacer(max_datagram_size=quic._max_datagram_size)
    bidi, uni = (0, 1) if quic._is_client else (1, 0)
    quic._local_max_streams_bidi = Limit(
        frame_type=QuicFrameType.MAX_STREAMS_BIDI, name="max_streams_bidi", value=bidi
    )
    quic._local_max_streams_uni = Limit(
        frame_type=QuicFrameType.MAX_STREAMS_UNI, name="max_streams_uni", value=uni
    )
    return quic


def connection_binding(quic: QuicConnection) -> bytes:
    """32 bytes unique to this QUIC connection that only its two ends can compute: a keyed hash
    of its first 1-RTT traffic secrets (client's, then server's). The client signs it with the
    server's nonce, so a signature is worthless on any other connection. Call it before any key
    update (the tunnel handshake comes first); raises ``ValueError`` before the 1-RTT keys
    exist. aioquic has no TLS exporter, so this reads its private key state."""
    pair = quic._cryptos[_ONE_RTT]
    send, recv = pair.send.secret, pair.recv.secret
    if not send or not recv:
        raise ValueError("no 1-RTT keys yet")
    client_secret, server_secret = (send, recv) if quic._is_client else (recv, send)
    binding = hmac.new(client_secret, b"tunnel binding v1\0" + server_secret, hashlib.sha256)
    return binding.digest()[:BINDING_SIZE]


def stream_buffered(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream of ours and not yet acknowledged (0 for no such stream)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start


class ResetTokens:
    """Stateless reset tokens derived from a secret that survives restarts (RFC 9000 10.3).

    A restarted server has forgotten every connection; a client still sending to it would only
    notice at its heartbeat timeout. With tokens computed from the server's identity key and
    the connection ID, the new process can answer such a packet with a stateless reset that the
    client recognises at once. aioquic draws its tokens at random and has no hook for this, so
    :class:`ResettableConnection` replaces them before they are ever sent.
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


class ResettableConnection(QuicConnection):
    """A server-side QuicConnection whose stateless reset tokens come from :class:`ResetTokens`.

    Overrides aioquic's private ``_replenish_connection_ids``; pinned to aioquic 1.x."""

    def __init__(self, *, reset_tokens: ResetTokens, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._reset_tokens = reset_tokens
        self._derive_reset_tokens()

    def _derive_reset_tokens(self) -> None:
        for connection_id in self._host_cids:
            connection_id.stateless_reset_token = self._reset_tokens.token(connection_id.cid)

    def _replenish_connection_ids(self) -> None:
        super()._replenish_connection_ids()
        self._derive_reset_tokens()


def is_stateless_reset(quic: QuicConnection, data: bytes) -> bool:
    """Does this datagram end with the reset token of the connection ID we send to?"""
    token = quic._peer_cid.stateless_reset_token
    # Constant time (RFC 9000 10.3.1): timing must not tell a forger how many bytes matched.
    return (
        bool(token)
        and len(data) >= 21
        and not data[0] & 0x80
        and hmac.compare_digest(data[-16:], token)
    )


# aioquic 1.6 and later protect packets in Python over `cryptography`; the layers between a
# packet and the two primitive calls (pair, context, AEAD and header-protection objects, and
# copies of the packet) cost more than the primitives, so the fast paths call them directly.
# With aioquic's older C extension, or during a key update, aioquic's own methods do the work.
def _direct_crypto_usable() -> bool:
    try:
        aead = _AeadPrimitive(b"aes-128-gcm", bytes(16), bytes(12))
        protection = _HeaderProtection(b"aes-128-ecb", bytes(16))
        return (
            isinstance(aead._iv, int)
            and callable(aead._aead.encrypt)
            and len(protection._mask(bytes(16))) >= 5
        )
    except Exception:  # a C extension, or internals that moved: aioquic's own path
        return False


_DIRECT_CRYPTO = _direct_crypto_usable()


def seal_short_packet(
    crypto: CryptoPair, first_byte: int, peer_cid: bytes, number: int, payload: bytes
) -> bytes:
    """A protected 1-RTT packet with a 2-byte packet number: exactly what aioquic's
    ``crypto.encrypt_packet(header, payload, number)`` returns for that header."""
    header = bytes((first_byte,)) + peer_cid + (number & 0xFFFF).to_bytes(2, "big")
    if not _DIRECT_CRYPTO or crypto._update_key_requested:
        return crypto.encrypt_packet(header, payload, number)
    context = crypto.send
    # Callers only seal once the 1-RTT keys exist (their `aead is None` check): no assert in
    # the way of every packet.
    aead = context.aead
    protected = aead._aead.encrypt(  # type: ignore[union-attr]
        (aead._iv ^ number).to_bytes(12, "big"),  # type: ignore[union-attr]
        payload,
        header,
    )
    # Header protection samples 16 bytes starting 4 bytes after the packet number's start.
    mask = context.hp._mask(protected[2:18])  # type: ignore[union-attr]
    truncated = (number & 0xFFFF) ^ ((mask[1] << 8) | mask[2])
    return b"".join(
        (bytes((first_byte ^ (mask[0] & 0x1F),)), peer_cid, truncated.to_bytes(2, "big"), protected)
    )


def open_short_packet(
    crypto: CryptoPair, data: bytes, expected_number: int
) -> tuple[bytes, bytes, int]:
    """(plain header, payload, packet number) of a 1-RTT packet to an 8-byte connection ID:
    exactly what aioquic's ``crypto.decrypt_packet(data, 9, expected_number)`` returns, and
    the same CryptoError when the packet does not authenticate."""
    context = crypto.recv
    if not _DIRECT_CRYPTO or context.aead is None or len(data) < 29:
        return crypto.decrypt_packet(data, 9, expected_number)
    mask = context.hp._mask(data[13:29])  # type: ignore[union-attr]  # keys exist with aead
    first = data[0] ^ (mask[0] & 0x1F)
    if (first >> 2) & 1 != context.key_phase:
        return crypto.decrypt_packet(data, 9, expected_number)  # a key update: aioquic's
    pn_length = (first & 3) + 1
    end = 9 + pn_length
    truncated = int.from_bytes(data[9:end], "big") ^ int.from_bytes(mask[1 : 1 + pn_length], "big")
    number = decode_packet_number(truncated, pn_length * 8, expected_number)
    plain_header = bytes((first,)) + data[1:9] + truncated.to_bytes(pn_length, "big")
    aead = context.aead
    try:
        payload = aead._aead.decrypt(
            (aead._iv ^ number).to_bytes(12, "big"), data[end:], plain_header
        )
    except InvalidTag as exc:
        raise CryptoError(str(exc)) from None
    return plain_header, payload, number


_ONE_RTT = tls.Epoch.ONE_RTT


def _remember_one_rtt(quic: QuicConnection) -> tuple[Any, CryptoPair]:
    """The 1-RTT packet space and keys of a connected connection, looked up once. aioquic keys
    them by an Enum whose ``__hash__`` is Python code, so each lookup is a call, and on the
    way to every packet's system call each call counts. Both are created before the handshake
    and never replaced."""
    pair = (quic._spaces[_ONE_RTT], quic._cryptos[_ONE_RTT])
    quic._tunnel_one_rtt = pair  # type: ignore[attr-defined]
    return pair


_DATAGRAM_WITH_LENGTH = 0x31
# What a 1-RTT packet spends besides its frames: short header (1 + 8-byte CID + 2-byte packet
# number) and the AEAD tag.
_PACKET_OVERHEAD = 11 + 16


def build_datagram_packets(quic: QuicConnection, now: float) -> list[bytes]:
    """The DATAGRAM fast path: turn aioquic's pending datagrams into 1-RTT packets ourselves.

    aioquic builds every packet through a generic builder that considers every frame type; for
    a packet holding only DATAGRAM frames that is most of the sender's CPU. Here such packets
    are laid out directly, sealed with the same packet protection (:func:`seal_short_packet`),
    and registered with its loss recovery and congestion control exactly as its builder would
    (sent-packet record, bytes in flight, pacer, idle timer, path byte count). Whatever else is
    pending (ACKs, stream data, control frames) is left for aioquic's ``datagrams_to_send``
    (see :meth:`QuicDriver.transmit`), and so is everything while the connection is not in its
    plain connected state (handshake, migration, closing, logging). Reads aioquic 1.x private
    state on purpose.
    """
    pending = quic._datagrams_pending
    if (
        not pending
        or quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
        or quic._close_pending
        or quic._quic_logger is not None
        or len(quic._network_paths) != 1
        or not quic._network_paths[0].is_validated
        or len(quic._peer_cid.cid) != 8
    ):
        return []
    space, crypto = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    if crypto.send.aead is None:
        return []
    loss = quic._loss
    pacer = loss._pacer
    congestion = loss._cc
    path = quic._network_paths[0]
    first_byte = 0x40 | (quic._spin_bit << 5) | 1  # fixed bit, 2-byte packet number
    peer_cid = quic._peer_cid.cid
    # The size path MTU discovery has set for this connection (pmtu_probe.set_datagram_size).
    frame_room = quic._max_datagram_size - _PACKET_OVERHEAD
    packets: list[bytes] = []
    while pending:
        if pacer.next_send_time(now) is not None:
            break
        # As many whole datagrams as fit one packet (small ones, such as TCP ACKs, share).
        count = 0
        used = 0
        for data in pending:
            frame = 1 + (1 if len(data) < 64 else 2) + len(data)
            if used + frame > frame_room:
                break
            used += frame
            count += 1
        if count == 0:
            break  # cannot happen with sizes checked on the way in; aioquic decides
        if congestion.congestion_window - congestion.bytes_in_flight < used + 27:
            break
        frames = []
        for _ in range(count):
            data = pending.popleft()
            size = len(data)
            length = bytes((size,)) if size < 64 else (0x4000 | size).to_bytes(2, "big")
            frames.append(b"\x31" + length + data)
        number = quic._packet_number
        packet = seal_short_packet(
            crypto,
            # CryptoPair.key_phase, without the property call unless a key update is pending.
            first_byte
            | ((crypto.key_phase if crypto._update_key_requested else crypto.recv.key_phase) << 2),
            peer_cid,
            number,
            b"".join(frames),
        )
        quic._packet_number = number + 1
        loss.on_packet_sent(
            packet=QuicSentPacket(
                epoch=_ONE_RTT,
                in_flight=True,
                is_ack_eliciting=True,
                is_crypto_packet=False,
                packet_number=number,
                packet_type=QuicPacketType.ONE_RTT,
                sent_time=now,
                sent_bytes=len(packet),
            ),
            space=space,
        )
        if not quic._ack_eliciting_sent_since_receipt:
            # Restart the idle timer, as aioquic does for its first ack-eliciting packet.
            quic._close_at = now + quic._idle_timeout()
            quic._ack_eliciting_sent_since_receipt = True
        pacer.update_after_send(now=now)
        path.bytes_sent += len(packet)
        packets.append(packet)
    return packets


class Received(enum.IntEnum):
    """What :func:`receive_datagram_fast` did with a datagram."""

    NOT_OURS = 0  # untouched: hand it to aioquic
    DONE = 1  # received (or dropped, as aioquic would have)
    DATAGRAMS_ONLY = 2  # received, and it held nothing but DATAGRAM frames


def _datagram_frames(payload: bytes, max_frame_size: int | None) -> list[bytes] | None:
    """The datagrams of a payload that holds DATAGRAM frames and nothing else, each within the
    size we accept; None for anything else, malformed payloads included, which aioquic's own
    frame dispatcher then handles (and rejects) exactly as it always does."""
    if max_frame_size is None:
        return None
    datagrams = []
    i = 0
    end = len(payload)
    while i < end:
        frame_type = payload[i]
        if frame_type == 0x30:  # DATAGRAM without length: runs to the end of the packet
            start, stop = i + 1, end
        elif frame_type == _DATAGRAM_WITH_LENGTH and i + 1 < end:
            first = payload[i + 1]
            if first < 0x40:
                start = i + 2
                stop = start + first
            elif first < 0x80 and i + 2 < end:
                start = i + 3
                stop = start + (((first & 0x3F) << 8) | payload[i + 2])
            else:
                return None  # longer lengths than a packet of ours can hold
            if stop > end:
                return None
        else:
            return None
        if stop - (i + 1) >= max_frame_size:
            return None  # over our limit: aioquic closes the connection for it
        datagrams.append(payload[start:stop])
        i = stop
    return datagrams or None


def receive_datagram_fast(quic: QuicConnection, data: bytes, addr: Any, now: float) -> Received:
    """The receiving half of the fast path: one 1-RTT packet for our current connection ID on
    our current, validated path, in the plain connected state. Does what aioquic's
    ``receive_datagram`` does for exactly that case (decrypt, duplicate check, spin bit, frames,
    idle timer, ACK bookkeeping) without its generic header parsing, connection-ID search and
    path handling. A payload of DATAGRAM frames only is read here; any other goes through
    aioquic's own ``_payload_received``. Returns NOT_OURS, having touched nothing, for every
    other datagram: the caller hands those to aioquic."""
    if (
        len(data) < 26
        or data[0] & 0xC0 != 0x40
        or quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
        or quic._close_pending
        or quic._quic_logger is not None
        or data[1:9] != quic.host_cid
    ):
        return Received.NOT_OURS
    path = quic._network_paths[0]
    if path.addr != addr or not path.is_validated:
        return Received.NOT_OURS
    space, crypto = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    try:
        plain_header, payload, number = open_short_packet(
            crypto, data, space.expected_packet_number
        )
    except (CryptoError, KeyUnavailableError):
        return Received.DONE  # dropped, as aioquic drops it
    if number in space.received_packets:
        return Received.DONE  # duplicate
    if plain_header[0] & 0x18:
        quic.close(
            error_code=QuicErrorCode.PROTOCOL_VIOLATION,
            frame_type=QuicFrameType.PADDING,
            reason_phrase="Reserved bits must be zero",
        )
        return Received.DONE
    if number > space.expected_packet_number:
        space.expected_packet_number = number + 1
    if number > quic._spin_highest_pn:
        spin = bool(plain_header[0] & PACKET_SPIN_BIT)
        quic._spin_bit = not spin if quic._is_client else spin
        quic._spin_highest_pn = number
    datagrams = _datagram_frames(payload, quic._configuration.max_datagram_frame_size)
    if datagrams is not None:
        # The usual packet: what aioquic's dispatcher would do for it, without the dispatcher.
        events = quic._events
        for datagram in datagrams:
            events.append(DatagramFrameReceived(data=datagram))
        ack_eliciting = True
    else:
        context = QuicReceiveContext(
            epoch=_ONE_RTT,
            host_cid=quic.host_cid,
            network_path=path,
            quic_logger_frames=None,
            time=now,
            version=quic._version,
        )
        try:
            ack_eliciting, _probing = quic._payload_received(context, payload)
        except QuicConnectionError as exc:
            quic.close(
                error_code=exc.error_code,
                frame_type=exc.frame_type,
                reason_phrase=exc.reason_phrase,
            )
            return Received.DONE
        if quic._state in END_STATES or quic._close_pending:
            return Received.DONE
    # Push the idle deadline back, as aioquic does on every packet; computing it walks the loss
    # recovery state, so at most once a second (60 s idle timeout: nothing to notice).
    if quic._close_at is None or quic._close_at - now < IDLE_TIMEOUT - 1.0:
        quic._close_at = now + quic._idle_timeout()
    quic._ack_eliciting_sent_since_receipt = False
    if not space.discarded:
        if number > space.largest_received_packet:
            space.largest_received_packet = number
            space.largest_received_time = now
        space.ack_queue.add(number)
        space.received_packets.add(number)
        if len(space.ack_queue) > MAX_ACK_RANGES:
            space.ack_queue.shift()
        if ack_eliciting and space.ack_at is None:
            space.ack_at = now + quic._ack_delay
    return Received.DONE if datagrams is None else Received.DATAGRAMS_ONLY


def aioquic_has_work(quic: QuicConnection, now: float) -> bool:
    """Could aioquic's ``datagrams_to_send`` produce anything that our own API calls queued?

    Its generic builder costs more than a whole fast-path packet, so it is skipped when the
    only thing that happened since its last run is DATAGRAMs, which the fast path sends. This
    checks what our code queues through aioquic's API (stream data, a close, a PING, a
    connection-ID change) and what the fast path leaves behind (datagrams it could not send,
    a due ACK). Everything aioquic queues by itself, from received packets or its timer, is
    covered by the driver's own flag."""
    if (
        quic._datagrams_pending
        or quic._close_pending
        or quic._ping_pending
        or quic._retire_connection_ids
        or quic._probe_pending
        or quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
    ):
        return True
    space, _ = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    ack_at = space.ack_at
    if ack_at is not None and ack_at <= now:
        return True
    for stream in quic._streams.values():
        sender = stream.sender
        if not sender.buffer_is_empty or sender.reset_pending or stream.receiver.stop_pending:
            return True
    return False


class QuicDriver:
    """Drives one QuicConnection: events out to ``handle_event``, datagrams out through ``send``
    (a whole batch at a time, so the socket can send it in one system call), and one timer task
    (:meth:`run_timer`) that must run in the owning session's nursery.

    It is also the connection's fault boundary: every way into the connection (a received
    datagram, its events, a transmit, the timer) goes through here, and an exception on any of
    them closes this connection alone with ``CLOSE_INTERNAL`` and is handed to ``on_failure``;
    nothing raises into the pump that called. A failed driver ignores everything after.
    """

    def __init__(
        self,
        quic: QuicConnection,
        send: Callable[[list[tuple[bytes, Address]]], None],
        handle_event: Callable[[QuicEvent], None],
        on_failure: Callable[[Exception], None],
    ) -> None:
        self.quic = quic
        self._send = send
        self._handle_event = handle_event
        self._on_failure = on_failure
        self._timer_scope: trio.CancelScope | None = None
        self._clock: trio.abc.Clock | None = None
        # Whether aioquic itself may have queued something (from a received packet or its
        # timer) that only its generic send path sends.
        self._aioquic_due = True
        self.failed = False
        # Called when the connection's current path changes (aioquic moved the peer to a new
        # address): path MTU discovery starts again there.
        self.on_path_change: Callable[[], None] | None = None
        self._path: object | None = None

    def receive(self, data: bytes, addr: Address, now: float) -> None:
        """Feed one UDP datagram. Call :meth:`pump` once after a batch of these."""
        if self.failed:
            return
        try:
            received = receive_datagram_fast(self.quic, data, addr, now)
            if received is Received.NOT_OURS:
                self.quic.receive_datagram(data, addr, now)
        except Exception as exc:
            self.fail(exc)
            return
        if received is not Received.DATAGRAMS_ONLY:
            self._aioquic_due = True

    def deliver_events(self) -> None:
        """Hand every pending event to its handler. The caller sends afterwards (once per batch,
        with whatever else the batch queued)."""
        events = self.quic._events  # what next_event() pops, without a call per event
        handle = self._handle_event
        try:
            while events and not self.failed:
                handle(events.popleft())
        except Exception as exc:
            self.fail(exc)

    def pump(self) -> None:
        """Deliver pending events, then send whatever the connection has to send."""
        self.deliver_events()
        self.transmit()

    def transmit(self) -> None:
        """Send everything the connection has queued, and re-arm the timer."""
        if self.failed:
            return
        try:
            self._transmit()
        except Exception as exc:
            self.fail(exc)

    def _transmit(self) -> None:
        quic = self.quic
        clock = self._clock
        if clock is None:
            # The run's clock, read directly: trio.current_time() is three calls deep.
            clock = self._clock = trio.lowlevel.current_clock()
        now = clock.current_time()
        fast = build_datagram_packets(quic, now)
        if self._aioquic_due or aioquic_has_work(quic, now):
            # Whatever this cannot send yet (congestion, pacing) waits for an ACK or the
            # timer, and each of those sets the flag again.
            self._aioquic_due = False
            datagrams = quic.datagrams_to_send(now=now)
        else:
            datagrams = []
        path = quic._network_paths[0] if quic._network_paths else None
        if path is not self._path:
            self._path = path
            if self.on_path_change is not None:
                self.on_path_change()
        if fast:
            addr = path.addr  # type: ignore[union-attr]  # the fast path needs one
            datagrams = [(packet, addr) for packet in fast] + datagrams
        if datagrams:
            self._send(datagrams)
        scope = self._timer_scope
        if scope is not None:
            timer = quic.get_timer()
            scope.deadline = math.inf if timer is None else timer

    def fail(self, exc: Exception) -> None:
        """Close this connection for an internal error (once), tell the owner, and try to let
        the peer know. Never raises."""
        if self.failed:
            return
        self.failed = True
        if self._timer_scope is not None:
            self._timer_scope.deadline = math.inf
        try:
            self.quic.close(error_code=CLOSE_INTERNAL, reason_phrase="internal error")
            self._send(self.quic.datagrams_to_send(now=trio.current_time()))
        except Exception:  # the connection's state is what failed: the peer will time out
            log.debug("could not send the close of a failed connection", exc_info=True)
        self._on_failure(exc)

    async def run_timer(self) -> None:
        """Fire aioquic's timer whenever it is due. Runs until cancelled."""
        while not self.failed:
            timer = self.quic.get_timer()
            with trio.CancelScope(deadline=math.inf if timer is None else timer) as scope:
                self._timer_scope = scope
                await trio.sleep_forever()
            self._timer_scope = None
            if self.failed:
                break
            timer = self.quic.get_timer()
            now = trio.current_time()
            if timer is not None and now >= timer:
                try:
                    self.quic.handle_timer(now)
                except Exception as exc:
                    self.fail(exc)
                    break
                self._aioquic_due = True
                self.pump()
                if self.quic.get_timer() == timer:
                    # Nothing moved it: aioquic's loss timer is `sent + delay` but the check
                    # is `now - delay >= sent`, which rounding can keep false at exactly that
                    # time. A moment later it holds (on virtual time this would spin forever).
                    await trio.sleep(K_MICRO_SECOND)
        await trio.sleep_forever()
