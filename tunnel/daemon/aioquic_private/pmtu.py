"""aioquic glue for path MTU discovery: probe packets, datagram-size changes, loss counts.

One of the private-state modules (see :mod:`tunnel.daemon.aioquic_private` for the rule, the
inventory and the aioquic versions checked; tests/daemon/test_pmtu_probe.py passes with each).
aioquic has no PMTU discovery, so :class:`tunnel.core.pmtu.PmtuSearch` decides and this module
does what its decisions need inside an aioquic connection, reading and writing aioquic's
private state on purpose.

Probes (:func:`send_probe`) are 1-RTT packets of PING and PADDING, sealed with the
connection's keys by :func:`.fastpath.seal_short_packet`, and registered with
aioquic's loss recovery so that their acknowledgement or loss reaches a callback. They are
registered as neither in flight nor ack-eliciting, which in aioquic's recovery means:

- bytes in flight, the congestion window and the pacer never see them, so a lost probe is no
  congestion signal (RFC 9000 section 14.4), nor part of persistent congestion (only
  ack-eliciting packets count there), and a probe is not held back by the window;
- they do not arm or push back the PTO (a probe alone in flight would otherwise fire the PTO
  at once, since no in-flight packet moved its start time, and the PTO would then declare the
  probe lost and send a PING of its own);
- an acknowledgement still reaches the callback (``on_ack_received`` visits every sent
  packet in the acknowledged ranges), but gives no RTT sample when the probe is the largest
  packet acknowledged;
- loss is still detected, by packet or time threshold, but only once a packet sent after the
  probe is acknowledged. On a connection that sends nothing else it never is: **the caller
  must time probes out itself** (``PmtuSearch``'s probe timer does), and may then get the
  loss report later, or even a late acknowledgement (``PmtuSearch`` copes with both).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol

from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE
from aioquic.quic.congestion.base import K_MINIMUM_WINDOW
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import QuicFrameType
from aioquic.quic.packet_builder import PACKET_NUMBER_SEND_SIZE, QuicDeliveryState, QuicSentPacket

from tunnel.daemon.aioquic_private.fastpath import _remember_one_rtt, send_short_packet

__all__ = [
    "LARGEST_DATAGRAM_SIZE",
    "PacketTally",
    "ProbeCallback",
    "datagram_frame_room",
    "probe_timeout",
    "send_probe",
    "set_datagram_size",
]

LARGEST_DATAGRAM_SIZE = 65527
"""The largest UDP payload QUIC allows (RFC 9000 section 18.2, max_udp_payload_size)."""

# Lost sizes a PacketTally keeps between two takes; losses beyond it add nothing to the
# evidence (PmtuSearch needs a handful).
_TALLY_LOST_LIMIT = 256

_PING = bytes((QuicFrameType.PING,))
# The AEAD tag of every QUIC version 1 and 2 cipher suite.
_AEAD_TAG_SIZE = 16


class ProbeCallback(Protocol):
    """What :func:`send_probe` calls once with a probe's outcome."""

    def __call__(self, size: int, acked: bool) -> None: ...


def _probe_delivered(state: QuicDeliveryState, size: int, on_result: ProbeCallback) -> None:
    on_result(size, acked=state is QuicDeliveryState.ACKED)


def send_probe(
    quic: QuicConnection, size: int, now: float, on_result: ProbeCallback
) -> bytes | None:
    """One PMTU probe: a 1-RTT packet of exactly ``size`` bytes of UDP payload holding a PING
    frame and PADDING, for the caller to send to the connection's current path
    (``quic._network_paths[0].addr``) at once.

    aioquic calls ``on_result(size, acked=True)`` when it is acknowledged and
    ``on_result(size, acked=False)`` when it declares it lost, from inside
    ``receive_datagram`` or ``handle_timer``; it must not raise. Loss is only declared once a
    later packet is acknowledged (see the module docstring): the caller times probes out.

    Returns None when the connection cannot carry a probe now (handshake not confirmed,
    closing, path not validated, no keys); then nothing was sent and no callback will come.
    Raises ``ValueError`` for a size outside [1200, 65527].
    """
    if not SMALLEST_MAX_DATAGRAM_SIZE <= size <= LARGEST_DATAGRAM_SIZE:
        raise ValueError(f"probe size must be in [1200, 65527], got {size}")
    if (
        quic._state is not QuicConnectionState.CONNECTED
        or not quic._handshake_confirmed
        or quic._close_pending
        or not quic._network_paths
        or not quic._network_paths[0].is_validated
    ):
        return None
    space, crypto = quic.__dict__.get("_tunnel_one_rtt") or _remember_one_rtt(quic)
    if not crypto.send.is_valid():
        return None
    peer_cid = quic._peer_cid.cid
    header_size = 1 + len(peer_cid) + PACKET_NUMBER_SEND_SIZE
    # PING first, then PADDING (zero bytes) to the end: the receiver's PADDING handler
    # consumes every zero byte that follows.
    payload = _PING + bytes(size - header_size - crypto.aead_tag_size - len(_PING))
    packet = send_short_packet(
        quic,
        crypto,
        space,
        payload,
        now,
        # Outside congestion control and the PTO: see the module docstring.
        in_flight=False,
        ack_eliciting=False,
        delivery_handlers=[(_probe_delivered, (size, on_result))],
    )
    if not quic._ack_eliciting_sent_since_receipt:
        # The peer will answer a PING: restart the idle timer as aioquic does (RFC 9000 10.1).
        quic._close_at = now + quic._idle_timeout()
        quic._ack_eliciting_sent_since_receipt = True
    quic._network_paths[0].bytes_sent += len(packet)
    return packet


