"""What the daemon reads from a QuicConnection's private state, and the settings it changes there.

One of the private-state modules (see :mod:`tunnel.daemon.aioquic_private` for the rule, the
inventory and the aioquic versions checked). Small accessors for what the sessions, the path
MTU task and the driver need to know (is the connection established or closing, its current
path, its datagram size, its queues), and the changes a new connection gets (:func:`tune`,
:class:`ResettableConnection`).

None of these is called per packet: the queues (:func:`datagram_queue`, :func:`event_queue`)
are handed out once, as the live objects, for callers to keep.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
from typing import Any

from aioquic import tls
from aioquic.buffer import Buffer
from aioquic.quic.connection import (
    END_STATES,
    Limit,
    QuicConnection,
    QuicConnectionState,
    QuicNetworkPath,
)
from aioquic.quic.events import QuicEvent
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.recovery import K_MICRO_SECOND, K_SECOND, QuicPacketPacer
from cryptography.hazmat.primitives import serialization

from tunnel.core.messages import BINDING_SIZE
from tunnel.daemon.quic import BURST_PACKETS, ResetTokens

__all__ = [
    "BurstPacer",
    "acknowledge_now",
    "ResettableConnection",
    "connection_binding",
    "shed_handshake_buffers",
    "current_path",
    "datagram_queue",
    "datagram_size",
    "event_queue",
    "has_ended",
    "is_closing",
    "is_established",
    "is_open",
    "is_stateless_reset",
    "peer_public_key",
    "smoothed_rtt",
    "stream_buffered",
    "tune",
]

# -- reading ----------------------------------------------------------------------------------


def is_established(quic: QuicConnection) -> bool:
    """Handshake confirmed, and aioquic's state still the plain connected one."""
    return quic._handshake_confirmed and quic._state is QuicConnectionState.CONNECTED


def is_open(quic: QuicConnection) -> bool:
    """In aioquic's connected state with no close of ours waiting to be sent."""
    return not quic._close_pending and quic._state is QuicConnectionState.CONNECTED


def is_closing(quic: QuicConnection) -> bool:
    """A close of ours is waiting to be sent, or the connection is closing, draining or over."""
    return quic._close_pending or quic._state in END_STATES


def has_ended(quic: QuicConnection) -> bool:
    """The connection is closing, draining or terminated (aioquic's end states)."""
    return quic._state in END_STATES


def current_path(quic: QuicConnection) -> QuicNetworkPath | None:
    """The path aioquic sends on (it moves a migrated peer's new path to the front), or None
    before there is one. A new object when the path changes."""
    return quic._network_paths[0] if quic._network_paths else None


def datagram_size(quic: QuicConnection) -> int:
    """The UDP payload size aioquic builds packets for now (the configuration's at first, then
    whatever :func:`tunnel.daemon.aioquic_private.pmtu.set_datagram_size` set)."""
    return quic._max_datagram_size


def datagram_queue(quic: QuicConnection) -> collections.deque[bytes]:
    """aioquic's queue of DATAGRAM payloads not sent yet: the deque itself, which aioquic
    creates with the connection and never replaces, so a caller may keep it and read its
    length (the sessions bound it). Only the private-state modules take from it."""
    return quic._datagrams_pending


def event_queue(quic: QuicConnection) -> collections.deque[QuicEvent]:
    """aioquic's queue of events, which ``next_event()`` pops: the deque itself (created with
    the connection, never replaced), so the driver can drain it without a call per event."""
    return quic._events


def smoothed_rtt(quic: QuicConnection) -> float | None:
    """QUIC's smoothed RTT estimate in seconds (None before the first sample)."""
    loss = getattr(quic, "_loss", None)
    if loss is None or not getattr(loss, "_rtt_initialized", False):
        return None
    return float(loss._rtt_smoothed)


def largest_received(quic: QuicConnection) -> int:
    """The highest 1-RTT packet number received and authenticated so far (-1: none): it moves
    for every packet the peer's keys opened, ACK-only packets included, which no event shows."""
    space = quic._spaces.get(tls.Epoch.ONE_RTT)
    return -1 if space is None else int(space.largest_received_packet)


def stream_buffered(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to a stream of ours and not yet acknowledged (0 for no such stream)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    return sender._buffer_stop - sender._buffer_start


def peer_public_key(quic: QuicConnection) -> bytes | None:
    """The raw Ed25519 key of the peer's certificate, or None (no certificate, or not Ed25519).

    aioquic keeps the peer certificate in a private attribute of its TLS context.
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


def connection_binding(quic: QuicConnection) -> bytes:
    """32 bytes unique to this QUIC connection that only its two ends can compute: a keyed hash
    of its first 1-RTT traffic secrets (client's, then server's). The client signs it with the
    server's nonce, so a signature is worthless on any other connection. Call it before any key
    update (the tunnel handshake comes first); raises ``ValueError`` before the 1-RTT keys
    exist. aioquic has no TLS exporter, so this reads its private key state."""
    pair = quic._cryptos[tls.Epoch.ONE_RTT]
    send, recv = pair.send.secret, pair.recv.secret
    if not send or not recv:
        raise ValueError("no 1-RTT keys yet")
    client_secret, server_secret = (send, recv) if quic._is_client else (recv, send)
    binding = hmac.new(client_secret, b"tunnel binding v1\0" + server_secret, hashlib.sha256)
    return binding.digest()[:BINDING_SIZE]


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


# -- changing ---------------------------------------------------------------------------------


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


# One frozenset per distinct set of epochs, shared by every connection's frame-handler table
# (aioquic builds about thirty per connection: some 7 KiB each).
_SHARED_EPOCHS: dict[frozenset[tls.Epoch], frozenset[tls.Epoch]] = {}
_FRAME_HANDLERS = "_QuicConnection__frame_handlers"


def _share_frame_epochs(quic: QuicConnection) -> None:
    handlers = getattr(quic, _FRAME_HANDLERS)
    for frame_type, (handler, epochs) in handlers.items():
        handlers[frame_type] = (handler, _SHARED_EPOCHS.setdefault(epochs, epochs))


def shed_handshake_buffers(quic: QuicConnection) -> None:
    """Once the handshake is complete, give back the three 16 KiB buffers aioquic keeps for
    the TLS messages of each epoch: about half of an idle session's memory.

    Nothing writes to them later in QUIC: TLS 1.3 here has no post-handshake messages but the
    server's tickets, written (and moved to the crypto stream) before the handshake completes,
    and a CRYPTO frame after that only makes TLS raise an alert. Were a write ever to come, it
    would fail inside aioquic and the connection's driver would close it, as for any fault.
    """
    quic._crypto_buffers = {epoch: Buffer(capacity=0) for epoch in quic._crypto_buffers}


def acknowledge_now(quic: QuicConnection, now: float) -> None:
    """Let the next send carry the ACK of what just arrived, rather than the timer a moment
    later. For a peer that was quiet (a heartbeat): one wake-up and one send per PING instead
    of two. A busy peer's ACKs keep aioquic's delay, which gathers several batches in one."""
    space = quic._spaces[tls.Epoch.ONE_RTT]
    if space.ack_at is not None and space.ack_at > now:
        space.ack_at = now


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
    _share_frame_epochs(quic)
    return quic


class ResettableConnection(QuicConnection):
    """A server-side QuicConnection whose stateless reset tokens come from
    :class:`tunnel.daemon.quic.ResetTokens`.

    Overrides aioquic's private ``_replenish_connection_ids``."""

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
