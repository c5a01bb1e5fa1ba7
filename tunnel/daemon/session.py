"""What server and client sessions share: the data channel over one QUIC connection.

A :class:`Channel` sends IP packets as QUIC DATAGRAM frames; one that does not fit a datagram
gets "packet too big" back to its sender where the sender can act on it, and is otherwise
framed on stream 0. It keeps its own bounds on what waits to be sent (datagrams, and stream bytes
a peer may never acknowledge), and counts what it moves and what it drops.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable
from typing import Any

import trio
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent

from tunnel.core.control import CONTROL_STREAM
from tunnel.core.icmp import packet_too_big_untrusted
from tunnel.core.messages import FRAME_PACKET, Frame, encode_frame
from tunnel.core.ratelimit import TokenBucket
from tunnel.daemon.aioquic_private.pmtu import datagram_frame_room
from tunnel.daemon.aioquic_private.state import (
    datagram_queue,
    datagram_size,
    is_closing,
    stream_buffered,
)
from tunnel.daemon.driver import QuicDriver
from tunnel.daemon.pathmtu import PathMtu
from tunnel.daemon.quic import MAX_DATAGRAM_PAYLOAD

# Datagrams waiting inside aioquic (congestion-limited) beyond this are dropped, not queued:
# a VPN that buffers adds latency; the inner TCP reacts to a drop exactly as it should.
MAX_QUEUED_DATAGRAMS = 256
# Bytes on the control stream not yet acknowledged beyond this: packets and pongs are dropped.
# A peer that withholds flow-control credit (or ACKs) would otherwise make us buffer forever.
MAX_STREAM_BUFFER = 256 * 1024
# "Packet too big" answers to inner senders, per channel: enough for every flow to learn the
# size once, never a flood (RFC 4443 2.4(f) asks for a limit).
TOO_BIG_RATE = 10.0
TOO_BIG_BURST = 20.0


class Drops(collections.Counter[str]):
    """Dropped packets by reason."""


class SessionLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Tags every line with the session's client (its name, or its ID's first 12 characters),
    as the record's ``client`` attribute: text logs show it as a ``[client]`` prefix, JSON
    logs as a key of its own."""

    def process(self, msg, kwargs):  # type: ignore[no-untyped-def]
        kwargs["extra"] = {**(kwargs.get("extra") or {}), **(self.extra or {})}
        return msg, kwargs