def probe_timeout(quic: QuicConnection) -> float:
    """The connection's current PTO in seconds (RTT-based, without backoff): the ``pto``
    for ``PmtuSearch.next_probe``."""
    return float(quic._loss.get_probe_timeout())


def datagram_frame_room(quic: QuicConnection, size: int) -> int:
    """The largest DATAGRAM payload that fits one 1-RTT packet of ``size`` bytes on this
    connection (short header, 2-byte packet number, AEAD tag, frame type and length)."""
    room = size - (1 + len(quic._peer_cid.cid) + PACKET_NUMBER_SEND_SIZE) - _AEAD_TAG_SIZE - 1
    # The length is a varint: 1 byte below 64, 2 below 16384, 4 for the rest of a UDP payload.
    fits = [min(room - length, limit - 1) for length, limit in ((1, 64), (2, 16384), (4, 1 << 30))]
    return max(0, *fits)


def set_datagram_size(quic: QuicConnection, size: int) -> list[bytes]:
    """Make aioquic build packets of at most ``size`` bytes of UDP payload from now on.

    Changes every place aioquic 1.7 keeps the size: the connection's own (its packet builders
    and the room it gives probes beyond the window), the congestion controller's segment size
    (Reno's and CUBIC's window growth, CUBIC's additive increase, the minimum window, which
    the window is raised to if below it) and the pacer's (its packet interval and burst),
    re-rating the pacer at once. Never touches the configuration (a server shares one among
    its connections).

    Returns the DATAGRAM payloads that were waiting in aioquic's queue and no longer fit one
    packet, in order, having taken them out: aioquic would otherwise keep such a datagram at
    the head of its queue forever. The caller sends them another way or counts them dropped.

    The fast path (:mod:`.fastpath`) sizes its packets from the connection's own size, so it
    follows at once. Raises ``ValueError`` for a size outside [1200, 65527].
    """
    if not SMALLEST_MAX_DATAGRAM_SIZE <= size <= LARGEST_DATAGRAM_SIZE:
        raise ValueError(f"datagram size must be in [1200, 65527], got {size}")
    quic._max_datagram_size = size
    loss = quic._loss
    cc = loss._cc
    # Reno and CUBIC keep the size as _max_datagram_size; CUBIC also as its additive increase.
    if hasattr(cc, "_max_datagram_size"):
        cc._max_datagram_size = size
    if hasattr(cc, "additive_increase_factor"):
        cc.additive_increase_factor = size
    cc.congestion_window = max(cc.congestion_window, K_MINIMUM_WINDOW * size)
    pacer = loss._pacer
    pacer._max_datagram_size = size
    if pacer.packet_time is not None and loss._rtt_initialized:
        pacer.update_rate(congestion_window=cc.congestion_window, smoothed_rtt=loss._rtt_smoothed)
    pending = quic._datagrams_pending
    room = datagram_frame_room(quic, size)
    evicted = [data for data in pending if len(data) > room]
    if evicted:
        kept = [data for data in pending if len(data) <= room]
        pending.clear()
        pending.extend(kept)
    return evicted


class PacketTally:
    """What black-hole detection (``PmtuSearch.packet_loss_report``) needs from aioquic: the
    sizes of in-flight packets declared lost and the size of the largest in-flight packet
    acknowledged, since the previous :meth:`take`. Probes and ACK-only packets, which are not
    in flight, are not counted.

    It hooks aioquic's loss recovery of one connection (its congestion controller's
    ``on_packet_acked``, about 0.1 us more per acknowledged packet, and the rare
    ``_on_packets_lost``), so it counts what aioquic's own sender and the fast path send.
    Create it once per connection, after anything that replaces the congestion controller.
    """

    def __init__(self, quic: QuicConnection) -> None:
        self.lost: list[int] = []
        self.largest_acked = 0
        #: Called (from inside aioquic) after in-flight packets were declared lost.
        self.on_loss: Callable[[], None] | None = None
        loss = quic._loss
        cc = loss._cc
        acked = cc.on_packet_acked
        packets_lost = loss._on_packets_lost

        def on_packet_acked(*, now: float, packet: QuicSentPacket) -> None:
            # Only in-flight packets come here, so probes are already left out.
            if packet.sent_bytes > self.largest_acked:
                self.largest_acked = packet.sent_bytes
            acked(now=now, packet=packet)

        def on_packets_lost(*, packets: Iterable[QuicSentPacket], **kwargs: Any) -> None:
            packets = list(packets)  # may be an iterator; aioquic reads it after us
            lost = self.lost
            for packet in packets:
                if packet.in_flight and len(lost) < _TALLY_LOST_LIMIT:
                    lost.append(packet.sent_bytes)
            packets_lost(packets=packets, **kwargs)
            if lost and self.on_loss is not None:
                self.on_loss()

        # Instance attributes shadow the methods: aioquic calls both through `self.`.
        cc.on_packet_acked = on_packet_acked  # type: ignore[method-assign]
        loss._on_packets_lost = on_packets_lost  # type: ignore[method-assign]

    def take(self) -> tuple[list[int], int]:
        """(lost sizes, largest acknowledged size or 0) since the previous take; resets."""
        lost, largest = self.lost, self.largest_acked
        self.lost = []
        self.largest_acked = 0
        return lost, largest
