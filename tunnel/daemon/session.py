"""What server and client sessions share: the data channel over one QUIC connection.

A :class:`Channel` sends IP packets as QUIC DATAGRAM frames (or framed on stream 0 when they do
not fit a datagram), keeps its own bounds on what waits to be sent (datagrams, and stream bytes
a peer may never acknowledge), and counts what it moves and what it drops.
"""

from __future__ import annotations

import collections
import logging

from aioquic.quic.connection import QuicConnection

from tunnel.core.control import CONTROL_STREAM
from tunnel.core.messages import FRAME_PACKET, encode_frame
from tunnel.daemon.quic import QuicDriver, stream_buffered

# Datagrams waiting inside aioquic (congestion-limited) beyond this are dropped, not queued:
# a VPN that buffers adds latency; the inner TCP reacts to a drop exactly as it should.
MAX_QUEUED_DATAGRAMS = 256
# Bytes on the control stream not yet acknowledged beyond this: packets and pongs are dropped.
# A peer that withholds flow-control credit (or ACKs) would otherwise make us buffer forever.
MAX_STREAM_BUFFER = 256 * 1024


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
        elif not self._write_control(bytes((FRAME_PACKET,)) + size.to_bytes(4, "big") + packet):
            # Too large for one datagram, and the stream it would take is full or gone.
            self.drops["stream_full"] += 1
            return
        self.bytes_out += size
        self.packets_out += 1
        self.touched.add(self)

    def send_frame(self, frame: object) -> bool:
        """Queue a control frame; False if it was dropped (the stream is full or gone)."""
        if not self._write_control(encode_frame(frame)):
            self.drops["stream_full"] += 1
            return False
        self.touched.add(self)
        return True

    def _write_control(self, data: bytes) -> bool:
        if self.driver.failed or stream_buffered(self.quic, CONTROL_STREAM) > MAX_STREAM_BUFFER:
            return False
        try:
            self.quic.send_stream_data(CONTROL_STREAM, data)
        except Exception as exc:
            # The peer reset or stopped the stream before we saw it (the event is still in the
            # queue): this connection is done, whoever was writing to it.
            self.driver.fail(exc)
            return False
        return True

    def mark_touched(self) -> None:
        self.touched.add(self)

    def counters(self) -> dict[str, int]:
        return {
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "packets_in": self.packets_in,
            "packets_out": self.packets_out,
        }
