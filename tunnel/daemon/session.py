"""What server and client sessions share: the data channel over one QUIC connection.

A :class:`Channel` sends IP packets as QUIC DATAGRAM frames (or framed on stream 0 when they do
not fit a datagram), keeps its own bound on queued datagrams, parses stream 0, and counts what
it moves and what it drops.
"""

from __future__ import annotations

import collections
import logging

from aioquic.quic.connection import QuicConnection

from tunnel.core.messages import FRAME_PACKET, FrameDecoder, encode_frame
from tunnel.daemon.quic import QuicDriver

# Datagrams waiting inside aioquic (congestion-limited) beyond this are dropped, not queued:
# a VPN that buffers adds latency; the inner TCP reacts to a drop exactly as it should.
MAX_QUEUED_DATAGRAMS = 256
CONTROL_STREAM = 0


class Drops(collections.Counter[str]):
    """Dropped packets by reason."""


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every line with the session's client ID."""

    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        return f"[{self.extra['client']}] {msg}", kwargs


class Channel:
    """The data channel of one QUIC connection (server or client side)."""

    def __init__(self, quic: QuicConnection, drops: Drops, touched: set[Channel]) -> None:
        self.quic = quic
        self.driver: QuicDriver  # set by the owner once it knows how to send
        self.decoder = FrameDecoder()
        self.drops = drops
        # The peer's limit, learned in the handshake; until then the conservative default.
        self.max_datagram_payload = 1200
        self.bytes_in = self.bytes_out = self.packets_in = self.packets_out = 0
        # Channels with something queued, shared by everything one pump flushes: a flush costs
        # the channels that have work, not every channel there is.
        self.touched = touched

    def send_packet(self, packet: bytes) -> None:
        """Queue one IP packet to the peer. Call ``driver.transmit()`` after a batch."""
        size = len(packet)
        if size <= self.max_datagram_payload:
            # aioquic's own queue is private and unbounded: we read its length to bound it.
            if len(self.quic._datagrams_pending) >= MAX_QUEUED_DATAGRAMS:
                self.drops["queue_full"] += 1
                return
            self.quic.send_datagram_frame(packet)
        else:
            # Too large for one datagram: reliable, ordered, but delivered.
            self.quic.send_stream_data(
                CONTROL_STREAM, bytes((FRAME_PACKET,)) + size.to_bytes(4, "big") + packet
            )
        self.bytes_out += size
        self.packets_out += 1
        self.touched.add(self)

    def send_frame(self, frame: object) -> None:
        self.quic.send_stream_data(CONTROL_STREAM, encode_frame(frame))
        self.touched.add(self)

    def mark_touched(self) -> None:
        self.touched.add(self)

    def counters(self) -> dict[str, int]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
        }