class Channel:
    """The data channel of one QUIC connection (server or client side)."""

    def __init__(self, quic: QuicConnection, drops: Drops, touched: set[Channel]) -> None:
        self.quic = quic
        # aioquic's own queue is unbounded: we read its length to bound it.
        self._datagram_queue = datagram_queue(quic)
        self.driver: QuicDriver  # set by the owner once it knows how to send
        self.drops = drops
        # The largest IP packet sent as one DATAGRAM: the smaller of the peer's limit (from
        # its hello) and what fits one packet of the path's size (path MTU discovery).
        self.peer_datagram_limit = MAX_DATAGRAM_PAYLOAD
        self.path_datagram_room = datagram_frame_room(quic, datagram_size(quic))
        self.max_datagram_payload = 0
        self._limit_datagrams()
        self.path_mtu: PathMtu  # set by the owner, with the driver
        self.bytes_in = self.bytes_out = self.packets_in = self.packets_out = 0
        # Channels with something queued, shared by everything one pump flushes: a flush costs
        # the channels that have work, not every channel there is.
        self.touched = touched
        # Where a "packet too big" goes (the local TUN device) and the tunnel addresses it
        # comes from (the server's); until the owner sets them, oversize packets take the
        # stream.
        self.deliver_local: Callable[[bytes], object] | None = None
        self.icmp_source4: bytes | None = None
        self.icmp_source6: bytes | None = None
        self._too_big_budget = TokenBucket(rate=TOO_BIG_RATE, burst=TOO_BIG_BURST)

    def drive(
        self,
        send: Callable[[list[tuple[bytes, Any]]], None],
        send_probe: Callable[[bytes, Any], bool],
        on_event: Callable[[QuicEvent], None],
        on_failed: Callable[[Exception], None],
        *,
        label: str,
    ) -> None:
        """Make the driver that runs this channel's connection (its fault boundary) and the
        path MTU search that follows its path; every new path size is applied and sent at once."""
        self.driver = QuicDriver(self.quic, send, on_event, on_failed)
        self.path_mtu = PathMtu(
            self.quic, send_probe, self._resized, self.driver.transmit, label=label
        )
        self.driver.on_path_change = self.path_mtu.path_changed

    def _resized(self, size: int, evicted: list[bytes]) -> None:
        self.path_size_changed(size, evicted)
        self.driver.transmit()

    def set_peer_datagram_limit(self, limit: int) -> None:
        """The peer's hello said how large a datagram payload it takes."""
        self.peer_datagram_limit = limit
        self._limit_datagrams()

    def path_size_changed(self, size: int, evicted: list[bytes]) -> None:
        """Path MTU discovery set a new UDP payload size (a :data:`SizeChanged`): datagrams
        follow it, and the packets queued for the old size that no longer fit one take the
        stream instead (they were sent by their senders already: no "packet too big" now)."""
        self.path_datagram_room = datagram_frame_room(self.quic, size)
        self._limit_datagrams()
        for packet in evicted:
            self._packet_on_stream(packet)
        if evicted:
            self.touched.add(self)

    def _limit_datagrams(self) -> None:
        self.max_datagram_payload = min(self.peer_datagram_limit, self.path_datagram_room)

    def _packet_on_stream(self, packet: bytes) -> bool:
        """Frame one packet onto the control stream; False (counted) if it is full or gone."""
        if self._write_control(bytes((FRAME_PACKET,)) + len(packet).to_bytes(4, "big") + packet):
            return True
        self.drops["stream_full"] += 1
        return False

    def send_packet(self, packet: bytes, *, may_answer: bool = True) -> None:
        """Queue one IP packet to the peer. Call ``driver.transmit()`` after a batch.
        ``may_answer=False``: the packet's sender cannot hear "packet too big" (it is the
        NAT64 translator's output), so an oversize one always takes the stream."""
        size = len(packet)
        if size <= self.max_datagram_payload:
            if len(self._datagram_queue) >= MAX_QUEUED_DATAGRAMS:
                self.drops["queue_full"] += 1
                return
            self.quic.send_datagram_frame(packet)
        elif may_answer and self._answered_too_big(packet):
            return
        elif not self._packet_on_stream(packet):
            return  # too large for one datagram, and the stream is full or gone
        self.bytes_out += size
        self.packets_out += 1
        self.touched.add(self)

    def _answered_too_big(self, packet: bytes) -> bool:
        """A packet that does not fit a datagram and whose sender can be told so (IPv4 with
        DF, IPv6 above 1280) gets "packet too big" with the size that fits, so its path MTU
        discovery adapts instead of every packet crawling over the stream. True if it was
        answered (or dropped for the answer's budget)."""
        if self.deliver_local is None:
            return False
        if self.path_mtu.searching:
            # The size is not known yet: an answer now could make the sender settle for far
            # less than the path carries (for ten minutes, on Linux). The stream carries it.
            return False
        error = packet_too_big_untrusted(
            packet, self.max_datagram_payload, self.icmp_source4, self.icmp_source6
        )
        if error is None:
            return False
        self.drops["too_big"] += 1
        if self._too_big_budget.take(trio.current_time()):
            self.deliver_local(error)
        return True

    def send_frame(self, frame: Frame) -> bool:
        """Queue a control frame; False if it was dropped (the stream is full or gone)."""
        if not self._write_control(encode_frame(frame)):
            self.drops["stream_full"] += 1
            return False
        self.touched.add(self)
        return True

    def _write_control(self, data: bytes) -> bool:
        quic = self.quic
        if (
            self.driver.failed
            or is_closing(quic)  # closing it (a violation, say): nothing more to say
            or stream_buffered(quic, CONTROL_STREAM) > MAX_STREAM_BUFFER
        ):
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

    def path_status(self) -> dict[str, object]:
        """The path's size as discovery sees it, and the datagram payload it allows."""
        return {"datagram_payload": self.max_datagram_payload, **self.path_mtu.status()}


def transmit_touched(touched: set[Channel]) -> None:
    """Send what every channel in ``touched`` has queued (one send each), emptying the set."""
    while touched:
        touched.pop().driver.transmit()
